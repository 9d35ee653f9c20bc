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
from conftest import GENERATOR_ONLY, job_command, submit_job, submitted
from test_phase_keys import dry_run
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


def assert_dry_run_reuses_everything(cluster: dict, method: str, run_dir: Path, *overrides: str) -> None:
    """``--dry-run`` of the finished job with the command line it was submitted with: every phase it finished is
    reused (the walk computes each key as the job did, from the folder alone, with no Ray)."""
    state = json.loads((run_dir / method / "tiny" / "state.json").read_text())
    verdicts = dry_run(job_command(cluster, method, run_dir, *overrides))
    assert verdicts == {phase: ("reuse", "") for phase in state["phases"]}


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


# S3FT, LLM2LLM and AFT run on tiny-random-base: tiny-random without a chat template, as a base model such as
# Llama-2-7b-hf (SPIN's plain format runs in tests/test_phase_keys.py). The overrides also exercise per-model
# templates: S3FT's judge (the base model) is given one (judge.chat_template); LLM2LLM's teacher has its own.
BASE_MODEL = "model.name=tiny-random-base"


def assert_plain_format(summary: dict, run: Path) -> None:
    """A job on tiny-random-base ran in the plain format: each model's format logged once and recorded in the
    summary, and every generated text cut where the format ends a turn."""
    from actors.chat import PLAIN_STOP

    formats = summary["metrics"]["chat_format"]
    plain = formats["model.name"]
    assert plain.startswith("the plain format") and plain.endswith("[the model has none]")
    assert (run / "driver.log").read_text().count("chat format of model.name") == 1
    generated = [
        row
        for part in run.glob("phases/**/*.parquet")
        if "samples" in pq.read_schema(part).names
        for row in pq.read_table(part, columns=["samples"]).column("samples").to_pylist()
    ]
    texts = [text for samples in generated for text in samples]
    assert texts, "no generated rows"
    assert all(PLAIN_STOP not in t and t == t.rstrip() for t in texts)


def test_s3ft_buckets_and_baseline(local_cluster, tmp_path):
    from test_chat_template import LLAMA3_STYLE

    llama3 = tmp_path / "llama3.jinja"
    llama3.write_text(LLAMA3_STYLE)
    overrides = [BASE_MODEL, f"judge.chat_template={llama3}"]
    summary = submit(local_cluster, "s3ft", tmp_path, *overrides, pools={"generator", "judge", "train"})
    assert_plain_format(summary, tmp_path / "s3ft/tiny")
    judge_format = summary["metrics"]["chat_format"]["judge.model"]
    assert judge_format.endswith("[judge.chat_template]") and "'<|eot_id|>'" in judge_format
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
    expected = loglik_verdicts("tiny-random-base", "arc_easy", 4)
    assert {k: v["verdict"] for k, v in scored.items()} == {k: v for k, (v, _) in expected.items()}
    for key, (_, gold_logprob) in expected.items():
        assert scored[key]["gold_logprob_per_char"] == pytest.approx(gold_logprob, abs=1e-3)
    mean = sum(lp for _, lp in expected.values()) / 4
    assert m["base/general/gold_logprob_per_char"] == pytest.approx(mean, abs=1e-3)
    assert m["sft/general/gold_logprob_per_char"] != m["base/general/gold_logprob_per_char"]  # SFT moved it
    assert_dry_run_reuses_everything(local_cluster, "s3ft", tmp_path, *overrides)


def loglik_verdicts(model: str, dataset: str, n: int) -> dict[str, tuple[str, float]]:
    """Independent acc_norm decisions of ``model`` (its chat format, or the plain one), with the gold answer's
    log-prob per char: every candidate scored by a float32 transformers forward."""
    from actors.engine import HFEngine, render_prompt, response_ids
    from cluster.models import resolve_model
    from data.rows import likelihood_question, load_dataset, take

    engine = HFEngine(resolve_model(model), dtype="float32")
    verdicts = {}
    for row in take(load_dataset(dataset)[0], n, 0):
        messages, candidates, gold = likelihood_question(row)
        prompt = render_prompt(engine.tokenizer, messages)
        scores = engine.score([prompt] * len(candidates), [response_ids(engine.tokenizer, c) for c in candidates])
        per_char = [sum(s) / len(c) for s, c in zip(scores, candidates)]
        verdicts[row["id"]] = ("yes" if per_char.index(max(per_char)) == gold else "no", per_char[gold])
    return verdicts


