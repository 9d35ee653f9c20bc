"""A real multi-node Ray cluster on this one machine: ``python -m cluster.local up|down|status``.

Design note: Ray's own multi-node tests start one ``ray start --head`` and then one ``ray start --address``
per extra node, every node with its own ports, temp dir and resources; that is what this does, one worker node
per pool role, each labelled ``selfimprove/pool=<role>`` (the label ``configs/gpu-multinode.yaml`` and the
KubeRay worker groups use), so ``pools.<role>.label_selector`` pins each pool to its own node exactly as on a
real cluster. All nodes bind loopback (``--node-ip-address=127.0.0.1``).

Each node is started by ``setsid``: a new session whose id is recorded in the state file. Ray workers put
themselves in their own process groups, but they stay in the raylet's session, so "every process of session S"
is exactly what one node started and what ``down`` stops (the raylets' workers included, which outlive their
raylet for a moment). Never ``ray stop``: it kills every Ray of the user on the machine.

The cluster uses Ray 2.60 token auth with a private token (0600 file in the 0700 state folder): its GCS and
raylets listen on every interface whatever the node address says. ``status`` prints how to submit a job.

Nodes get no ``PYTHONPATH`` into this checkout: a job brings its code with ``ray job submit --working-dir``,
as on a real cluster. They keep the machine's caches (``TORCH_EXTENSIONS_DIR``, ``HF_*``) the way a node image
would bake them in.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from cluster.environment import PROJECT_ROOT

ROLES = ("generator", "judge", "teacher", "train")
LABEL_KEY = "selfimprove/pool"
BIN = Path(sys.executable).parent
DEFAULT_DIR = Path(tempfile.gettempdir()) / f"selfimprove-cluster-{os.getuid()}"
# Short: Ray's unix socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay under 107 bytes.
STATE_FILE = "state.json"


class LocalClusterError(RuntimeError):
    pass


def free_port(low: int = 20000) -> int:
    """A free TCP port outside Ray's worker port range (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= low:
            return port


def node_env(folder: Path) -> dict[str, str]:
    """The environment every node's processes (and so every worker) start with."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in a job entrypoint is this venv's
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(folder / "auth_token"),
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray turns "127.0.0.1" into the machine's external address in every process that connects (the
            # head's job agent, a job's driver), while these nodes listen on loopback only. Off, Ray's address
            # lookup answers loopback (ray._private.services.get_node_ip_address); `ray start` of a worker node
            # would then refuse to join, which pin_loopback undoes inside it.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # Seconds a raylet waits for its agents to start, and `ray start` for its raylet: Ray's 30 s / 60 s
            # defaults are too short on a busy 2-core machine (the dashboard agent alone took 40 s to come up).
            "RAY_agent_register_timeout_ms": "300000",
            "RAY_raylet_start_wait_time_s": "120",
        }
    )
    return env


def pin_loopback(ray_params, head: bool) -> None:
    """``RAY_START_HOOK`` of every node. ``ray start`` replaces ``--node-ip-address=127.0.0.1`` by the machine's
    external address (``services.resolve_ip_for_localhost``), and ``--address=127.0.0.1:P`` too, which would
    put the cluster's traffic on eth0 (and a worker node then looks for a loopback-bound head on eth0). This runs
    inside ``ray start`` before either is resolved: loopback stays loopback."""
    from ray._private import ray_constants, services

    ray_constants.ENABLE_RAY_CLUSTER = True  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is for the node's clients only
    services.resolve_ip_for_localhost = lambda host: host
    ray_params.node_ip_address = "127.0.0.1"
    ray_params.node_name = "127.0.0.1"
    # PYTHONPATH only served to import this hook: the node's processes inherit no path into this checkout.
    os.environ.pop("PYTHONPATH", None)


def client_env(state: dict) -> dict[str, str]:
    """What a client (``ray job submit``, a driver) needs to reach the cluster."""
    return {
        "RAY_ADDRESS": state["dashboard"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state["token_path"],
    }


def _token(folder: Path) -> Path:
    path = folder / "auth_token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def load_state(folder: Path) -> dict | None:
    path = folder / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _save_state(folder: Path, state: dict) -> None:
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(folder / STATE_FILE)


def session_processes(sid: int) -> list[psutil.Process]:
    """Every live process of session ``sid``: one node's GCS / raylet / agents / workers."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _raylet_node_id(sid: int) -> str | None:
    for proc in session_processes(sid):
        try:
            for part in proc.cmdline():
                if part.startswith("--node_id="):
                    return part.split("=", 1)[1]
        except psutil.Error:
            continue
    return None


