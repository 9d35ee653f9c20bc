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
def spin_run(ray_session, tmp_path_factory):
    from jobs.common import main
    from jobs.spin import spin

    root = tmp_path_factory.mktemp("wandb")
    main("spin", spin, ["--config", "configs/spin-tiny.yaml", f"run.dir={root}", "spin.iterations=1"])
    return root / "spin" / "tiny"


def test_offline_run_has_config_metrics_and_tables(spin_run):
    (wandb_file,) = glob.glob(str(spin_run / "wandb/offline-run-*/run-*.wandb"))
    records = read_records(wandb_file)
    updates = [u for r in records if r.HasField("run") for u in r.run.config.update]
    updates += [u for r in records if r.HasField("config") for u in r.config.update]
    config = {u.key: json.loads(u.value_json) for u in updates}
    assert config["training"]["lr"] == 1e-3 and config["model"]["name"] == "tiny-random"
    history_keys = {i.key or "/".join(i.nested_key) for r in records if r.HasField("history") for i in r.history.item}
    assert {"iter0/eval/accuracy", "train/loss", "train/reward_margin", "train/tokens_per_s"} <= history_keys
    assert any(k.startswith("phase_time/") for k in history_keys)
    tables = glob.glob(str(spin_run / "wandb/offline-run-*/files/media/table/samples/**/*.table.json"), recursive=True)
    pairs = [t for t in tables if "pairs" in t]
    assert pairs, tables
    table = json.loads(Path(pairs[0]).read_text())
    assert table["columns"] == ["source_id", "chosen", "rejected"] and table["data"]