def test_llm2llm_restarts_from_base_and_accumulates(local_cluster, tmp_path):
    overrides = [BASE_MODEL, *LORA_JOB, "teacher.model=tiny-random", "teacher.max_attempts=1"]
    overrides.append("llm2llm.matched_steps_control=true")
    summary = submit(local_cluster, "llm2llm", tmp_path, *overrides, pools={"generator", "teacher", "train"})
    run = tmp_path / "llm2llm" / "tiny"
    assert_plain_format(summary, run)
    assert_lora_models("llm2llm", run, summary)
    formats = summary["metrics"]["chat_format"]
    assert formats["teacher.model"] == "a chat template whose turn ends with '<|im_end|>\\n' [the model's own]"
    assert formats["judge.model"] == formats["model.name"]
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
    assert_dry_run_reuses_everything(local_cluster, "llm2llm", tmp_path, *overrides)


def assert_report_has(run: Path, chart: str, sample_phase: str) -> None:
    """jobs.report on a real tiny run: every chart it links exists, and the method's own chart and samples show."""
    page = report_main([str(run)])
    text = page.read_text()
    for section in ("Eval accuracy", "Phase timings", chart):
        assert f"<h2>{section}</h2><img" in text
    for src in re.findall(r'<img src="([^"]+)"', text):
        assert (page.parent / src).read_bytes()[:4] == b"\x89PNG"
    assert f"<h3>{sample_phase}" in text


# evaluation.mt_bench on the AFT job: the AFT model against the model evaluated before it (the SFT baseline), on 3
# questions (writing, roleplay, reasoning: both judge prompts) and both turns; the tiny model's verdicts are garbage.
MT_BENCH = [
    "evaluation.mt_bench.enabled=true",
    "evaluation.mt_bench.questions=3",
    "evaluation.mt_bench.turns=2",
    "evaluation.mt_bench.max_tokens=8",
    "evaluation.mt_bench.judge_max_tokens=8",
    "evaluation.mt_bench.max_unparseable_fraction=1.0",
    "engine.max_model_len=1024",  # the multi-turn math prompt holds GPT-4's two reference answers
]


def test_aft_propose_and_aggregate(local_cluster, tmp_path):
    overrides = [BASE_MODEL, *LORA_JOB, *MT_BENCH]
    summary = submit(local_cluster, "aft", tmp_path, *overrides, pools={"generator", "judge", "train"})
    run = tmp_path / "aft" / "tiny"
    assert_plain_format(summary, run)
    assert_lora_models("aft", run, summary)
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
    check_mt_bench(run, summary["metrics"])
    assert_dry_run_reuses_everything(local_cluster, "aft", tmp_path, *overrides)


