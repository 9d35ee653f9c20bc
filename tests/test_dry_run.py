"""``--dry-run`` (issue 28): which phases a rerun would reuse and which it would run, and why, from the run folder's
state alone. Here the real ``Run`` writes a folder (its phases' ``process`` a plain function, as in
test_phase_keys) and ``PlannedRun`` reads it; the job-level walk over a real tiny SPIN folder is in
test_phase_keys' in-place-edit test, and each method's finished tiny job is dry-run in test_jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from runfolder.dryrun import NeedsOutput, Pending, PlannedRun, format_report
from runfolder.run import Run
from runfolder.state import LEASE_FILE

ROOT = Path(__file__).resolve().parent.parent


def config(run_dir: Path, *overrides: str):
    from configs.schema import load_config

    return load_config(ROOT / "configs/spin-tiny.yaml", [f"run.dir={run_dir}", "tracking.mode=disabled", *overrides])


def rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(n)]


def answer(todo: list[dict], stop_after: int | None = None):
    for i, row in enumerate(todo):
        if stop_after is not None and i >= stop_after:
            raise KeyboardInterrupt("driver killed")
        yield [{"id": row["id"], "response": "a"}]


SAMPLING = {"temperature": 1.0, "n": 1}
TRAINING = {"lr": 1e-3, "epochs": 1}


def job(run, inputs: list[dict], sampling: dict = SAMPLING, training: dict = TRAINING, world_size: int = 2):
    """A three-phase job as the drivers write one: answers -> a model trained on them -> its eval score."""
    answers = run.row_phase("answers", inputs, answer, context={"model": "content:base", "sampling": sampling})
    key = {"examples": answers, "training": training, "world_size": world_size}
    model = run.once("train", lambda: {"output": "m"}, key=key)
    return run.once("eval", lambda: 0.5, key={"model": model})


def plan(run_dir: Path, *args, **kwargs) -> dict[str, tuple[str, str]]:
    planned = PlannedRun(config(run_dir))
    stopped = None
    try:
        score = job(planned, *args, **kwargs)
        if score > 0.4:  # the job's next step reads a value: a pending one ends the walk
            pass
    except NeedsOutput as need:
        stopped = need
    print(format_report(planned, planned.report(stopped), stopped))
    return {v.phase: (v.action, v.reason) for v in planned.report(stopped)}


def test_dry_run_reuses_what_is_unchanged_and_names_what_changed(tmp_path):
    run = Run(config(tmp_path))
    job(run, rows(4))
    run.close()
    state = (tmp_path / "spin/tiny/state.json").read_bytes()

    assert plan(tmp_path, rows(4)) == {p: ("reuse", "") for p in ("answers", "train", "eval")}

    edited = rows(4)
    edited[1]["messages"][0]["content"] = "another question"
    verdicts = plan(tmp_path, edited, sampling={**SAMPLING, "temperature": 0.7})
    changed = "key changed: rows: 1 of 4 input rows changed; sampling.temperature: 1.0 -> 0.7"
    assert verdicts["answers"] == ("run", changed)
    assert verdicts["train"] == ("run", "upstream answers runs again")
    assert verdicts["eval"] == ("run", "upstream train runs again")

    # a setting of the training phase alone: the answers are reused, training and what it feeds run
    verdicts = plan(tmp_path, rows(4), training={**TRAINING, "lr": 2e-3}, world_size=4)
    assert verdicts["answers"] == ("reuse", "")
    changed = "key changed: training.lr: 0.001 -> 0.002; world_size: 2 -> 4 (pools.train.replicas)"
    assert verdicts["train"] == ("run", changed)
    assert verdicts["eval"] == ("run", "upstream train runs again")
    # the dry runs wrote nothing and took no lease
    assert (tmp_path / "spin/tiny/state.json").read_bytes() == state
    assert not list((tmp_path / "spin/tiny").glob(f"{LEASE_FILE}*"))


def test_dry_run_of_a_fresh_and_of_a_half_done_folder(tmp_path):
    assert set(plan(tmp_path, rows(4)).values()) == {
        ("run", "never ran"), ("run", "upstream answers runs"), ("run", "upstream train runs")
    }  # fmt: skip
    run = Run(config(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run.row_phase("answers", rows(4), lambda todo: answer(todo, stop_after=3), context={"model": "content:base",
                      "sampling": SAMPLING})  # fmt: skip
    run.lease.release()
    assert plan(tmp_path, rows(4))["answers"] == ("run", "half done: 3 of 4 rows done")


def test_a_pending_output_can_be_passed_and_indexed_but_never_read():
    pending = Pending("iter0/generate")
    assert pending["r1"]["response"] is pending and pending.get("r1") is pending
    for read in (bool, len, str, list, hash, lambda p: p == "yes", lambda p: "r1" in p, lambda p: p.strip()):
        with pytest.raises(NeedsOutput) as stop:
            read(pending)
        assert stop.value.phase == "iter0/generate"
