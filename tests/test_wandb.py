"""The W&B offline run of a finished job holds its config, metrics and sample tables.

``.wandb`` files are a LevelDB-style log of protobuf ``Record``s behind a 7-byte W&B header; wandb 0.31 has
no Python reader any more, so this test reads the log format directly (a few lines, no network)."""

import glob
import json
import struct
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer too small for a header: skip to the next block
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.fixture(scope="module")
def spin_run(spin_job):
    """conftest.SPIN_JOB: SFT first, so the lineage runs seed data -> model 0 -> generations -> pairs -> model 1
    (and on, through iteration 1, to model 2)."""
    return spin_job


def test_offline_run_has_config_metrics_and_tables(spin_run):
    (wandb_file,) = glob.glob(str(spin_run / "wandb/offline-run-*-s1/run-*.wandb"))  # the session's main run
    records = read_records(wandb_file)
    updates = [u for r in records if r.HasField("run") for u in r.run.config.update]
    updates += [u for r in records if r.HasField("config") for u in r.config.update]
    config = {u.key: json.loads(u.value_json) for u in updates}
    assert config["training"]["lr"] == 1e-3 and config["model"]["name"] == "acme/tiny-chat"
    history_keys = {i.key or "/".join(i.nested_key) for r in records if r.HasField("history") for i in r.history.item}
    assert {"eval/accuracy", "iteration", "train/loss", "train/reward_margin", "train/tokens_per_s"} <= history_keys
    assert not any(k.startswith("iter0/") for k in history_keys)  # one key per metric, the iteration its x-axis
    assert any(k.startswith("phase_time/") for k in history_keys)
    tables = glob.glob(str(spin_run / "wandb/offline-run-*/files/media/table/samples/**/*.table.json"), recursive=True)
    pairs = [t for t in tables if "pairs" in t]
    assert pairs, tables
    table = json.loads(Path(pairs[0]).read_text())
    assert table["columns"] == ["source_id", "chosen", "rejected"] and table["data"]


def history(records) -> list[dict]:
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.HasField("history")
    ]


def test_metrics_are_one_curve_each_on_their_own_axis(spin_run):
    (wandb_file,) = glob.glob(str(spin_run / "wandb/offline-run-*-s1/run-*.wandb"))
    records = read_records(wandb_file)
    axes = {m.metric.name or m.metric.glob_name: m.metric.step_metric for m in records if m.HasField("metric")}
    assert axes["train/*"] == "optimizer_step" and axes["eval/accuracy"] == "iteration"
    rows = history(records)
    evals = sorted((row["iteration"], row["eval/accuracy"]) for row in rows if "eval/accuracy" in row)
    assert [it for it, _ in evals] == [0, 1, 2]  # models 0, 1 and 2 on one curve
    summary = json.loads((spin_run / "summary.json").read_text())["metrics"]
    assert [acc for _, acc in evals] == [summary[f"iter{t}/eval/accuracy"] for t in (0, 1, 2)]
    # The optimizer step counts on across the job's training phases (SFT, then SPIN), one value per step.
    steps = [row["optimizer_step"] for row in rows if "train/loss" in row]
    phases = json.loads((spin_run / "state.json").read_text())["phases"]
    total = sum(phases[name]["result"]["steps"] for name in ("sft", "iter0/spin", "iter1/spin"))
    assert steps == list(range(1, total + 1))


def test_lineage_runs_seed_data_to_model_0_to_generations_to_pairs_to_model_1(spin_run):
    logged, used, job_types = {}, {}, {}  # artifact -> producing run; run -> artifacts used; run -> job type
    digests: dict[str, set[str]] = {}
    for wandb_file in glob.glob(str(spin_run / "wandb/offline-run-*/run-*.wandb")):
        records = read_records(wandb_file)
        (run_id,) = {r.run.run_id for r in records if r.HasField("run")}
        job_types[run_id] = next(r.run.job_type for r in records if r.HasField("run"))
        for r in records:
            if not r.HasField("artifact"):
                continue
            digests.setdefault(r.artifact.name, set()).add(r.artifact.digest)
            if r.artifact.use_after_commit:  # the offline form of run.use_artifact
                used.setdefault(run_id, set()).add(r.artifact.name)
            else:
                assert r.artifact.name not in logged, r.artifact.name  # one producer per artifact
                logged[r.artifact.name] = run_id
    # Every use names content some run logged (same name, same digest: on sync, the same version).
    for names in used.values():
        for name in names:
            assert name in logged and len(digests[name]) == 1, name

    def edge(source: str, target: str) -> bool:
        """``target`` was logged by a run that used ``source``."""
        return source in used.get(logged[target], set())

    chain = [
        "spin-tiny-data-train",  # seed data
        "spin-tiny-sft-data",  # SFT examples
        "spin-tiny-model-sft",  # model 0
        "spin-tiny-iter0-generate",  # generations
        "spin-tiny-iter0-spin-data",  # pairs
        "spin-tiny-model-iter0-spin",  # model 1
    ]
    for source, target in zip(chain, chain[1:]):
        assert edge(source, target), (source, target, used.get(logged.get(target)))
    assert edge("spin-tiny-model-sft", "spin-tiny-model-iter0-spin")  # model 1 = model 0 trained on the pairs
    assert edge("spin-tiny-data-train", "spin-tiny-iter0-spin-data")  # gold answers are the chosen side
    # the base model the job started from, given by hub id: named by its repo, not its snapshot's revision
    assert edge("model-acme-tiny-chat", "spin-tiny-model-sft")
    assert edge("spin-tiny-model-iter0-spin", "spin-tiny-iter1-eval-answers")  # model 1 is what iteration 1 evaluates
    assert job_types[logged["spin-tiny-model-iter0-spin"]] == "train"
    assert job_types[logged["spin-tiny-iter0-generate"]] == "generate"


def test_a_lora_models_artifacts_name_its_base_model_and_its_adapter(tmp_path):
    from runfolder.lineage import adapter_metadata, artifact_for

    run = tmp_path / "spin" / "tiny"
    base, merged = run / "models" / "iter0" / "spin", run / "models" / "iter1" / "spin"
    (merged / "adapter").mkdir(parents=True)
    base.mkdir(parents=True)
    settings = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"]}
    settings["base_model_name_or_path"] = str(base)
    (merged / "adapter" / "adapter_config.json").write_text(json.dumps(settings))
    of_merged = adapter_metadata(merged, run, "spin-tiny")
    of_adapter = adapter_metadata(merged / "adapter", run, "spin-tiny")
    assert of_merged["merged"] and not of_adapter["merged"]
    for meta in (of_merged, of_adapter):
        assert meta["base_model"] == str(base) and meta["base_model_artifact"] == "spin-tiny-model-iter0-spin"
        assert meta["adapter_artifact"] == artifact_for(merged / "adapter", run, "spin-tiny")[0]
        assert meta["adapter_artifact"] == "spin-tiny-model-iter1-spin-adapter"
        assert meta["r"] == 4 and meta["target_modules"] == ["q_proj", "v_proj"]
    assert adapter_metadata(base, run, "spin-tiny") == {}  # a full-weights model: nothing to name
