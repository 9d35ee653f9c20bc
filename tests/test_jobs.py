"""The four methods end to end on their tiny configs, each run once the way users launch it: `ray job submit` to
the session's local multi-node cluster (conftest.local_cluster: a head and one node labelled
selfimprove/pool=<role> per pool), every pool pinned to its node by label_selector. Each test checks the
method's logic and that every pool ran on its labelled node and nowhere else. Then a failed job's exit, and
driver-kill resume on the embedded default (the driver starts its own Ray)."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from conftest import GENERATOR_ONLY, submit_job, submitted
from test_wandb import read_records

from cluster import local
from cluster.local import LABEL_KEY
from jobs.report import main as report_main

ROOT = Path(__file__).resolve().parent.parent


def submit(cluster: dict, method: str, run_dir: Path, *overrides: str, pools: set[str]) -> dict:
    """The method's tiny job through `ray job submit`; its summary, once its pools were placed as labelled."""
    return placed_as_labelled(cluster, submitted(cluster, method, run_dir, *overrides), pools)


def placed_as_labelled(cluster: dict, run: Path, pools: set[str]) -> dict:
    """The finished run's summary, once every pool in ``pools`` (and any other it placed) ran only on nodes
    labelled for that pool, as the summary and the W&B run both record."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert "joined" in (run / "driver.log").read_text()  # the driver joined the submitted-to cluster
    placement = summary["placement"]
    assert pools <= set(placement), placement
    live = local.load_state(Path(cluster["dir"]))  # nodes added later count
    for pool, replicas in placement.items():
        assert replicas, f"{pool}: no replica recorded"
        labelled = {n["node_id"] for n in live["nodes"].values() if n["role"] == pool}
        for replica in replicas:
            assert replica["labels"].get(LABEL_KEY) == pool and replica["node_id"] in labelled, (pool, replica)
    assert len(placement["train"]) == 2  # one entry per rank
    # W&B gets the same record: the session's main offline run has it in its config and its summary.
    (wandb_file,) = glob.glob(str(run / "wandb/offline-run-*-s1/run-*.wandb"))
    records = read_records(wandb_file)
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update}
    assert config["placement"] == placement
    assert "placement" in {u.key for r in records if r.HasField("summary") for u in r.summary.update}
    return summary


def ids(path: Path) -> list[str]:
    return pq.read_table(path).column("id").to_pylist()


def test_spin_two_iterations(local_cluster, spin_job):
    # conftest.SPIN_JOB: SFT first, each iteration's own peak lr (spin.lr) held by a constant schedule so the last
    # step shows it, held-out rewards, and every eval also reworded and by label log-likelihood.
    run = spin_job
    summary = placed_as_labelled(local_cluster, run, {"generator", "train"})
    m = summary["metrics"]
    phases = json.loads((run / "state.json").read_text())["phases"]
    assert [phases[f"iter{t}/spin"]["result"]["final"]["lr"] for t in (0, 1)] == pytest.approx([3e-3, 2e-3])
    assert m["iter0/spin/truncation"]["sequences"] == 16  # 8 pairs, chosen and rejected
    assert {"iter0/eval/accuracy", "iter1/eval/accuracy", "iter2/eval/accuracy"} <= set(m)
    assert m["iter0/pairs/rows"] == {"prompts": 8, "pairs": 8, "dropped": 0}
    pairs0 = pq.read_table(run / "phases/iter0/spin-data.parquet").to_pylist()
    pairs1 = pq.read_table(run / "phases/iter1/spin-data.parquet").to_pylist()
    assert len(pairs0) == 8 and len(pairs1) == 16  # iteration 1 mixes in iteration 0's pairs
    assert all(p["chosen"] != p["rejected"] for p in pairs0)
    sft = pq.read_table(run / "phases/sft-data.parquet").to_pylist()
    assert len(sft) == 8 and all(e["response"] for e in sft)  # SPIN starts from an SFT'd model
    gen0 = pq.read_table(run / "phases/iter0/generate.parquet").to_pylist()
    assert all(g["model"].endswith("models/sft") for g in gen0)
    gen1 = pq.read_table(run / "phases/iter1/generate.parquet").to_pylist()
    assert all(g["model"].endswith("models/iter0/spin") and g["iteration"] == 1 for g in gen1)  # model 1 generated
    assert json.loads(gen1[0]["sampling"])["temperature"] == 1.0
    assert (run / "models/iter1/spin/config.json").exists() and (run / "summary.json").exists()
    assert set(summary["pool_idle_s"]) >= {"generator", "train"}
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    # every eval also under the reworded instruction, and by label log-likelihood under both wordings
    for t in (0, 1, 2):
        assert [m[f"iter{t}/eval{v}/n"] for v in ("", "_reworded", "_loglik", "_reworded_loglik")] == [4] * 4
    # held-out rewards of iteration 1 (model 2 against model 1, β 0.5) are the scores each model gave
    score = lambda name: {k: v[0] for k, v in phases[name]["result"].items()}  # noqa: E731
    gold1, gold2 = score("iter1/heldout-gold"), score("iter2/heldout-gold")
    own1, own1_under2 = score("iter1/heldout-own"), score("iter2/heldout-previous-own")
    real = [0.5 * (gold2[k] - gold1[k]) for k in gold1]
    generated = [0.5 * (own1_under2[k] - own1[k]) for k in gold1]
    assert m["iter2/heldout/n"] == 4 and "iter0/heldout/reward_margin" not in m
    assert m["iter2/heldout/reward_real"] == pytest.approx(sum(real) / 4, abs=1e-4)
    assert m["iter2/heldout/reward_margin"] == pytest.approx((sum(real) - sum(generated)) / 4, abs=1e-4)
    assert m["iter2/heldout/reward_accuracy"] == sum(r > g for r, g in zip(real, generated)) / 4
    assert m["iter2/heldout/gold_logprob_per_token"] < 0


def test_s3ft_buckets_and_baseline(local_cluster, tmp_path):
    summary = submit(local_cluster, "s3ft", tmp_path, pools={"generator", "judge", "train"})
    m = summary["metrics"]
    assert sum(m[f"buckets/{b}"] for b in ("own", "paraphrase", "gold")) == pytest.approx(1.0)
    targets = pq.read_table(tmp_path / "s3ft/tiny/phases/s3ft-data.parquet").to_pylist()
    assert len(targets) == 6 and {t["bucket"] for t in targets} <= {"own", "paraphrase", "gold"}
    for key in ("base/eval/accuracy", "s3ft/eval/accuracy", "sft/eval/accuracy", "s3ft/general/accuracy"):
        assert key in m
    # MBPP has no rule verifier: the LLM judge ran on the judge pool and its unparseable output was counted.
    assert "judge" in summary["pool_idle_s"]
    judged = pq.read_table(tmp_path / "s3ft/tiny/phases/judge-own.parquet").to_pylist()
    assert len(judged) == 6 and summary["failed_rows"] == {}  # every row answered and judged
    assert m["judge-own/unknown_verdicts"] == sum(v["verdict"] == "unknown" for v in judged)
    assert_report_has(tmp_path / "s3ft/tiny", "Bucket fractions", "s3ft-data")
    # The general benchmark (ARC-Easy) was scored by likelihood: same decisions and gold log-likelihoods as a
    # transformers forward; the mean gold log-prob per char (forgetting before any decision flips) is reported.
    assert m["base/general/n"] == 4
    state = json.loads((tmp_path / "s3ft/tiny/state.json").read_text())
    scored = state["phases"]["base/general-loglik"]["result"]
    expected = loglik_verdicts("arc_easy", 4)
    assert {k: v["verdict"] for k, v in scored.items()} == {k: v for k, (v, _) in expected.items()}
    for key, (_, gold_logprob) in expected.items():
        assert scored[key]["gold_logprob_per_char"] == pytest.approx(gold_logprob, abs=1e-3)
    mean = sum(lp for _, lp in expected.values()) / 4
    assert m["base/general/gold_logprob_per_char"] == pytest.approx(mean, abs=1e-3)
    assert m["sft/general/gold_logprob_per_char"] != m["base/general/gold_logprob_per_char"]  # SFT moved it


def loglik_verdicts(dataset: str, n: int) -> dict[str, tuple[str, float]]:
    """Independent acc_norm decisions of the tiny model, with the gold answer's log-prob per char: every candidate
    scored by a float32 transformers forward."""
    from actors.engine import HFEngine, render_prompt, response_ids
    from cluster.models import resolve_model
    from data.rows import likelihood_question, load_dataset, take

    engine = HFEngine(resolve_model("tiny-random"), dtype="float32")
    verdicts = {}
    for row in take(load_dataset(dataset)[0], n, 0):
        messages, candidates, gold = likelihood_question(row)
        prompt = render_prompt(engine.tokenizer, messages)
        scores = engine.score([prompt] * len(candidates), [response_ids(engine.tokenizer, c) for c in candidates])
        per_char = [sum(s) / len(c) for s, c in zip(scores, candidates)]
        verdicts[row["id"]] = ("yes" if per_char.index(max(per_char)) == gold else "no", per_char[gold])
    return verdicts


def test_llm2llm_restarts_from_base_and_accumulates(local_cluster, tmp_path):
    overrides = ["teacher.max_attempts=1", "llm2llm.matched_steps_control=true"]
    summary = submit(local_cluster, "llm2llm", tmp_path, *overrides, pools={"generator", "teacher", "train"})
    run = tmp_path / "llm2llm" / "tiny"
    state = json.loads((run / "state.json").read_text())
    assert {"iter0/student", "iter1/student", "iter0/augment"} <= set(state["phases"])
    seed_ids = set(ids(run / "phases/iter0/student-data.parquet"))
    assert len(seed_ids) == 6 and seed_ids <= set(ids(run / "phases/iter1/student-data.parquet"))
    # GSM8K has a rule verifier: a random-weight student gets no sum right, so every seed example is wrong.
    verdicts = pq.read_table(run / "phases/iter0/judge-seed.parquet").to_pylist()
    assert len(verdicts) == 6 and summary["failed_rows"] == {}
    assert summary["metrics"]["iter0/wrong_seed"] == sum(v["verdict"] != "yes" for v in verdicts) == 6
    assert "teacher" in summary["pool_idle_s"]
    teacher = summary["metrics"]["iter0/teacher"]  # every parsed reply is kept, unlabelled or a duplicate
    kept = teacher["parsed"] - teacher["unlabelled"] - teacher["duplicates"]
    assert kept == summary["metrics"]["iter0/new_examples"] == len(ids(run / "phases/iter0/augment.parquet"))
    assert_report_has(run, "Augmentation", "iter1/student-data")
    # the seed-only control: as many rows and optimizer steps as the last student, only seed examples
    m = summary["metrics"]
    control, last = ids(run / "phases/control/student-data.parquet"), ids(run / "phases/iter1/student-data.parquet")
    assert len(control) == len(last) == m["control/data_size"] and {i.split("#")[0] for i in control} == seed_ids
    assert m["control/student/steps"] == m["iter1/student/steps"] and "control/eval/accuracy" in m
    assert m["iter1/instruction_wordings"] == 1  # the teacher's examples sit in their seed's instruction


def assert_report_has(run: Path, chart: str, sample_phase: str) -> None:
    """jobs.report on a real tiny run: every chart it links exists, and the method's own chart and samples show."""
    page = report_main([str(run)])
    text = page.read_text()
    for section in ("Eval accuracy", "Phase timings", chart):
        assert f"<h2>{section}</h2><img" in text
    for src in re.findall(r'<img src="([^"]+)"', text):
        assert (page.parent / src).read_bytes()[:4] == b"\x89PNG"
    assert f"<h3>{sample_phase}" in text


