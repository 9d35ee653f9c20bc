"""Run folder, phases with resume, W&B, and the closing summary.

Layout of ``runs/<method>/<run-id>/``::

    config.yaml            resolved config
    driver.log             driver log
    state.json             finished phases with their wall times and results
    phases/<name>.parquet  each finished phase's rows (lineage columns included)
    phases/<name>/part-*.parquet  rows of an unfinished phase, written batch by batch
    models/<name>/         HF checkpoints written by training phases
    summary.json           per-iteration metrics and phase times
    wandb/                 W&B files (offline by default)

Resume rule: a phase listed in ``state.json`` is never run again; an unfinished row phase keeps the rows
of its written parts and only processes the rest (rows are keyed by id, so nothing is lost or duplicated).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from cluster.config import JobConfig, to_dict

log = logging.getLogger("selfimprove")


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.string())}), tmp)
    tmp.rename(path)


def read_parquet(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def proportional_memory(pid: int) -> int | None:
    """PSS in bytes: a page shared by N processes (torch's libraries, Ray's object store) counts 1/N in each,
    so a process tree's sum is what it really holds; summed RSS counted shared pages once per process."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # no procfs (macOS), or the process just ended
        pass
    return None


class MemoryMonitor:
    """Peak memory (PSS) of this process tree (the whole embedded Ray: GCS, raylet, actors).

    Reading ``smaps_rollup`` makes the kernel walk a process's page tables under its memory-map lock: ~0.1
    CPU-s per sample of this tree, so sampling every second cost the driver 10% of a core that the training
    ranks needed. The wait after a sample is at least its own CPU time / ``max_duty``, which keeps the
    monitor under ``max_duty`` of one core (a peak shorter than the wait can be missed).
    """

    def __init__(self, interval_s: float = 1.0, max_duty: float = 0.01):
        import psutil

        self.psutil, self.peak_bytes = psutil, 0
        self.interval_s, self.max_duty = interval_s, max_duty
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="memory-monitor")
        self._thread.start()

    def sample(self) -> int:
        root = self.psutil.Process()
        total = 0
        for proc in [root] + root.children(recursive=True):
            try:
                pss = proportional_memory(proc.pid)
                total += pss if pss is not None else proc.memory_info().rss
            except self.psutil.Error:
                pass
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _loop(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            cpu_start = time.thread_time()
            self.sample()
            wait = max(self.interval_s, (time.thread_time() - cpu_start) / self.max_duty)

    def stop(self) -> float:
        self._stop.set()
        return self.peak_bytes / 1024**3


class Run:
    def __init__(self, config: JobConfig):
        self.config = config
        self.dir = config.run_dir
        if config.run.fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        (self.dir / "phases").mkdir(parents=True, exist_ok=True)
        (self.dir / "models").mkdir(exist_ok=True)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        self._setup_logging()
        self.state_path = self.dir / "state.json"
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text()) if self.state_path.exists() else {"phases": {}, "metrics": {}}
        )
        self.resumed = bool(self.state["phases"])
        self.phase_times: dict[str, float] = {n: p["wall_s"] for n, p in self.state["phases"].items()}
        self.memory = MemoryMonitor()
        self.started = time.perf_counter()
        self.step = 0  # W&B step within this driver session's run
        self.wandb = self._init_wandb()
        if self.resumed:
            log.info("resuming %s: %d phases already finished", self.dir, len(self.state["phases"]))

    # -- setup -----------------------------------------------------------------------------------------

    def _setup_logging(self) -> None:
        root = logging.getLogger()
        if not any(
            isinstance(h, logging.FileHandler) and h.baseFilename == str((self.dir / "driver.log").resolve())
            for h in root.handlers
        ):
            handler = logging.FileHandler(self.dir / "driver.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(handler)
        root.setLevel(logging.INFO)

    def _init_wandb(self):
        mode = self.config.tracking.mode or os.environ.get("WANDB_MODE") or "offline"
        if mode == "disabled":
            return None
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        # One W&B run per driver session, grouped by run folder: a killed driver's W&B process may still
        # hold its run id, so a resumed session must not reuse it. The group shows the whole job.
        group = f"{self.config.run.method}-{self.config.run.id}"
        folder = hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:8]
        self.state["sessions"] = self.state.get("sessions", 0) + 1
        self._save_state()
        return wandb.init(
            project=self.config.tracking.project,
            entity=self.config.tracking.entity,
            name=f"{group}-s{self.state['sessions']}",
            id=f"{group}-{folder}-s{self.state['sessions']}",
            group=group,
            mode=mode,
            dir=str(self.dir),
            config=to_dict(self.config),
            job_type=self.config.run.method,
        )

    # -- phases ----------------------------------------------------------------------------------------

    def done(self, name: str) -> bool:
        return name in self.state["phases"]

    def result(self, name: str) -> Any:
        return self.state["phases"][name].get("result")

    def rows(self, name: str) -> list[dict]:
        return read_parquet(self.dir / "phases" / f"{name}.parquet")

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, default=str))
        tmp.rename(self.state_path)

    def _finish(self, name: str, wall_s: float, result: Any = None) -> None:
        self.state["phases"][name] = {"wall_s": wall_s, "result": result}
        self.phase_times[name] = wall_s
        self._save_state()
        self.log({f"phase_time/{name.split('/')[-1]}": wall_s})
        log.info("phase %s finished in %.1f s", name, wall_s)

    def row_phase(
        self, name: str, rows: list[dict], process: Callable[[list[dict]], Iterable[list[dict]]], key: str = "id"
    ) -> list[dict]:
        """Run ``process`` over the rows not yet done; each yielded batch is written at once as a part.

        ``process`` receives the remaining input rows and yields lists of output rows whose ``key``
        (default ``id``) names the input row they came from.
        """
        final = self.dir / "phases" / f"{name}.parquet"
        if self.done(name):
            return read_parquet(final)
        parts_dir = self.dir / "phases" / name
        parts = sorted(parts_dir.glob("part-*.parquet")) if parts_dir.exists() else []
        previous = [r for p in parts for r in read_parquet(p)]
        finished_ids = {r[key] for r in previous}
        todo = [r for r in rows if r["id"] not in finished_ids]
        if previous:
            log.info("phase %s: %d rows from an interrupted run kept, %d to go", name, len(finished_ids), len(todo))
        start = time.perf_counter()
        produced = list(previous)
        for index, batch in enumerate(process(todo) if todo else [], start=len(parts)):
            if batch:
                write_parquet(parts_dir / f"part-{index:05d}.parquet", batch)
                produced.extend(batch)
        write_parquet(final, produced)
        shutil.rmtree(parts_dir, ignore_errors=True)
        self._finish(name, time.perf_counter() - start, {"rows": len(produced)})
        return produced

    def once(self, name: str, fn: Callable[[], Any]) -> Any:
        """A phase whose result is a small JSON value (a model path, metrics): run once, then remembered."""
        if self.done(name):
            return self.result(name)
        start = time.perf_counter()
        result = fn()
        self._finish(name, time.perf_counter() - start, result)
        return result

    def model_dir(self, name: str) -> str:
        return str((self.dir / "models" / name).resolve())

    def phase_dir(self, name: str) -> str:
        return str((self.dir / "phases" / name).resolve())

    def write_rows(self, name: str, rows: list[dict]) -> str:
        path = self.dir / "phases" / f"{name}.parquet"
        write_parquet(path, rows)
        return str(path.resolve())

    # -- tracking --------------------------------------------------------------------------------------

    def log(self, metrics: dict) -> None:
        self.step += 1
        if self.wandb is not None:
            self.wandb.log(metrics, step=self.step)

    def table(self, name: str, rows: list[dict], columns: list[str]) -> None:
        if self.wandb is None or not rows:
            return
        import wandb

        data = [[_short(r.get(c)) for c in columns] for r in rows[: self.config.tracking.log_samples]]
        self.wandb.log({name: wandb.Table(columns=columns, data=data)}, step=self.step)

    def metric(self, key: str, value: Any) -> None:
        """A summary metric (per-iteration eval, bucket fractions...): kept in summary.json and W&B."""
        self.state["metrics"][key] = value
        self._save_state()
        if isinstance(value, (int, float)):
            self.log({key: value})
        if self.wandb is not None:
            self.wandb.summary[key] = value

    def close(self, pools: dict[str, float] | None = None, extra: dict | None = None) -> dict:
        peak = self.memory.stop()
        summary = {
            "method": self.config.run.method,
            "run_dir": str(self.dir),
            "wall_s": time.perf_counter() - self.started,
            "phases": self.phase_times,
            "pool_idle_s": pools or {},
            "peak_memory_gib": round(peak, 3),
            "metrics": self.state["metrics"],
            **(extra or {}),
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if self.wandb is not None:
            self.wandb.summary.update(
                {
                    "peak_memory_gib": summary["peak_memory_gib"],
                    **{f"pool_idle_s/{k}": v for k, v in (pools or {}).items()},
                }
            )
            self.wandb.finish()
        print(format_summary(summary))
        return summary


def _short(value: Any, limit: int = 2000) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "…"
    if isinstance(value, (list, dict)):
        return _short(json.dumps(value, default=str), limit)
    return value


def format_summary(summary: dict) -> str:
    lines = [f"== {summary['method']} run {summary['run_dir']} ==", f"{'phase':<40} {'wall s':>9}"]
    lines += [f"{name:<40} {seconds:>9.1f}" for name, seconds in summary["phases"].items()]
    if summary["pool_idle_s"]:
        lines += ["", f"{'pool':<40} {'idle s':>9}"]
        lines += [f"{name:<40} {seconds:>9.1f}" for name, seconds in summary["pool_idle_s"].items()]
    lines += ["", f"{'metric':<40} {'value':>9}"]
    for key, value in summary["metrics"].items():
        shown = f"{value:>9.4f}" if isinstance(value, float) else f"{value!s:>9}"
        lines.append(f"{key:<40} {shown}")
    lines.append(f"{'peak memory (GiB)':<40} {summary['peak_memory_gib']:>9.2f}")
    lines.append(f"{'wall time (s)':<40} {summary['wall_s']:>9.1f}")
    return "\n".join(lines)


@contextmanager
def timer() -> Iterator[dict]:
    box = {"start": time.perf_counter()}
    yield box
    box["s"] = time.perf_counter() - box["start"]
