"""`ray job submit` for real, across nodes: every method's tiny job on the session's local multi-node cluster
(conftest.local_cluster: a head and one node labelled selfimprove/pool=<role> per pool), each pool pinned to its
node by label_selector; the summary's placement must show each pool on its labelled node and nowhere else."""

import glob
import json
from pathlib import Path

import pytest
from conftest import submit_job
from test_wandb import read_records

from cluster import local
from cluster.local import LABEL_KEY

# What each tiny job places (LLM judge / teacher only where the method or its data needs them).
POOLS_USED = {
    "spin": {"generator", "train"},
    "s3ft": {"generator", "train"},
    "llm2llm": {"generator", "teacher", "train"},
    "aft": {"generator", "train"},
}
OVERRIDES = {
    "spin": ["spin.iterations=1"],
    "s3ft": ["s3ft.baseline_sft=false"],
    "llm2llm": ["llm2llm.iterations=1"],
    "aft": [],
}


def nodes_with_role(state: dict, role: str) -> set[str]:
    """Node ids of the cluster's nodes labelled for ``role``, read from its state file (nodes added later count)."""
    live = local.load_state(Path(state["dir"]))
    return {n["node_id"] for n in live["nodes"].values() if n["role"] == role}


@pytest.mark.parametrize("method", ["spin", "s3ft", "llm2llm", "aft"])
def test_each_method_runs_with_every_pool_on_its_labelled_node(local_cluster, tmp_path, method):
    result = submit_job(local_cluster, method, tmp_path, *OVERRIDES[method])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    run = tmp_path / method / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert "joined" in (run / "driver.log").read_text()  # the driver joined the submitted-to cluster
    placement = summary["placement"]
    assert POOLS_USED[method] <= set(placement), placement
    for pool, replicas in placement.items():
        assert replicas, f"{pool}: no replica recorded"
        for replica in replicas:
            assert replica["labels"].get(LABEL_KEY) == pool, (pool, replica)
            assert replica["node_id"] in nodes_with_role(local_cluster, pool), (pool, replica)
    assert len(placement["train"]) == 2  # one entry per rank
    # W&B gets the same record: the session's main offline run has it in its config and its summary.
    (wandb_file,) = glob.glob(str(run / "wandb/offline-run-*-s1/run-*.wandb"))
    records = read_records(wandb_file)
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update}
    assert config["placement"] == placement
    summary_keys = {u.key for r in records if r.HasField("summary") for u in r.summary.update}
    assert "placement" in summary_keys


def test_failed_job_exits_nonzero_with_the_driver_error(local_cluster, tmp_path):
    result = submit_job(local_cluster, "spin", tmp_path, "training.lr=-1")
    assert result.returncode != 0
    assert "training.lr: must be > 0" in result.stdout + result.stderr