def _start_node(folder: Path, name: str, args: list[str], timeout_s: float, attempts: int = 3) -> dict:
    """``setsid ray start ...`` for one node; its session id, pids and node id.

    Retried: a raylet aborts when its dashboard agent has not written its port file within 15 s (hard-coded in
    Ray 2.60's ``WaitForPersistedPort``, no config reaches it), which a busy 2-core machine sometimes misses."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_node_once(folder, name, args, timeout_s)
        except LocalClusterError as err:
            if attempt == attempts:
                raise
            print(
                f"node {name}: start attempt {attempt} failed, retrying ({str(err).splitlines()[0]})", file=sys.stderr
            )
    raise AssertionError("unreachable")


def _start_node_once(folder: Path, name: str, args: list[str], timeout_s: float) -> dict:
    temp_dir = folder / name
    temp_dir.mkdir(parents=True, exist_ok=True)
    ports = {k: free_port() for k in ("agent_http", "agent_grpc", "metrics", "runtime_env")}
    cmd = [
        str(BIN / "ray"),
        "start",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={ports['agent_http']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
        "--disable-usage-stats",
        *args,
    ]
    log_path = folder / f"{name}.start.log"
    with open(log_path, "w") as out:
        # start_new_session: setsid, so the node's processes leave our process group and session and can be
        # stopped as one session later, whoever started this script.
        env = {**node_env(folder), "RAY_START_HOOK": "cluster.local.pin_loopback", "PYTHONPATH": str(PROJECT_ROOT)}
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
    sid = proc.pid
    if code != 0:
        _kill_sessions([sid])  # not yet in the state file: down() would not find it
        raise LocalClusterError(
            f"node {name}: `ray start` {'timed out' if code is None else f'exited {code}'}; "
            f"log {log_path}:\n{log_path.read_text()[-3000:]}"
        )
    return {
        "sid": sid,
        "temp_dir": str(temp_dir),
        "pids": sorted(p.pid for p in session_processes(sid)),
        "node_id": _raylet_node_id(sid),
        "ports": ports,
    }


def _kill_sessions(sids: list[int], grace_s: float = 5.0) -> list[int]:
    """SIGTERM every process of these sessions, then SIGKILL what is left; returns the pids signalled."""
    procs = [p for sid in sids for p in session_processes(sid)]
    signalled = {p.pid for p in procs}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(procs, timeout=grace_s)
        if not procs:
            break
    # New workers a dying raylet spawned between the listing and the signals.
    late = [p for sid in sids for p in session_processes(sid)]
    for proc in late:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(late, timeout=grace_s)
    return sorted(signalled | {p.pid for p in late})


def worker_args(state: dict, role: str, num_cpus: float, object_store_mib: int) -> list[str]:
    return [
        f"--address={state['address']}",
        f"--labels={LABEL_KEY}={role}",
        f"--num-cpus={num_cpus:g}",
        f"--object-store-memory={object_store_mib * 1024**2}",
    ]


def up(
    folder: Path = DEFAULT_DIR,
    roles: tuple[str, ...] = ROLES,
    spares: tuple[str, ...] = (),
    num_cpus: dict[str, float] | None = None,
    head_cpus: float = 2,
    object_store_mib: int = 200,
    timeout_s: float = 240,
) -> dict:
    """Start a head and one labelled worker node per role (plus one more per role in ``spares``)."""
    folder = Path(folder)
    existing = load_state(folder)
    if existing and any(session_processes(n["sid"]) for n in existing["nodes"].values()):
        raise LocalClusterError(f"a local cluster already runs from {folder}: `python -m cluster.local down` first")
    unknown = (set(roles) | set(spares)) - set(ROLES)
    if unknown:
        raise LocalClusterError(f"unknown roles {sorted(unknown)} (valid: {', '.join(ROLES)})")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    ports = {k: free_port() for k in ("gcs", "dashboard", "client")}
    state = {
        "dir": str(folder),
        "address": f"127.0.0.1:{ports['gcs']}",
        "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
        "token_path": str(_token(folder)),
        "ports": ports,
        "nodes": {},
        "object_store_mib": object_store_mib,
    }
    _save_state(folder, state)
    try:
        state["nodes"]["head"] = {
            "role": None,
            **_start_node(
                folder,
                "head",
                [
                    "--head",
                    f"--port={ports['gcs']}",
                    f"--num-cpus={head_cpus:g}",
                    "--include-dashboard=true",  # `ray job submit` talks to the dashboard's job API
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={ports['dashboard']}",
                    f"--ray-client-server-port={ports['client']}",
                    f"--object-store-memory={object_store_mib * 2 * 1024**2}",
                ],
                timeout_s,
            ),
        }
        _save_state(folder, state)
        names = [(role, role) for role in roles] + [(role, f"{role}-spare") for role in spares]

        def start(role: str, name: str) -> dict:
            cpus = (num_cpus or {}).get(role, 2)
            return {
                "role": role,
                **_start_node(folder, name, worker_args(state, role, cpus, object_store_mib), timeout_s),
            }

        # Worker nodes start together: each `ray start` mostly waits for its processes to come up.
        with ThreadPoolExecutor(max(1, len(names))) as pool:
            futures = {name: pool.submit(start, role, name) for role, name in names}
        errors = [f.exception() for f in futures.values() if f.exception()]
        state["nodes"].update({name: f.result() for name, f in futures.items() if not f.exception()})
        _save_state(folder, state)  # every node that started, so down() stops it even when another failed
        if errors:
            raise errors[0]
        wait_for_job_api(state, timeout_s)
    except BaseException:
        down(folder, keep_logs=True)  # the nodes' logs say why
        raise
    return state


def add_node(folder: Path, name: str, role: str, num_cpus: float = 2, timeout_s: float = 240) -> dict:
    """Start one more labelled worker node (a node coming back after a loss)."""
    folder = Path(folder)
    state = _require_state(folder)
    if name in state["nodes"] and session_processes(state["nodes"][name]["sid"]):
        raise LocalClusterError(f"node {name} already runs")
    args = worker_args(state, role, num_cpus, state.get("object_store_mib", 200))
    state["nodes"][name] = {"role": role, **_start_node(folder, name, args, timeout_s)}
    _save_state(folder, state)
    return state["nodes"][name]


def kill_node(folder: Path, name: str) -> list[int]:
    """SIGKILL every process of one node at once: a machine lost, not a clean shutdown."""
    state = _require_state(Path(folder))
    node = state["nodes"][name]
    procs = session_processes(node["sid"])
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)
    return sorted(p.pid for p in procs)


def node_by_id(state: dict, node_id: str) -> str | None:
    return next((name for name, n in state["nodes"].items() if n.get("node_id") == node_id), None)


def wait_for_job_api(state: dict, timeout_s: float) -> None:
    """A fresh head answers `ray job list` before its job agent is up; wait for both."""
    env = {**node_env(Path(state["dir"])), **client_env(state)}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ok = subprocess.run([str(BIN / "ray"), "job", "list"], env=env, capture_output=True, timeout=120)
        if ok.returncode == 0:
            return
        time.sleep(2)
    raise LocalClusterError(f"the head's job API at {state['dashboard']} did not answer within {timeout_s:g} s")


def _require_state(folder: Path) -> dict:
    state = load_state(folder)
    if state is None:
        raise LocalClusterError(f"no local cluster state in {folder} (`python -m cluster.local up` starts one)")
    return state


def down(folder: Path = DEFAULT_DIR, keep_logs: bool = False) -> list[int]:
    """Stop every process of every node this folder's cluster started (worker nodes first, then the head)."""
    folder = Path(folder)
    state = load_state(folder)
    if state is None:
        return []
    nodes = state["nodes"]
    order = [n for n in nodes if n != "head"] + (["head"] if "head" in nodes else [])
    killed = _kill_sessions([nodes[n]["sid"] for n in order])
    for name in order if not keep_logs else []:
        shutil.rmtree(nodes[name]["temp_dir"], ignore_errors=True)
    (folder / STATE_FILE).unlink(missing_ok=True)
    return killed


