"""A streamed data.train: read as a Ray Dataset into a Parquet snapshot of the run folder, a block at a time.

Ray Data reads the shards (a local folder, or a URI: s3://, gs://, abfs://, hf://...) in parallel read tasks
on the cluster's workers. Each task parses its shard with the in-memory loader's own code (``data.shard_rows``
and ``data.normalize``), so rows, malformed-row reasons and notes are the same as for a file loaded in memory.
The driver takes the parsed rows in source order (``preserve_order``) one batch at a time: it reports the bad
rows, drops repeated ids (it keeps the ids, not the texts), checks every row against the eval prompts, and writes
the first ``data.n_train`` kept rows (0 = all) as ``phases/data-train/part-<k>.parquet`` of ``data.block_rows``
rows. Those parts are the blocks of every streamed phase (``Run.block_phase``): fixed once written, where Ray
Data's own block boundaries may differ between sessions, so a killed run resumes at the block it was in.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

from data.formats import BadRow
from data.rows import URI, DataError, JobData, LoadReport, Overlap, normalize, prompt_key, shard_rows
from runfolder.blocks import Blocks, part_name
from runfolder.dryrun import is_pending

if TYPE_CHECKING:
    from configs.schema import DataConfig
    from runfolder.run import Run

log = logging.getLogger("selfimprove")

PHASE = "data-train"
ROWS_PER_CHUNK = 1024  # rows a read task hands Ray Data at a time
SCHEMA = pa.schema(
    [
        ("where", pa.string()),
        ("error", pa.string()),  # why the row was skipped; null for a kept row
        ("notes", pa.list_(pa.string())),
        ("key", pa.string()),  # data.prompt_key, for the overlap check against the eval prompts
        ("row", pa.string()),  # the record as JSON: one column type whatever the source's schema
    ]
)


class ShardDatasource(FileBasedDatasource):
    """Ray Data datasource of Parquet / JSON Lines shards, parsed into this repo's records in the read tasks."""

    def __init__(self, paths: list[str], columns: dict[str, str], task: str | None, sft_turns: str = "first", **kwargs):
        super().__init__(paths, **kwargs)
        self.columns, self.task, self.sft_turns = columns, task, sft_turns

    def _open_input_source(self, filesystem, path: str, **open_args):
        if path.lower().endswith(".parquet"):  # Parquet reads its footer first: it needs random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str):
        chunk: list[dict] = []
        for where, raw in shard_rows(f, path):
            try:
                row, notes = normalize(raw, self.columns, self.task, True, self.sft_turns)
                chunk.append(
                    {"where": f"{path} {where}", "notes": notes, "key": prompt_key(row), "row": json.dumps(row)}
                )
            except BadRow as err:
                chunk.append({"where": f"{path} {where}", "error": str(err), "notes": []})
            if len(chunk) == ROWS_PER_CHUNK:
                yield pa.Table.from_pylist(chunk, schema=SCHEMA)
                chunk = []
        if chunk:
            yield pa.Table.from_pylist(chunk, schema=SCHEMA)


def read_shards(shards: list[str], c: DataConfig) -> ray.data.Dataset:
    """The parsed rows of data.train's shards as a Ray Dataset (one row per source row, kept or not)."""
    kwargs = {}
    if shards[0].startswith("hf://"):  # not a pyarrow filesystem: the hub's fsspec one
        from huggingface_hub import HfFileSystem

        kwargs["filesystem"] = HfFileSystem()
    extensions = None if URI.match(shards[0]) else ["parquet", "jsonl", "jsonl.gz"]
    return ray.data.read_datasource(
        ShardDatasource(shards, dict(c.columns), c.task, c.sft_turns, file_extensions=extensions, **kwargs)
    )


def shard_stamps(shards: list[str]) -> list[list]:
    """What a snapshot of ``shards`` depends on without reading them: each local file's path, size and mtime (an
    edited shard is another input); a URI is named as it is."""
    stamps = []
    for shard in shards:
        path = Path(shard)
        if path.exists():
            st = path.stat()
            stamps.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        else:
            stamps.append([shard])
    return stamps


