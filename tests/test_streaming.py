"""data.streaming: a folder of shards read as a Ray Dataset, and streamed phases that run a block at a time.

The first tests need no Ray (which sources stream, the block phase's resume rules on the real ``Run``); the others
run on the session's embedded Ray: the real Ray Data read, and a real vLLM generator pool on the tiny model.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.schema import load_config
from data.rows import DataError, load_dataset, prepare, stream_source
from runfolder.blocks import Blocks, part_name
from runfolder.run import PhaseFailedError, Run, write_parquet

ROOT = Path(__file__).resolve().parent.parent


def config(run_dir: Path, *overrides: str):
    return load_config(ROOT / "configs/spin-tiny.yaml", [f"run.dir={run_dir}", "tracking.mode=disabled", *overrides])


def qa(i: int, **extra) -> dict:
    return {"id": f"q{i}", "prompt": f"What is {i} plus {i}?", "completion": str(2 * i), **extra}


def write_jsonl(path: Path, lines: list) -> None:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)


def shard_folder(tmp_path: Path) -> Path:
    """Two JSONL shards (one gzipped) with the malformed rows the in-memory loader reports."""
    folder = tmp_path / "shards"
    write_jsonl(folder / "a.jsonl", [qa(i) for i in range(0, 6)] + ["{not json", {"id": "nope"}])
    write_jsonl(folder / "b.jsonl.gz", [qa(i) for i in range(6, 12)] + [qa(3)])  # q3 again: a duplicate
    return folder


def eval_file(tmp_path: Path) -> Path:
    path = tmp_path / "eval.jsonl"
    # a rule verifier's task: evaluating needs no judge pool
    rows = [
        {"id": f"e{i}", "prompt": f"Count to {i}.", "completion": str(i), "label": str(i), "task": "gsm8k"}
        for i in range(3)
    ]
    write_jsonl(path, rows)
    return path


# -- which sources stream (no Ray) ---------------------------------------------------------------------------------


def test_which_sources_stream_and_which_methods_refuse(tmp_path):
    folder = shard_folder(tmp_path)
    data = lambda *o: config(tmp_path, f"data.train={folder}", *o).data  # noqa: E731
    assert sorted(Path(p).name for p in stream_source(data(), "spin")) == ["a.jsonl", "b.jsonl.gz"]
    assert stream_source(data(), "s3ft") is None  # auto: the methods that do not stream load in memory
    assert stream_source(data("data.train=s3://bucket/prompts/"), "spin") == ["s3://bucket/prompts/"]
    assert stream_source(data("data.train=sst2"), "spin") is None
    assert stream_source(data("data.streaming=false"), "spin") is None
    with pytest.raises(DataError, match=r"data.streaming: llm2llm does not stream its data \(its seed set is small"):
        stream_source(data("data.streaming=true"), "llm2llm")
    with pytest.raises(DataError, match="data.streaming: data.train='sst2' is neither a folder of"):
        stream_source(data("data.streaming=true", "data.train=sst2"), "spin")
    write_jsonl(tmp_path / "mixed/x.jsonl", [qa(0)])
    pq.write_table(pa.Table.from_pylist([qa(1)]), tmp_path / "mixed/y.parquet")
    assert stream_source(data(f"data.train={tmp_path / 'mixed'}"), "spin") is None  # not one kind of shard
    # A folder with splits streams data.train_split's files only; its test split is the eval source.
    for split in ("train", "test"):
        write_jsonl(tmp_path / f"split/{split}-00000-of-00001.jsonl", [qa(i, id=f"{split}{i}") for i in range(3)])
    split_data = data(f"data.train={tmp_path / 'split'}")
    assert [Path(p).name for p in stream_source(split_data, "spin")] == ["train-00000-of-00001.jsonl"]
    prepared = prepare(split_data, 0, "spin")
    assert prepared.shards and sorted(r["id"] for r in prepared.eval) == ["test0", "test1", "test2"]


def test_a_streamed_train_needs_a_held_out_source(tmp_path):
    folder = shard_folder(tmp_path)
    c = config(tmp_path, f"data.train={folder}", "data.streaming=true").data
    with pytest.raises(DataError, match="data.eval: a streamed data.train .* needs its held-out rows"):
        prepare(c, 0, "spin")
    clean = tmp_path / "clean"
    write_jsonl(clean / "a.jsonl", [qa(i) for i in range(6)])
    auto = prepare(config(tmp_path, f"data.train={clean}").data, 0, "spin")  # auto: stays in memory instead
    assert auto.shards is None and len(auto.train) + len(auto.eval) == 6
    streamed = prepare(config(tmp_path, f"data.train={folder}", f"data.eval={eval_file(tmp_path)}").data, 0, "spin")
    assert streamed.shards and streamed.train == [] and len(streamed.eval) == 3


# -- block phases (no Ray) ------------------------------------------------------------------------------------------


def blocks_of(folder: Path, sizes: list[int]) -> Blocks:
    start = 0
    for k, n in enumerate(sizes):
        write_parquet(folder / part_name(k), [{"id": f"r{i}", "x": i} for i in range(start, start + n)])
        start += n
    return Blocks.of(folder)


def test_block_phase_resumes_at_the_block_and_retries_exactly_the_failed_rows(tmp_path):
    inputs = blocks_of(tmp_path / "in", [4, 4, 2])
    calls: list[list[str]] = []

    def process(broken: set[str], failed: list[dict], die_at: int | None = None):
        def run(todo):
            if len(calls) == die_at:
                raise KeyboardInterrupt  # the driver dies before this block is written
            calls.append([r["id"] for r in todo])
            failed.extend({"id": r["id"], "reason": "replica gone"} for r in todo if r["id"] in broken)
            return [{"id": r["id"], "y": 2 * r["x"]} for r in todo if r["id"] not in broken]

        return run

    run = Run(config(tmp_path, "run.max_failed_fraction=0.1"))
    failed: list[dict] = []
    with pytest.raises(KeyboardInterrupt):
        run.block_phase("gen", inputs, process({"r1"}, failed, die_at=1), failed=failed)
    assert calls == [["r0", "r1", "r2", "r3"]]
    failed = []
    with pytest.raises(PhaseFailedError, match="phase gen: 2 of 10 rows failed"):
        run.block_phase("gen", inputs, process({"r1", "r9"}, failed), failed=failed)
    assert calls[1:] == [["r1"], ["r4", "r5", "r6", "r7"], ["r8", "r9"]]  # of block 0, only its failed row again
    failed = []
    out = run.block_phase("gen", inputs, process(set(), failed), failed=failed)
    assert calls[4:] == [["r1"], ["r9"]]  # the retry: the failed rows of blocks 0 and 2, nothing else
    ids = pq.read_table(tmp_path / "spin/tiny/phases/gen").column("id").to_pylist()  # the folder is one dataset
    assert sorted(ids) == sorted(f"r{i}" for i in range(10)) and len(out) == 10
    assert run.state["phases"]["gen"]["result"] == {"rows_in": 10, "rows_out": 10, "failed": 0, "blocks": 3}
    assert run.block_phase("gen", inputs, process(set(), [])) == out and len(calls) == 6  # done: not run again
    run.close()


# -- on Ray --------------------------------------------------------------------------------------------------------


def test_a_shard_folder_loads_as_a_ray_dataset_with_the_in_memory_rows_and_report(ray_session, tmp_path):
    from data.streaming import ingest

    folder = shard_folder(tmp_path)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist([qa(i) for i in range(20, 25)]), tmp_path / "pq/p0.parquet")
    c = config(
        tmp_path, f"data.train={folder}", f"data.eval={eval_file(tmp_path)}", "data.n_train=0", "data.block_rows=4"
    )
    run = Run(c)
    data = ingest(run, c.data, prepare(c.data, 0, "spin"))
    blocks = data.train
    assert [len(rows) for _, rows in blocks.blocks()] == [4, 4, 4]  # 12 kept rows, data.block_rows a part
    expected = load_dataset(str(folder / "a.jsonl"))[0] + load_dataset(str(folder / "b.jsonl.gz"))[0][:6]
    assert [r for _, rows in blocks.blocks() for r in rows] == expected  # the in-memory rows, in source order
    report = data.reports[0]
    assert report.kept == 12 and report.malformed == 3
    reasons = sorted(report.reasons)
    assert reasons[0].endswith("a.jsonl line 7: invalid JSON (Expecting property name enclosed in double quotes)")
    assert "a.jsonl line 8: no prompt" in reasons[1]
    assert reasons[2].endswith("b.jsonl.gz line 7: duplicate id 'q3'")
    import ray.data

    assert ray.data.read_parquet(blocks.folders[0]).count() == 12  # the snapshot reads back as a Ray Dataset
    run.close()
    # Parquet shards; the first data.n_train rows; an eval prompt in the training data stops the job.
    leak = tmp_path / "leak.jsonl"
    write_jsonl(leak, [{"id": "x", "prompt": "what is 21 PLUS 21", "completion": "42"}])
    c = config(tmp_path, f"data.train={tmp_path / 'pq'}", f"data.eval={leak}", "data.n_train=2", "run.id=pq")
    run = Run(c)
    with pytest.raises(DataError, match=r"1 by prompt text \(eval = train, first: x = q21\)"):
        ingest(run, c.data, prepare(c.data, 0, "spin"))
    run.close()
    c = config(
        tmp_path,
        f"data.train={tmp_path / 'pq'}",
        f"data.eval={leak}",
        "data.n_train=2",
        "run.id=pq2",
        "data.allow_overlap=true",
    )
    run = Run(c)
    data = ingest(run, c.data, prepare(c.data, 0, "spin"))
    assert [r["id"] for r in data.train.head(10)] == ["q20", "q21"] and data.reports[0].kept == 5
    run.close()


def test_streamed_spin_generation_one_block_at_a_time_resumes_without_loss_or_duplicates(
    ray_session, tmp_path, monkeypatch
):
    import ray.data

    from jobs.controller import Controller
    from methods.spin import build_pairs
    from training.worker import _read_examples

    folder = tmp_path / "shards"
    for s in range(3):  # 3 shards x 4 rows, 5 rows a block: blocks do not follow the shards
        write_jsonl(folder / f"s{s}.jsonl", [qa(i) for i in range(4 * s, 4 * s + 4)])
    c = config(
        tmp_path,
        f"data.train={folder}",
        f"data.eval={eval_file(tmp_path)}",
        "data.n_train=0",
        "data.block_rows=5",
        "engine.batch_size=2",
    )
    ctl = Controller(c)
    try:
        train, _ = ctl.datasets()
        assert isinstance(train, Blocks) and len(train) == 12 and len(train.parts()) == 3
        pool = ctl.generator
        real = pool.generate
        held: list[list[str]] = []  # the prompts the driver sent per block: never more than a block

        def generate(rows, *args, **kwargs):
            held.append([r["id"] for r in rows])
            if len(held) == 2 and die:
                raise KeyboardInterrupt  # the driver is killed during block 1
            yield from real(rows, *args, **kwargs)

        monkeypatch.setattr(pool, "generate", generate)
        sampling = ctl.sampling(c.generation)
        die = True
        with pytest.raises(KeyboardInterrupt):
            ctl.generate("iter0/generate", train, sampling)
        die = False
        generated = ctl.generate("iter0/generate", train, sampling)
        assert [len(ids) for ids in held] == [5, 5, 5, 2]  # block 0, block 1 (killed), block 1 again, block 2
        assert held[1] == held[2]
        ids = [r["id"] for r in ray.data.read_parquet(generated.folders[0]).take_all()]
        assert sorted(ids) == sorted(f"q{i}" for i in range(12))  # one output per row: none lost, none twice
        assert "phase iter0/generate: 1 blocks from an interrupted run kept" in (ctl.run.dir / "driver.log").read_text()
        monkeypatch.undo()
        answers = ctl.generate("eval-answers", ctl.datasets()[1], sampling)  # an in-memory phase: one file
        assert ray.data.read_parquet(ctl.run.phase_file("eval-answers")).count() == len(answers) == 3
        pairs = ctl.per_block("iter0/pairs-data", build_pairs, train, generated, iteration=0)
        examples = _read_examples((pairs + []).files())  # what a training rank reads
        assert len(examples) == 12 and {e["source_id"] for e in examples} == set(ids)
        assert all(e["chosen"] == str(2 * int(e["source_id"][1:])) for e in examples)
    finally:
        ctl.close()
