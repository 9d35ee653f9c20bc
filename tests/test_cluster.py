"""Pools on a real local Ray: placement from config, and fail-fast instead of a silent hang."""

import os
import time

import pytest
import ray

from cluster.pools import PoolPlacementError, actor_options, check_pool_fits, wait_ready
from configs.schema import ClusterConfig, PoolConfig


@ray.remote
class Probe:
    def where(self):
        return ray.get_runtime_context().get_assigned_resources()


def test_pool_replicas_and_custom_resources_come_from_config(ray_session):
    pool = PoolConfig(replicas=2, num_cpus=0.5, resources={"gen_pool": 0.5}, env={"POOL_ROLE": "generator"})
    check_pool_fits("generator", pool)
    actors = [Probe.options(**actor_options(pool)).remote() for _ in range(pool.replicas)]
    assigned = wait_ready("generator", [a.where.remote() for a in actors], 60, pool)
    assert all(a["gen_pool"] == 0.5 and a["CPU"] == 0.5 for a in assigned)
    for a in actors:
        ray.kill(a)


def test_impossible_pool_fails_at_once_naming_pool_and_resource(ray_session):
    with pytest.raises(PoolPlacementError, match=r"pool 'judge'.*GPU: need 1"):
        check_pool_fits("judge", PoolConfig(num_gpus=1))
    with pytest.raises(PoolPlacementError, match=r"pool 'teacher'.*label selfimprove/pool"):
        check_pool_fits("teacher", PoolConfig(label_selector={"selfimprove/pool": "teacher"}))


def test_pool_that_cannot_be_placed_now_times_out_with_a_clear_message(ray_session):
    # Fits a node on paper (gen_pool: 1 exists) but the first replica holds it: the second waits.
    pool = PoolConfig(replicas=2, num_cpus=0, resources={"gen_pool": 1})
    actors = [Probe.options(**actor_options(pool)).remote() for _ in range(2)]
    start = time.monotonic()
    with pytest.raises(PoolPlacementError, match=r"pool 'generator': 1 of 2 replicas not ready after 3 s"):
        wait_ready("generator", [a.where.remote() for a in actors], 3, pool)
    assert time.monotonic() - start < 10
    for a in actors:
        ray.kill(a)


def test_embedded_ray_workers_run_at_the_configured_niceness(ray_session):
    # Ray's default 15 lets any nice-0 process preempt an engine or training rank; the embedded default is 0.
    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == ClusterConfig().worker_niceness == 0


def test_memory_monitor_stays_within_its_cpu_budget():
    """Sampling PSS walks page tables; asked to sample every 10 ms it must still stay under max_duty of a core."""
    from runfolder.run import MemoryMonitor

    monitor = MemoryMonitor(interval_s=0.01, max_duty=0.05)
    stat = f"/proc/self/task/{monitor._thread.native_id}/stat"

    def thread_cpu_s() -> float:
        fields = open(stat).read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    time.sleep(0.5)  # the first samples run before the budget has been measured
    start_cpu, start = thread_cpu_s(), time.perf_counter()
    time.sleep(4)
    used, elapsed = thread_cpu_s() - start_cpu, time.perf_counter() - start
    peak_gib = monitor.stop()
    assert peak_gib > 0.05  # this pytest process alone holds more than 50 MiB
    assert used <= 0.05 * elapsed + 0.05, f"monitor used {used:.2f} CPU-s in {elapsed:.1f} s"


def external_address() -> str:
    """An address of this machine other than loopback (where a remote client would connect), else loopback."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def test_embedded_ray_listens_on_loopback_only(ray_session):
    """Every listening socket of the processes the embedded Ray started (GCS, raylet, agents, workers) is bound to
    loopback: another machine cannot reach it at all (cluster.connect.loopback_only)."""
    import ipaddress

    import psutil

    @ray.remote
    def pid() -> int:
        return os.getpid()

    worker = ray.get(pid.remote())  # a worker runs: its own servers count too
    ours = psutil.Process().children(recursive=True)
    assert worker in {p.pid for p in ours}
    listening = []
    for proc in ours:
        try:
            name = proc.name()
            sockets = proc.net_connections("inet")
            listening += [(name, c.laddr.ip, c.laddr.port) for c in sockets if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:  # a worker that ended since
            pass
    names = {n for n, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)  # gRPC's IPv4 sockets show as ::ffff:127.0.0.1 (not is_loopback in 3.11)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback

    wide = [s for s in listening if not loopback(s[1])]
    assert not wide, f"listening beyond loopback: {wide}"
    gcs = ray.get_runtime_context().gcs_address
    assert gcs.startswith("127.0.0.1:"), gcs


def test_embedded_ray_refuses_clients_without_its_token(ray_session, tmp_path):
    """The embedded Ray listens on loopback only, and there (another user of this machine) nobody may join without
    the session's token."""
    import subprocess
    import sys

    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    token_path = os.environ["RAY_AUTH_TOKEN_PATH"]
    assert os.environ["RAY_AUTH_MODE"] == "token" and ClusterConfig().auth_mode == "token"
    assert os.stat(token_path).st_mode & 0o777 == 0o600 and os.stat(os.path.dirname(token_path)).st_mode & 0o077 == 0
    token = open(token_path).read().strip()
    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    gcs = f"127.0.0.1:{port}"

    def list_nodes(metadata: tuple) -> grpc.StatusCode:
        with grpc.insecure_channel(gcs) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            try:
                stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=10)
                return grpc.StatusCode.OK
            except grpc.RpcError as err:
                return err.code()

    # Raw GCS calls from outside the driver: refused without the token or with a wrong one, served with it.
    assert list_nodes(()) == grpc.StatusCode.UNAUTHENTICATED
    assert list_nodes((("authorization", "Bearer " + "0" * 64),)) == grpc.StatusCode.UNAUTHENTICATED
    assert list_nodes((("authorization", f"Bearer {token}"),)) == grpc.StatusCode.OK
    if external_address() != "127.0.0.1":  # from the machine's other address: nothing answers at all
        outside = f"{external_address()}:{port}"
        with grpc.insecure_channel(outside) as channel:
            with pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(channel).result(timeout=5)

    # A Ray client in another process, with no token of its own (fresh HOME: no ~/.ray/auth_token either).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # A client on this machine, as any must be now: Ray's own address lookup answers loopback (else the client looks
    # for its node at the external address, where this Ray has none, and waits).
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    code = f"import ray; ray.init(address={gcs!r}); print('JOINED', ray.cluster_resources())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "JOINED" not in result.stdout, result.stdout[-2000:]
    assert "auth" in (result.stdout + result.stderr).lower(), result.stderr[-2000:]