def check_mt_bench(run: Path, metrics: dict) -> None:
    from actors.judge import parse_fastchat_verdict

    result = metrics["aft/single/mt_bench"]
    assert (result["label"], result["vs"]) == ("aft/single", "sft")
    assert (result["model"], result["vs_model"]) == (
        str((run / "models/aft").resolve()),
        str((run / "models/sft").resolve()),
    )
    assert result["games"] == 6 and result["questions"] == 3 and result["turns"] == 2
    # every game judged in both orders: each order's verdicts add up to the games, both to questions x turns x 2
    assert [sum(result["verdicts"][o].values()) for o in ("first", "swapped")] == [6, 6]
    assert sum(result[k] for k in ("win", "tie", "lose", "unparseable", "failed")) == 6 and result["failed"] == 0
    judgments = pq.read_table(run / "phases/mt_bench/aft/single-vs-sft-judgments.parquet").to_pylist()
    assert len(judgments) == 12 and {j["order"] for j in judgments} == {"first", "swapped"}
    prompts = {(j["question_id"], j["turn"]): j["judge_prompt"] for j in judgments}
    assert prompts == {
        (81, 1): "pair-v2",
        (81, 2): "pair-v2-multi-turn",
        (91, 1): "pair-v2",
        (91, 2): "pair-v2-multi-turn",
        (101, 1): "pair-math-v1",
        (101, 2): "pair-math-v1-multi-turn",
    }
    for j in judgments:  # each verdict is what FastChat's format reads in the judge's text; none is made a tie
        parsed = parse_fastchat_verdict(j["judgment"])
        assert j["verdict"] == ("unparseable" if parsed == "unknown" else parsed)
    unreadable = {(j["question_id"], j["turn"]) for j in judgments if j["verdict"] == "unparseable"}
    assert result["unparseable"] == len(unreadable)
    assert sum(result["verdicts"][o]["unparseable"] for o in ("first", "swapped")) == 12 - sum(
        j["verdict"] != "unparseable" for j in judgments
    )
    # turn 2 was asked after the model's own first answer: the judge sees each model's conversation
    own = {
        r["id"]: r["response"]
        for r in pq.read_table(run / "phases/mt_bench/aft/single/answers-turn1-t0.7.parquet").to_pylist()
    }
    second = next(j for j in judgments if (j["question_id"], j["turn"], j["order"]) == (81, 2, "first"))
    assert f"### Assistant A:\n{own['mtbench-81']}\n\n### User:\n" in second["prompt"]
    if result["decided"]:
        low, high = result["ci95"]
        assert 0.0 <= low <= result["win_rate"] <= high <= 1.0
        assert metrics["aft/single/mt_bench/win_rate"] == result["win_rate"]
    else:  # nothing decided: no rate and no interval, not 0.5 from ties
        assert result["win_rate"] is None and result["ci95"] is None and "aft/single/mt_bench/win_rate" not in metrics
    html = report_main([str(run)]).read_text()
    assert "MT-Bench pairwise" in html and "aft/single" in html


# LoRA adapters (training.peft) in every training phase of the LLM2LLM and AFT tiny jobs, and of SPIN's in
# tests/test_phase_keys.py, whose iterations adapt fewer modules (training.preference.peft: the per-phase section).
LORA_JOB = ["training.peft.enabled=true", "training.peft.r=4", "training.peft.lora_alpha=8", "training.lr=1e-2"]
SPIN_TARGETS = ["q_proj", "v_proj"]


def assert_lora_models(method: str, run: Path, summary: dict, wandb: bool = True) -> None:
    """Every training phase of a LoRA job wrote a merged HF folder with its adapter inside, loadable with
    PeftModel.from_pretrained on the folder it was trained on; SPIN's iteration t+1 trained on model t's merged
    folder; the summary has each phase's trainable and total parameters; W&B's artifacts name base and adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = sorted(run.glob("models/**/adapter/adapter_config.json"))
    assert adapters, f"{method}: no adapter folder"
    metrics = summary["metrics"]
    for config_file in adapters:
        model_dir, adapter = config_file.parent.parent, config_file.parent
        phase = str(model_dir.relative_to(run / "models"))
        settings = json.loads(config_file.read_text())
        base = settings["base_model_name_or_path"]
        trainable, total = metrics[f"{phase}/parameters"]["trainable"], metrics[f"{phase}/parameters"]["total"]
        assert 0 < trainable < 0.01 * total, (phase, trainable, total)
        if method == "spin" and phase.endswith("/spin"):  # training.preference.peft's modules; SFT's are all-linear
            assert sorted(settings["target_modules"]) == SPIN_TARGETS, phase
            if phase == "iter1/spin":  # iteration 1 continues from iteration 0's merged model, with a fresh adapter
                assert Path(base) == (run / "models/iter0/spin").resolve(), base
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
        assert (model_dir / "config.json").exists() and not (model_dir / "adapter_model.safetensors").exists()
    if not wandb:
        return
    artifacts = {}
    for wandb_file in glob.glob(str(run / "wandb/offline-run-*/run-*.wandb")):
        for r in read_records(wandb_file):
            if r.HasField("artifact") and not r.artifact.use_after_commit:
                artifacts[r.artifact.name] = json.loads(r.artifact.metadata or "{}")
    last = adapters[-1].parent.parent.relative_to(run / "models")
    name = f"{method}-tiny-model-{str(last).replace('/', '-')}"
    assert artifacts[name]["merged"] and artifacts[name]["adapter_artifact"] == f"{name}-adapter", artifacts[name]
    assert artifacts[f"{name}-adapter"]["base_model"] == artifacts[name]["base_model"] and artifacts[name]["r"] == 4


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
