"""The job's checked inputs, recorded in its run folder before any phase runs.

What the controller was given (the resolved model folders, the prepared data and its load reports) goes into
the driver log, ``data_report.json``, the ``data/*`` metrics and the roots of the W&B lineage graph; a streamed
data.train is first read into the run folder. Loading and checking the data is ``data.rows``'s work, running
phases on it the controller's: this module only records, and names the seed data file a set of rows is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from configs.schema import DataConfig
from data.rows import DataError, JobData
from runfolder.blocks import Blocks
from runfolder.run import Run

log = logging.getLogger("selfimprove")


def ingest(run: Run, config: DataConfig, data: JobData) -> JobData:
    """Read the streamed data.train into the run folder. Its data errors end the job as prepare's do; with no
    phase done yet, the run folder keeps no state, so a rerun with the fix is not 'another config'."""
    from data.streaming import ingest

    try:
        return ingest(run, config, data)
    except DataError as err:
        run.close(error=err)
        if not run.state["phases"]:
            for name in ("state.json", "state.json.bak"):
                (run.dir / name).unlink(missing_ok=True)
        raise


def log_inputs(run: Run, data: JobData, model_paths: dict[str, str]) -> None:
    for key, path in model_paths.items():
        log.info("%s: %s", key, path)
    for report in data.reports:
        log.info("data %s", report)
    log.info("eval rows from %s; overlap with training data: %s", data.eval_source, data.overlap)
    # Every skipped row with its reason (the log line quotes only the first few).
    (Path(run.dir) / "data_report.json").write_text(
        json.dumps([r.as_dict() for r in data.reports], indent=1, ensure_ascii=False)
    )
    run.metric("data/malformed_rows", sum(r.malformed for r in data.reports))
    run.metric("data/rows", {"train": len(data.train), "eval": len(data.eval)})
    if data.overlap:  # only reachable with data.allow_overlap=true
        log.warning("evaluation prompts in the training data (data.allow_overlap=true): %s", data.overlap)
        run.metric("data/overlap", {"by_id": len(data.overlap.by_id), "by_text": len(data.overlap.by_text)})


def record_input_lineage(run: Run, data: JobData, base_model: str) -> None:
    """The job's inputs as W&B artifacts, the roots of its lineage graph: the seed data splits (written as
    ``phases/data-<split>.parquet``) and the base model."""
    if run.lineage is None:
        return
    splits = {"train": data.train, "eval": data.eval, "general": data.general}
    try:
        paths = [
            run.write_rows(f"data-{split}", rows) if isinstance(rows, list) else source(run, data, rows)
            for split, rows in splits.items()
            if rows
        ]
    except Exception as err:  # rows Arrow cannot hold in one table: the graph loses its roots, the job goes on
        log.warning("W&B lineage: seed data not written: %s", err)
        return
    run.record_lineage("inputs", "inputs", [], [*paths, base_model], always=True)


def source(run: Run, data: JobData, rows: list[dict] | Blocks) -> str | None:
    """The seed data file ``rows`` are (W&B lineage; a streamed data.train's folder of parts), or None for rows
    a phase made."""
    for split, known in (("train", data.train), ("eval", data.eval), ("general", data.general)):
        if rows is known:
            return run.phase_file(f"data-{split}")
    return None