def test_aft_propose_and_aggregate(local_cluster, tmp_path):
    summary = submit(local_cluster, "aft", tmp_path, pools={"generator", "train"})
    run = tmp_path / "aft" / "tiny"
    examples = pq.read_table(run / "phases/aft-data.parquet").to_pylist()
    kinds = [e["kind"] for e in examples]
    assert kinds.count("propose") == 6 and kinds.count("aggregate") == 6
    assert summary["metrics"]["aft/aggregate-examples/rows"] == {"queries": 6, "aggregate_examples": 6, "dropped": 0}
    # proposal_model=sft: the drafts come from the SFT'd model, which was trained before them
    drafts = pq.read_table(run / "phases/proposals.parquet").to_pylist()
    assert {d["model"] for d in drafts} == {str((run / "models" / "sft").resolve())}
    aggregate = next(e for e in examples if e["kind"] == "aggregate")
    assert aggregate["messages"][0]["role"] == "system" and "1. " in aggregate["messages"][0]["content"]
    state = json.loads((run / "state.json").read_text())
    layers = next(iter(state["phases"]["aft/propose-and-aggregate"]["result"].values()))["layers"]
    assert [len(x) for x in layers] == [2, 2, 1]
    assert "aft/propose_aggregate/accuracy" in summary["metrics"] and "aft/single/accuracy" in summary["metrics"]
    assert {"aft/layer0/accuracy", "aft/layer1/accuracy"} <= set(summary["metrics"])
    # the SFT model on the same queries, greedy and with propose-and-aggregate (aft.baseline_sft)
    assert {"sft/eval/accuracy", "sft/propose_aggregate/accuracy", "sft/layer1/accuracy"} <= set(summary["metrics"])
    assert len(state["phases"]["sft/propose-and-aggregate"]["result"]) == 4