def status(folder: Path = DEFAULT_DIR) -> dict:
    state = _require_state(Path(folder))
    for node in state["nodes"].values():
        node["alive_processes"] = len(session_processes(node["sid"]))
    return state


def submit_hint(state: dict) -> str:
    env = client_env(state)
    return (
        f"RAY_ADDRESS={env['RAY_ADDRESS']} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={env['RAY_AUTH_TOKEN_PATH']} \\\n"
        "  ray job submit --working-dir . -- python -m jobs.spin --config configs/spin-tiny.yaml \\\n"
        f"  run.dir=$PWD/runs model.cache_dir=$PWD/.cache/models {' '.join(repr(o) for o in pin_overrides(state))}"
    )


def pin_overrides(state: dict) -> list[str]:
    """Config overrides that pin each pool to its labelled node in this cluster."""
    roles = sorted({n["role"] for n in state["nodes"].values() if n["role"]})
    return [f"pools.{role}.label_selector={{{LABEL_KEY}: {role}}}" for role in roles]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"state and temp folder (default {DEFAULT_DIR})")
    parser.add_argument("--roles", default=",".join(ROLES), help="worker nodes, one per role (comma-separated)")
    parser.add_argument("--spares", default="", help="roles that get a second node with the same label")
    parser.add_argument("--num-cpus", type=float, default=2, help="logical CPUs per worker node")
    parser.add_argument("--head-cpus", type=float, default=2, help="logical CPUs of the head (the job driver)")
    args = parser.parse_args(argv)
    if args.command == "up":
        roles = tuple(r for r in args.roles.split(",") if r)
        spares = tuple(r for r in args.spares.split(",") if r)
        state = up(args.dir, roles, spares, {r: args.num_cpus for r in ROLES}, args.head_cpus)
        for name, node in state["nodes"].items():
            print(f"{name:<16} node {node['node_id']}  session {node['sid']}  {len(node['pids'])} processes")
        print(f"\nSubmit a job:\n{submit_hint(state)}")
    elif args.command == "down":
        killed = down(args.dir)
        print(f"stopped {len(killed)} processes" if killed else f"no local cluster in {args.dir}")
    else:
        state = status(args.dir)
        for name, node in state["nodes"].items():
            print(f"{name:<16} node {node['node_id']}  {node['alive_processes']} processes alive")
        print(f"\nSubmit a job:\n{submit_hint(state)}")


if __name__ == "__main__":
    try:
        main()
    except LocalClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
