"""Across nodes for real, on the session's local multi-node cluster (conftest.local_cluster): what the cluster
script starts it stops, workers get no path into the driver's checkout, a node that cannot use the shared
storage fails its pool by name, and a generator node lost mid-phase costs no row and duplicates none (with a
spare node carrying its label), or stops the job naming the pool and a rerun resumes once a node is back."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import GENERATOR_ONLY, MULTINODE_ROOT, submit_job

from cluster import local
from cluster.connect import PROJECT_ROOT, worker_env
from cluster.storage import StorageError, check_storage

# The node-loss job (conftest.GENERATOR_ONLY): one generation phase on the generator pool, one prompt per batch
# and enough rows that the phase lasts long enough to lose a node in the middle of it.
NODE_LOSS = [
    "--config",
    "configs/spin-tiny.yaml",
    "run.method=smoke",
    "data.n_train=40",
    "engine.batch_size=1",
    "generation.max_tokens=24",
]


def smoke_job(state: dict, run_dir: Path, run_id: str, *overrides: str, wait: bool = True):
    pins = local.pin_overrides(state)
    entrypoint = ["python", "-c", GENERATOR_ONLY, *NODE_LOSS, f"run.id={run_id}", f"run.dir={run_dir}"]
    entrypoint += [f"model.cache_dir={MULTINODE_ROOT / '.cache/models'}", *pins, *overrides]
    return submit_job(state, "smoke", run_dir, entrypoint=entrypoint, wait=wait)


def generator_node(run: Path, state: dict, timeout_s: float = 600) -> str:
    """The local node the job's generator replica was placed on (from its driver log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = run / "driver.log"
        found = (
            re.search(r"pool generator ready: \[\{[^]]*'node_id': '([0-9a-f]+)'", log.read_text())
            if log.exists()
            else None
        )
        if found:
            return local.node_by_id(state, found.group(1))
        time.sleep(0.5)
    raise AssertionError(f"generator never became ready in {run}")


def wait_for_parts(run: Path, phase: str, job: subprocess.Popen, timeout_s: float = 600) -> None:
    """Until the phase has written its first batch (it is under way, most rows still to go)."""
    deadline = time.monotonic() + timeout_s
    while not list((run / "phases" / phase).glob("part-*.parquet")):
        assert job.poll() is None, f"job ended before phase {phase} started: {job.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"phase {phase} wrote nothing in {timeout_s} s"
        time.sleep(0.2)


def row_ids(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def finish(job: subprocess.Popen, timeout_s: float = 1200) -> tuple[int, str]:
    try:
        out, _ = job.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        job.kill()
        out, _ = job.communicate()
    return job.returncode, out


def live_state(state: dict) -> dict:
    return local.load_state(Path(state["dir"]))


# ---------------------------------------------------------------------------------------------------


def test_cluster_script_stops_exactly_what_it_started(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="sicl-t-", dir="/tmp"))
    try:
        state = local.up(folder, roles=("generator",), head_cpus=1)
        sessions = [n["sid"] for n in state["nodes"].values()]
        assert all(local.session_processes(sid) for sid in sessions)
        labels = {n["role"] for n in state["nodes"].values()}
        assert labels == {None, "generator"}
        status = subprocess.run(
            [local.BIN / "python", "-m", "cluster.local", "status", "--dir", str(folder)],
            capture_output=True,
            text=True,
            cwd=PROJECT_ROOT,
            timeout=120,
        )
        assert status.returncode == 0 and "RAY_AUTH_TOKEN_PATH=" in status.stdout and "ray job submit" in status.stdout
    finally:
        killed = local.down(folder)
    assert killed
    assert not any(local.session_processes(sid) for sid in sessions)  # raylets' workers and agents included


def test_workers_on_a_joined_cluster_get_no_path_into_the_driver_checkout():
    embedded = worker_env(joined=False)
    assert str(PROJECT_ROOT) in embedded["PYTHONPATH"]  # one box: the checkout is the code
    joined = worker_env(joined=True)
    assert not [k for k, v in joined.items() if str(PROJECT_ROOT) in v], joined


