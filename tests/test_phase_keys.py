"""Every result keyed by everything it depends on (issue 28): input rows by content, settings, the models a phase
runs and the upstream outputs it reads; scratch files belong to one key; unreadable parts are recomputed; durable,
unmasked writes. These drive the real ``Run`` (no Ray needed: a phase's ``process`` is a plain function here,
because what is under test is which rows the run folder asks it for)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from configs.schema import load_config
from runfolder.blocks import Blocks, part_name
from runfolder.run import KEY_FILE, PhaseFailedError, Run, write_parquet
from runfolder.state import changed_keys, config_fingerprint

ROOT = Path(__file__).resolve().parent.parent


def config(run_dir: Path, *overrides: str):
    return load_config(ROOT / "configs/spin-tiny.yaml", [f"run.dir={run_dir}", "tracking.mode=disabled", *overrides])


def rows(n: int, prompt: str = "q") -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"{prompt}{i}"}]} for i in range(n)]


class Recorder:
    """A phase's process: answers each row from its prompt and the model it is told it runs, recording the ids."""

    def __init__(self, model: str = "m0", stop_after: int | None = None):
        self.model, self.stop_after, self.seen = model, stop_after, []

    def __call__(self, todo: list[dict]):
        for i, row in enumerate(todo):
            if self.stop_after is not None and i >= self.stop_after:
                raise KeyboardInterrupt("driver killed")
            self.seen.append(row["id"])
            yield [{"id": row["id"], "response": f"{self.model}:{row['messages'][0]['content']}"}]


def test_a_finished_phase_runs_again_when_its_model_changes_and_not_otherwise(tmp_path):
    run = Run(config(tmp_path))
    first = Recorder("m0")
    run.row_phase("answers", rows(3), first, context={"model": "phase:aaaa"})
    again = Recorder("m0")
    run.row_phase("answers", rows(3), again, context={"model": "phase:aaaa"})
    assert again.seen == []  # same key: reused
    newer = Recorder("m1")
    out = run.row_phase("answers", rows(3), newer, context={"model": "phase:bbbb"})
    assert newer.seen == ["r0", "r1", "r2"] and {r["response"][:2] for r in out} == {"m1"}
    assert run.state["phases"]["answers"]["key_parts"]["model"] != ""
    run.close()


def test_a_prompt_edited_under_the_same_id_is_generated_again(tmp_path):
    run = Run(config(tmp_path))
    with pytest.raises(KeyboardInterrupt):  # a half-done phase: 2 of 4 rows written
        run.row_phase("answers", rows(4), Recorder(stop_after=2))
    edited = rows(4)
    edited[1]["messages"][0]["content"] = "a different question"
    rest = Recorder()
    out = run.row_phase("answers", edited, rest)
    assert rest.seen == ["r1", "r2", "r3"]  # r0 kept; r1's old answer was for another prompt
    assert {r["id"]: r["response"] for r in out}["r1"] == "m0:a different question"
    # and once finished, an edit under the same id makes the finished phase run again
    edited[3]["messages"][0]["content"] = "edited after the phase finished"
    later = Recorder()
    out = run.row_phase("answers", edited, later)
    assert later.seen == ["r0", "r1", "r2", "r3"]
    run.close()