# The pools each method's tiny job places, and the overrides that also exercise per-model templates: LLM2LLM's
# teacher is a model with a template of its own; S3FT's judge (the base model) is given one (judge.chat_template).
BASE_MODEL_JOBS = {
    "spin": ({"generator", "train"}, []),
    "s3ft": ({"generator", "judge", "train"}, ["judge.chat_template={llama3}"]),
    "llm2llm": ({"generator", "teacher", "train"}, ["teacher.model=tiny-random", "teacher.max_attempts=1"]),
    "aft": ({"generator", "train"}, []),
}


def test_four_methods_on_a_model_without_a_chat_template(local_cluster, tmp_path):
    """Each method's tiny job on tiny-random-base (tiny-random without a chat template, as a base model such as
    Llama-2-7b-hf): it runs through, prompts and targets in the plain format, its generated texts cut where the
    format ends a turn, each model's format logged once and recorded in the summary."""
    from test_chat_template import LLAMA3_STYLE

    from actors.chat import PLAIN_STOP

    llama3 = tmp_path / "llama3.jinja"
    llama3.write_text(LLAMA3_STYLE)
    for method, (pools, extra) in BASE_MODEL_JOBS.items():
        overrides = ["model.name=tiny-random-base", *(o.format(llama3=llama3) for o in extra)]
        summary = submit(local_cluster, method, tmp_path / method, *overrides, pools=pools)
        run = tmp_path / method / method / "tiny"
        formats = summary["metrics"]["chat_format"]
        plain = formats["model.name"]
        assert plain.startswith("the plain format") and plain.endswith("[the model has none]")
        log = (run / "driver.log").read_text()
        assert log.count("chat format of model.name") == 1
        if method == "s3ft":
            assert formats["judge.model"].endswith("[judge.chat_template]") and "'<|eot_id|>'" in formats["judge.model"]
        elif method == "llm2llm":
            assert formats["teacher.model"] == "a chat template whose turn ends with '<|im_end|>\\n' [the model's own]"
            assert formats["judge.model"] == formats["model.name"]
        generated = [
            row
            for part in run.glob("phases/**/*.parquet")
            if "samples" in pq.read_schema(part).names
            for row in pq.read_table(part, columns=["samples"]).column("samples").to_pylist()
        ]
        texts = [text for samples in generated for text in samples]
        assert texts, f"{method}: no generated rows"
        assert all(PLAIN_STOP not in t and t == t.rstrip() for t in texts), method