def test_storage_check_names_node_path_and_mount(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    check_storage("pool generator", "node-a", read=[str(model)], write=[str(tmp_path)])  # usable: no error
    with pytest.raises(StorageError) as err:
        check_storage("pool generator", "node-a", read=[str(tmp_path / "missing")], write=["/proc/no-run-dir"])
    text = str(err.value)
    assert "pool generator on node node-a" in text
    assert f"{tmp_path / 'missing'} does not exist on this node: mount the shared volume" in text
    assert "/proc/no-run-dir does not exist on this node: mount the shared volume that holds run.dir" in text
    with pytest.raises(StorageError, match=r"/proc is not writable .*run\.dir"):
        check_storage("pool train rank 0", "node-a", write=["/proc"])  # read-only even for root


def test_a_pool_whose_node_cannot_read_the_model_fails_naming_node_and_path(local_cluster, tmp_path):
    missing = tmp_path / "not-on-the-generator-node"
    probe = (
        "import sys; from actors.llm_actor import EnginePool; from configs.schema import ClusterConfig, EngineConfig, "
        "PoolConfig; from cluster.connect import connect; connect(ClusterConfig()); "
        f"EnginePool('generator', {str(missing)!r}, PoolConfig(label_selector={{'{local.LABEL_KEY}': 'generator'}}), "
        f"EngineConfig(), 120, shared_paths={{'read': [{str(missing)!r}], 'write': [{str(tmp_path)!r}]}})"
    )
    result = submit_job(local_cluster, "smoke", tmp_path, entrypoint=["python", "-c", probe])
    out = result.stdout + result.stderr
    assert result.returncode != 0
    found = re.search(r"pool 'generator' replica 0 failed to start: .*pool generator on node ([0-9a-f]+)", out)
    assert found, out[-3000:]
    assert local.node_by_id(local_cluster, found.group(1)) in ("generator", "generator-spare")
    assert f"{missing} does not exist on this node: mount the shared volume" in out


def test_generator_node_lost_mid_phase_with_a_spare_loses_and_duplicates_no_row(local_cluster, tmp_path):
    run = tmp_path / "smoke" / "spare"
    job = smoke_job(local_cluster, tmp_path, "spare", wait=False)
    try:
        lost = generator_node(run, local_cluster)
        wait_for_parts(run, "generator-answers", job)
        killed = local.kill_node(Path(local_cluster["dir"]), lost)
        assert killed
        code, out = finish(job)
    finally:
        if job.poll() is None:
            job.kill()
    assert code == 0, out[-4000:]
    ids = row_ids(run / "phases" / "generator-answers.parquet")
    assert len(ids) == len(set(ids)) == 40  # none lost, none twice
    assert set(ids) == set(row_ids(run / "phases" / "data-train.parquet"))
    assert not (run / "phases" / "generator-answers.failed.parquet").exists()
    summary = json.loads((run / "summary.json").read_text())
    generator = summary["placement"]["generator"][0]
    assert generator["labels"][local.LABEL_KEY] == "generator"
    assert local.node_by_id(live_state(local_cluster), generator["node_id"]) != lost  # moved to the spare
    assert generator["previous_node_ids"] == [local_cluster["nodes"][lost]["node_id"]]


def test_generator_node_lost_without_a_spare_stops_naming_the_pool_and_resumes_once_a_node_is_back(
    local_cluster, tmp_path
):
    folder = Path(local_cluster["dir"])
    state = live_state(local_cluster)
    alive = [n for n, v in state["nodes"].items() if v["role"] == "generator" and local.session_processes(v["sid"])]
    for extra in alive[1:]:  # exactly one generator node: losing it leaves none
        local.kill_node(folder, extra)
    run = tmp_path / "smoke" / "nospare"
    # cluster.recovery_timeout_s: how long the pool waits for a node to host its lost replica (none comes here). It
    # must outlast Ray's node health checks (~15-20 s to declare the killed node dead): 10 s once ended before the
    # node was declared dead, so the pool reported a replica that did not come back instead of naming the lost node.
    job = smoke_job(local_cluster, tmp_path, "nospare", "cluster.recovery_timeout_s=30", wait=False)
    try:
        lost = generator_node(run, state)
        wait_for_parts(run, "generator-answers", job)
        local.kill_node(folder, lost)
        code, out = finish(job)
    finally:
        if job.poll() is None:
            job.kill()
    assert code != 0
    assert "pool 'generator'" in out and "no alive node can host" in out, out[-4000:]
    assert "within 30 s (cluster.recovery_timeout_s)" in out
    kept = sum(len(row_ids(p)) for p in (run / "phases" / "generator-answers").glob("part-*.parquet"))
    assert 0 < kept < 40

    local.add_node(folder, "generator-back", "generator")
    result = smoke_job(local_cluster, tmp_path, "nospare")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"{kept} rows from an interrupted run kept" in (run / "driver.log").read_text()
    ids = row_ids(run / "phases" / "generator-answers.parquet")
    assert len(ids) == len(set(ids)) == 40