def test_parts_made_under_another_model_are_dropped(tmp_path):
    run = Run(config(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run.row_phase("answers", rows(4), Recorder("m0", stop_after=2), context={"model": "m0"})
    rest = Recorder("m1")
    out = run.row_phase("answers", rows(4), rest, context={"model": "m1"})
    assert rest.seen == ["r0", "r1", "r2", "r3"] and all(r["response"].startswith("m1:") for r in out)
    run.close()


def test_a_truncated_part_is_set_aside_and_its_rows_recomputed(tmp_path):
    run = Run(config(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run.row_phase("answers", rows(4), Recorder(stop_after=2))
    parts = sorted((run.dir / "phases/answers").glob("part-*.parquet"))
    parts[0].write_bytes(b"")  # a power loss left a zero-length part
    rest = Recorder()
    out = run.row_phase("answers", rows(4), rest)
    assert rest.seen == ["r0", "r2", "r3"] and len(out) == 4
    assert len(run.state["set_aside"]) == 1 and list((run.dir / "phases/set-aside").iterdir())
    # a finished phase's file torn the same way is recomputed too, not a crash
    (run.dir / "phases/answers.parquet").write_bytes(b"PAR1")
    again = Recorder()
    assert len(run.row_phase("answers", rows(4), again)) == 4 and again.seen == ["r0", "r1", "r2", "r3"]
    summary = run.close()
    assert summary["set_aside"] == 2


def _blocks(folder: Path, prompts: list[str]) -> Blocks:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        write_parquet(folder / part_name(k), rows(3, prompts[k]))
    return Blocks.of(folder)


def test_a_finished_streamed_phase_whose_inputs_changed_runs_again(tmp_path):
    run = Run(config(tmp_path))
    source = tmp_path / "source"
    calls: list[str] = []

    def process(todo):
        calls.extend(r["messages"][0]["content"] for r in todo)
        return [{"id": r["id"], "response": r["messages"][0]["content"].upper()} for r in todo]

    run.block_phase("gen", _blocks(source, ["a", "b"]), process)
    assert len(calls) == 6
    calls.clear()
    out = run.block_phase("gen", _blocks(source, ["c", "d"]), process)  # the same ids, other prompts
    assert len(calls) == 6 and {r["response"][0] for _, b in out.blocks() for r in b} == {"C", "D"}
    calls.clear()
    run.block_phase("gen", _blocks(source, ["c", "d"]), process)
    assert calls == []  # unchanged now: reused
    run.close()


def test_scratch_files_of_another_key_go_when_a_finished_phase_runs_again(tmp_path):
    """SPIN's reference log-probs (a training phase's scratch) belong to the phase's key."""
    run = Run(config(tmp_path))
    scratch = run.dir / "phases" / "iter0/spin-train"

    def train(tag: str):
        def fit():
            reference = scratch / "reference_logps.json"
            assert not reference.exists(), "stale reference log-probs of other inputs were kept"
            reference.write_text(json.dumps({"tag": tag}))
            return {"output": tag}

        return fit

    run.once("iter0/spin", train("a"), key={"examples": rows(2)}, scratch=scratch)
    assert (scratch / KEY_FILE).exists()
    run.once("iter0/spin", train("b"), key={"examples": rows(3)}, scratch=scratch)
    assert json.loads((scratch / "reference_logps.json").read_text()) == {"tag": "b"}
    run.close()


def test_models_are_named_by_the_phase_that_made_them_or_by_their_content(tmp_path):
    run = Run(config(tmp_path))
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights-1")
    first = run.model_key(folder)
    assert first.startswith("content:") and run.model_key(folder) == first
    (folder / "model.safetensors").write_bytes(b"weights-2")
    run._digests.clear()  # a new driver session: the folder is hashed again
    assert run.model_key(folder) != first
    trained = run.dir / "models/sft"
    run.register_model(str(trained), "k123")
    assert run.model_key(trained) == "phase:k123"
    run.close()


def test_config_fingerprint_sees_an_entry_added_inside_a_dict_option(tmp_path):
    before = config_fingerprint(config(tmp_path))
    after = config_fingerprint(config(tmp_path, "data.columns={prompt: question}"))
    changed = changed_keys(before, after)
    assert changed and changed[0].startswith("data.columns: {} -> {'prompt': 'question'}")


def test_an_all_failed_scored_phase_fails_instead_of_reporting_zero(tmp_path):
    run = Run(config(tmp_path))

    def score():
        run.account("eval-loglik", {f"r{i}": "not scored" for i in range(4)}, 4)
        return {}

    with pytest.raises(PhaseFailedError, match="4 of 4 rows failed"):
        run.once("eval-loglik", score, key={"rows": rows(4)})
    assert not run.done("eval-loglik")
    failed = pq.read_table(run.failed_path("eval-loglik")).to_pylist()
    assert [f["id"] for f in failed] == ["r0", "r1", "r2", "r3"]
    run.close()


def test_an_error_while_closing_never_masks_the_error_that_ended_the_run(tmp_path):
    run = Run(config(tmp_path))
    (run.dir / "summary.json").mkdir()  # the summary cannot be written
    summary = run.close(error=ValueError("the real error"))
    assert summary["status"] == "failed" and "the real error" in summary["error"]


def _gsm8k_rows(path: Path, n: int, offset: int, prefix: str) -> None:
    lines = [
        {"id": f"{prefix}{i}", "prompt": f"What is {i} plus {offset}?"}
        | {"answer": f"{i} + {offset} = {i + offset}\n#### {i + offset}"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.mark.slow
def test_an_in_place_edit_of_the_training_data_reruns_every_dependent_eval(tmp_path):
    """The scenario of issue 28: same data.train path, other answers. Training runs again, and so must every
    evaluation of the models it made (their key names the model by its training phase's key, not its path)."""
    import os
    import subprocess
    import sys

    from test_jobs import LORA_JOB, SPIN_TARGETS, assert_lora_models, assert_plain_format

    from training.worker import native_bf16

    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    _gsm8k_rows(train, 8, 3, "t")
    _gsm8k_rows(held_out, 4, 100, "e")
    command = [
        sys.executable, "-m", "jobs.spin", "--config", "configs/spin-tiny.yaml", f"run.dir={tmp_path / 'runs'}",
        "tracking.mode=disabled", f"data.train={train}", f"data.eval={held_out}", "data.n_train=0", "data.n_eval=0",
        "data.task=gsm8k", "spin.iterations=1", "spin.sft_first=true", "spin.sft_lr=1e-3",
        "model.name=tiny-random-base",  # SPIN's own plain format (a base model without a chat template)
        *LORA_JOB, f"training.preference.peft.target_modules=[{','.join(SPIN_TARGETS)}]",  # LoRA, per phase
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = tmp_path / "runs/spin/tiny"

    def session() -> dict:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return json.loads((run / "state.json").read_text())

    first = session()
    # training.layout auto on this embedded Ray: one rank with the pool's 2 CPUs, accumulating both ranks' batches
    assert first["metrics"]["sft/layout"] == {
        "name": "one_rank",
        "ranks": 1,
        "threads": 2,
        "grad_accum": 2,
        "zero_stage": 0,  # and DeepSpeed stage 0 for the configured ZeRO stage: one rank holds every partition
    }
    assert "layout one_rank (auto: one machine (embedded Ray), CPU ranks" in (run / "driver.log").read_text()

    summary = json.loads((run / "summary.json").read_text())
    assert_plain_format(summary, run)
    assert_lora_models("spin", run, summary, wandb=False)  # tracking.mode=disabled
    # --dry-run over the finished folder (in this process: it must start no Ray): every phase is reused; with
    # another world size the training phases and what they feed run; another folder runs everything.
    assert set(dry_run(command)) == set(first["phases"]) and set(dry_run(command).values()) == {("reuse", "")}
    replicas = dry_run(command, "pools.train.replicas=1")
    # (the first session ran as one rank for the pool's 2 (training.layout auto): its key holds ranks too)
    assert replicas["sft"] == (
        "run",
        "key changed: layout_zero_stage, ranks (training.layout); world_size: 2 -> 1 (pools.train.replicas)",
    )
    assert replicas["iter0/eval-answers"] == ("run", "upstream sft runs again")
    assert replicas["iter1/eval-verdicts"][0] == "run"  # not reached: the walk stops where a pending output is read
    # training.deepspeed.bf16 native (the default), resolved for these CPU ranks: with oneDNN capped below bf16 in the
    # ranks' environment it is fp32, another model where this CPU ran bf16 and the same one where it ran fp32
    capped = dry_run(command, "pools.train.env={ONEDNN_MAX_CPU_ISA: AVX2}")
    if native_bf16():
        # (and without the bf16 rounding fp32 does not use)
        action, reason = capped["sft"]
        assert action == "run" and reason.startswith("key changed: training.deepspeed.bf16_rounding"), reason
        assert capped["sft"][1].endswith('training.deepspeed.native_precision: null -> "fp32"'), capped["sft"]
        assert capped["iter0/eval-answers"] == ("run", "upstream sft runs again")
    else:
        assert set(capped.values()) == {("reuse", "")}, capped
    fresh = dry_run(command, "run.id=another")
    assert fresh["sft"] == ("run", "never ran") and {a for a, _ in fresh.values()} == {"run"}
    _gsm8k_rows(train, 8, 4, "t")  # edited in place: the same path and ids, other gold answers
    edited = dry_run(command)
    assert edited["sft"][0] == "run" and edited["sft"][1].startswith("key changed: examples"), edited["sft"]
    assert edited["iter0/eval-answers"] == ("run", "upstream sft runs again")
    assert edited["iter0/eval-verdicts"] == ("run", "upstream iter0/eval-answers runs again")
    assert set(edited) == set(first["phases"]) and {a for a, _ in edited.values()} == {"run"}
    assert json.loads((run / "state.json").read_text()) == first  # the dry runs wrote nothing
    second = session()
    dependent = ["sft", "iter0/eval-answers", "iter0/generate", "iter0/spin", "iter1/eval-answers"]
    for phase in dependent:
        assert first["phases"][phase]["key"] != second["phases"][phase]["key"], phase
    log = (run / "driver.log").read_text()
    for phase in dependent:
        assert log.count(f"phase {phase} finished") == 2, phase
        assert f"phase {phase} runs again" in log
    # A verdict is keyed by its row and answer: it is reused exactly when the new model answered the same.
    same = first["phases"]["iter1/eval-verdicts"]["key"] == second["phases"]["iter1/eval-verdicts"]["key"]
    assert same == (log.count("phase iter1/eval-verdicts finished") == 1)
    verdicts = pq.read_table(run / "phases/iter1/eval-verdicts.parquet").to_pylist()
    accuracy = sum(v["verdict"] == "yes" for v in verdicts) / len(verdicts)
    assert second["metrics"]["iter1/eval/accuracy"] == accuracy


def dry_run(command: list[str], *overrides: str) -> dict[str, tuple[str, str]]:
    """``--dry-run`` of a job command line, in this process: {phase: (reuse | run, reason)}. It must not start Ray."""
    import contextlib
    import importlib
    import io
    from unittest import mock

    import ray

    from jobs.controller import main

    method = command[2].removeprefix("jobs.")
    out = io.StringIO()
    # Ray may already run in this test process (the session's in-process Ray): a dry run must not call ray.init.
    no_ray = mock.patch.object(ray, "init", side_effect=AssertionError("the dry run called ray.init"))
    with no_ray, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        algorithm = getattr(importlib.import_module(f"jobs.{method}"), method)
        main(method, algorithm, [*command[3:], *overrides, "--dry-run"])
    assert done.value.code == 0, out.getvalue()
    print(out.getvalue())  # the report, in the test's output (pytest -s)
    lines = out.getvalue().splitlines()
    verdicts = {}
    for line in lines[1:-1]:
        action, _, rest = line.strip().partition("  ")
        if action in ("reuse", "run"):
            phase, _, reason = rest.strip().partition("  ")
            verdicts[phase] = (action, reason.strip())
    return verdicts


def test_training_keys_hold_a_features_settings_only_where_the_phase_uses_it():
    from dataclasses import asdict

    from configs.schema import load_config
    from jobs.controller import keyed_training_settings

    def keyed(*overrides):
        return keyed_training_settings(asdict(load_config(None, list(overrides)).training))

    plain = keyed("training.deepspeed.bf16=auto")  # fp32 on a CPU rank, as every phase was keyed before either existed
    assert "peft" not in plain and "bf16_rounding" not in plain["deepspeed"]
    assert keyed("training.deepspeed.bf16=auto", "training.deepspeed.bf16_rounding=nearest") == plain  # no rounding
    native = keyed()  # the default since 2026-12-04
    assert native == keyed("training.deepspeed.bf16=native") != plain
    assert native["deepspeed"]["bf16_rounding"] == "stochastic"
    # not the older per-micro-step draw
    assert native["deepspeed"]["bf16_rounding_draw"] == "per_optimizer_step, counter hash, frozen nearest"
    assert keyed("training.deepspeed.bf16=native", "training.deepspeed.bf16_rounding=nearest") != native
    assert keyed("training.peft.enabled=true")["peft"]["r"] == 8


def test_native_bf16_is_keyed_by_the_precision_it_resolves_to_on_the_ranks():
    """training.deepspeed.bf16 'native' is bf16 or fp32 by the ranks' CPU: a phase trained in fp32 on a CPU without
    bf16 must not be reused where 'native' means bf16, nor the reverse. On an embedded Ray the ranks run here, so
    the driver resolves it, with the ranks' environment: a oneDNN ISA cap below avx512_core_bf16 (in
    pools.train.env) makes bf16 GEMMs run as reference code, so 'native' is fp32 under it."""
    from dataclasses import asdict

    from configs.schema import load_config
    from jobs.controller import keyed_training_settings
    from training.service import native_precision, rank_env
    from training.worker import native_bf16

    def resolved(*overrides):
        job = load_config(None, list(overrides))
        return native_precision(job), keyed_training_settings(asdict(job.training), native_precision(job))

    here, keyed_here = resolved()
    assert here == ("bf16" if native_bf16() else "fp32")
    capped, keyed_capped = resolved("pools.train.env={ONEDNN_MAX_CPU_ISA: avx2}")
    assert capped == "fp32"
    assert native_bf16(rank_env(load_config(None, ["pools.train.env={DNNL_MAX_CPU_ISA: AVX2}"]))) is False
    assert native_bf16({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}) == native_bf16({})  # a cap above bf16 changes nothing
    # fp32 is named in the key, without the rounding it does not use; bf16's key is the word 'native' as before
    assert keyed_capped["deepspeed"]["native_precision"] == "fp32" and "bf16_rounding" not in keyed_capped["deepspeed"]
    assert (keyed_here == keyed_capped) == (here == "fp32")
    default = asdict(load_config(None, []).training)
    as_bf16 = keyed_training_settings(default, "bf16")
    assert "native_precision" not in as_bf16["deepspeed"] and as_bf16 == keyed_training_settings(default, None)
    # 'auto' (fp32 on every CPU rank) and an explicit true/false do not depend on the machine: no change
    for setting in ("auto", "true", "false"):
        job = load_config(None, [f"training.deepspeed.bf16={setting}", "pools.train.env={ONEDNN_MAX_CPU_ISA: AVX2}"])
        as_here = keyed_training_settings(asdict(job.training), None)
        assert keyed_training_settings(asdict(job.training), native_precision(job)) == as_here
    # where the ranks' own nodes decide, the driver does not guess (the phase result's precision says what ran)
    assert native_precision(load_config(None, ["pools.train.num_gpus=1"])) is None
    assert native_precision(load_config(None, ["cluster.address=ray://head:10001"])) is None