def test_failed_job_exits_nonzero_with_the_driver_error(local_cluster, tmp_path):
    result = submit_job(local_cluster, "spin", tmp_path, "training.lr=-1")
    assert result.returncode != 0
    assert "training.lr: must be > 0" in result.stdout + result.stderr


def _kill_tree(proc: subprocess.Popen) -> None:
    """The driver started its own embedded Ray: stop exactly those processes (never `ray stop`)."""
    try:
        parent = psutil.Process(proc.pid)
        children = parent.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in [parent, *children]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def test_killed_driver_resumes_without_lost_or_duplicated_rows(tmp_path):
    # The embedded default: the driver starts its own Ray. Killed with its whole process tree mid-phase, then rerun.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-c",
        GENERATOR_ONLY,
        "--config",
        "configs/spin-tiny.yaml",
        "run.method=smoke",
        f"run.dir={tmp_path}",
        "data.n_train=48",
        "engine.batch_size=2",
        "generation.max_tokens=64",
    ]
    run = tmp_path / "smoke" / "tiny"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    parts = run / "phases/generator-answers"
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and len(list(parts.glob("part-*.parquet"))) < 2:
            time.sleep(0.05)
        assert len(list(parts.glob("part-*.parquet"))) >= 2, "generation never started"
    finally:
        _kill_tree(proc)  # killed mid-phase: some batches written, the rest not
        proc.wait()
    kept = [i for p in parts.glob("part-*.parquet") for i in ids(p)]
    assert 0 < len(kept) < 48, f"kill landed outside the generation phase ({len(kept)} rows kept)"
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    generated = ids(run / "phases/generator-answers.parquet")
    assert len(generated) == len(set(generated)) == 48  # nothing lost, nothing duplicated
    assert set(kept) <= set(generated)
    assert "rows from an interrupted run kept" in (run / "driver.log").read_text()
    assert (run / "DONE").exists()