def ingest(run: Run, c: DataConfig, data: JobData) -> JobData:
    """``data`` with its streamed training rows (``Blocks`` of the snapshot) and their load report first; raise
    DataError as ``prepare`` does (too few rows, eval prompts in the training data). Done once per run folder."""
    folder = run.dir / "phases" / PHASE
    report_path = run.dir / "phases" / f"{PHASE}.report.json"

    def read() -> dict:
        shutil.rmtree(folder, ignore_errors=True)  # a session killed mid-read left a partial snapshot
        report, overlap = _write_snapshot(read_shards(data.shards, c), c, data.eval + data.general, folder)
        if report.kept < c.min_rows:
            raise DataError(
                f"data.train: {report.kept} usable rows, fewer than data.min_rows={c.min_rows}. Load report: {report}"
            )
        if overlap and not c.allow_overlap:
            raise DataError(
                "data.eval: evaluation prompts appear in the training data (data.train): "
                f"{overlap}. Evaluating on trained-on prompts measures memory, not skill: remove them from one "
                "side, or set data.allow_overlap=true"
            )
        report_path.write_text(json.dumps({"report": report.as_dict(), "overlap": vars(overlap)}, ensure_ascii=False))
        return {"kept": report.kept, "malformed": report.malformed, "rows": len(Blocks.of(folder))}

    result = run.once(PHASE, read, key={"shards": shard_stamps(data.shards), "eval": [r["id"] for r in data.eval]})
    if is_pending(result):  # a dry run (runfolder.dryrun): the snapshot would be read again, its rows are not known
        return replace(data, train=result)
    saved = json.loads(report_path.read_text())
    overlap = Overlap(saved["overlap"]["by_id"], [tuple(p) for p in saved["overlap"]["by_text"]])
    log.info(
        "data.train streamed from %d shard(s): %d rows in %d blocks",
        len(data.shards),
        result["rows"],
        len(Blocks.of(folder).parts()),
    )
    return replace(
        data,
        train=Blocks.of(folder),
        reports=[LoadReport.from_dict(saved["report"]), *data.reports],
        overlap=overlap,
    )


def _write_snapshot(dataset: ray.data.Dataset, c: DataConfig, eval_rows: list[dict], folder: Path):
    from runfolder.run import write_parquet

    report = LoadReport(c.train)
    by_key: dict[str, list[str]] = {}
    for r in eval_rows:
        by_key.setdefault(prompt_key(r), []).append(r["id"])
    eval_ids = {r["id"] for r in eval_rows}
    id_hits: set[str] = set()
    text_hits: dict[str, str] = {}  # eval id -> first training id with its prompt
    seen: set[str] = set()
    block: list[dict] = []
    written = parts = 0
    dataset.context.execution_options.preserve_order = True  # "first" (duplicates, n_train): first in the source
    for batch in dataset.iter_batches(batch_size=c.block_rows, batch_format="pyarrow"):
        for parsed in batch.to_pylist():
            where = parsed["where"]
            if parsed["error"] is not None:
                report.bad(where, parsed["error"])
                continue
            row = json.loads(parsed["row"])
            if row["id"] in seen:
                report.bad(where, f"duplicate id {row['id']!r}")
                continue
            seen.add(row["id"])
            report.notes.extend((where, note) for note in parsed["notes"])
            if row["id"] in eval_ids:
                id_hits.add(row["id"])
            for eval_id in by_key.get(parsed["key"], []):
                text_hits.setdefault(eval_id, row["id"])
            if c.n_train == 0 or written < c.n_train:
                block.append(row)
                written += 1
            if len(block) == c.block_rows:
                write_parquet(folder / part_name(parts), block)
                block, parts = [], parts + 1
    if block:
        write_parquet(folder / part_name(parts), block)
    report.kept = len(seen)
    overlap = Overlap(
        [r["id"] for r in eval_rows if r["id"] in id_hits],
        [(r["id"], text_hits[r["id"]]) for r in eval_rows if r["id"] not in id_hits and r["id"] in text_hits],
    )
    return report, overlap
