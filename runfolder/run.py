"""Run folder, phases with resume, W&B, and the closing summary.

Layout of ``runs/<method>/<run-id>/``::

    config.yaml            resolved config
    driver.log             driver log
    driver.lease           the running driver's lease (host, pid, heartbeat): one driver per folder
    state.json             config fingerprint; finished phases with wall times, results, input fingerprints
    phases/<name>.parquet  each finished phase's rows (lineage columns included)
    phases/<name>/part-*.parquet  rows of an unfinished phase, written batch by batch
    phases/<name>.failed.parquet  rows the phase could not produce, with the reason (id, reason, session)
    phases/data-train/part-*.parquet  a streamed data.train (data.streaming), data.block_rows rows a part
    phases/<name>/part-<k>.parquet  a streamed phase's output for block k of its input (Run.block_phase)
    phases/data-<split>.parquet  the seed data splits, the roots of the W&B lineage (tracking.artifacts)
    models/<name>/         HF checkpoints written by training phases
    ray_train/train/       Ray Train's record: each training phase's reported metrics + checkpoint (hard links)
    summary.json           per-iteration metrics and phase times
    wandb/                 W&B files (offline by default)

Resume rule: every phase has a key over everything its output depends on: its input rows by content, the settings
it reads, the models it runs (a model is named by the key of the training phase that wrote it, or by a content
digest of a folder the user gave) and the upstream outputs it consumes. A phase listed in ``state.json`` under the
same key is never run again; one whose key changed runs again, and so does everything downstream (their keys name
its output). An unfinished row phase keeps the outputs of its written parts whose input row (by id and content
digest) is among its current inputs, made under the same settings and models, and only processes the rest. Scratch
folders (parts, reference log-probs, DeepSpeed tags) carry the key they were made under (``.phase-key``) and are
discarded when it changes. A part that cannot be read is set aside (``phases/set-aside/``) and recomputed. A
phase whose failed rows exceed ``run.max_failed_fraction`` of its inputs raises ``PhaseFailedError`` and is not
marked done: its parts stay, so the rerun processes exactly the failed rows. A rerun with a changed config
(``runfolder.RUN_CONTROL`` keys aside) stops naming the changed keys unless ``run.fresh=true``.

A streamed phase (``block_phase``) follows the same rules a block at a time: a block is done once its
``.part-<k>.parquet.json`` marker (its failed rows) is written, and the folder of parts is the phase's output
for good (never merged into one file: the driver would hold it whole).
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

from configs.schema import JobConfig, redact_secrets, to_dict
from runfolder.blocks import Blocks, part_name
from runfolder.lineage import Lineage, iteration_metric
from runfolder.state import (
    RunFolderError,
    RunLease,
    canonical,
    changed_keys,
    check_inside,
    clear_folder,
    config_fingerprint,
    key_change,
    load_state,
    phase_key,
    replace_durably,
    row_digest,
    save_state,
    temp_path,
    write_atomic,
)

log = logging.getLogger("selfimprove")

TRAIN_STEP = "optimizer_step"  # W&B x-axis of training metrics: optimizer steps over all training phases
ITERATION = "iteration"  # W&B x-axis of per-iteration metrics


def write_parquet(path: Path, rows: list[dict], before_rename: Callable[[], None] | None = None) -> None:
    """Whole or not at all, and durable: temp file, fsync, rename, fsync of the folder. ``before_rename``: the
    lease check (``replace_durably``), so a driver overtaken while it wrote the file renames nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.string())}), tmp)
    replace_durably(tmp, path, before_rename)


def read_parquet(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


INPUT_DIGEST = "input_digest"  # lineage column: the content digest of the input row an output row came from
KEY_FILE = ".phase-key"  # in a phase's parts or scratch folder: the key its files were made under


def row_phase_key(rows: list[dict], context: dict[str, Any] | None) -> tuple[dict[str, str], str, dict[str, Any]]:
    """A row phase's key material: ({row id: content digest}, the key of its context alone (what its parts
    belong to), the key's components). One function, so a run and its dry run (runfolder.dryrun) key alike."""
    digests = {r["id"]: row_digest(r) for r in rows}
    context = context or {}
    return digests, phase_key(**context)[0], {"rows": sorted(digests.values()), **context}


def block_phase_key(
    inputs: Blocks, aligned: tuple[Blocks, ...], settings: Any, context: dict[str, Any] | None
) -> dict[str, Any]:
    """A streamed phase's key components: its input blocks and aligned phases by content, settings, context."""
    return {
        "inputs": inputs.fingerprint(),
        "aligned": [a.fingerprint() for a in aligned],
        "settings": settings,
        **(context or {}),
    }


KEY_VALUE_LIMIT = 2000  # characters of canonical JSON: a component longer than this is kept by its hash only


def key_values(components: dict[str, Any]) -> dict[str, Any]:
    """The components small enough to keep by value beside the key (settings, model keys; not row lists)."""
    kept: dict[str, Any] = {}
    for name, value in components.items():
        text = canonical(value)
        kept[name] = json.loads(text) if len(text) <= KEY_VALUE_LIMIT else None
    return kept


def model_digest(folder: Path) -> str:
    """Content identity of a model folder a user gave: a file in a Hugging Face cache snapshot is a link to a blob
    named by its content hash (the name is the digest); any other file is hashed. Sizes and names count too."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        target = path.resolve()
        if path.is_symlink() and target.parent.name == "blobs":
            digest.update(target.name.encode())
        else:
            with open(target, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


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


class PhaseFailedError(RuntimeError):
    """Too many of a phase's rows failed: the phase is not marked done and a rerun retries those rows."""


class Run:
    def __init__(self, config: JobConfig):
        self.config = config
        self.dir = config.run_dir
        check_inside(self.dir, Path(config.run.dir) / config.run.method)
        # The lease comes first: nothing in the folder is read, deleted or written by a second driver.
        self.lease = RunLease(self.dir, config.run.lease_timeout_s)
        self.lease.acquire()
        try:
            self._open(config)
        except BaseException:
            self.lease.release()
            raise

    def _open(self, config: JobConfig) -> None:
        if config.run.fresh:
            clear_folder(self.dir)
        self.state_path = self.dir / "state.json"
        self.state: dict[str, Any] = load_state(self.state_path)
        fingerprint = config_fingerprint(config)
        changed = changed_keys(self.state.get("config", {}), fingerprint)
        if changed:
            raise RunFolderError(
                f"{self.dir} was started with another config; changed: {'; '.join(changed)}. Rerun with the "
                "original values to resume, or add run.fresh=true to start over (deletes the folder)"
            )
        self.state["config"] = fingerprint
        self.state["sessions"] = self.state.get("sessions", 0) + 1
        self._save_state()
        (self.dir / "phases").mkdir(parents=True, exist_ok=True)
        (self.dir / "models").mkdir(exist_ok=True)
        write_atomic(self.dir / "config.yaml", yaml.safe_dump(redact_secrets(to_dict(config)), sort_keys=False))
        self._setup_logging()
        self.resumed = bool(self.state["phases"])
        self.phase_times: dict[str, float] = {n: p["wall_s"] for n, p in self.state["phases"].items()}
        self.memory = MemoryMonitor()
        self.started = time.perf_counter()
        self.step = 0  # W&B step within this driver session's run
        self.wandb = self._init_wandb()
        self.iteration_metrics: set[str] = set()  # W&B metrics already put on the iteration axis
        self.lineage = (
            Lineage(self.wandb, self.dir, self.wandb.group) if self.wandb and config.tracking.artifacts else None
        )
        self.finished_now: set[str] = set()  # phases this session ran to the end (not found done)
        self._digests: dict[str, str] = {}  # model folder -> content digest, once per session
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
        run = wandb.init(
            project=self.config.tracking.project,
            entity=self.config.tracking.entity,
            name=f"{group}-s{self.state['sessions']}",
            id=f"{group}-{folder}-s{self.state['sessions']}",
            group=group,
            mode=mode,
            dir=str(self.dir),
            config=redact_secrets(to_dict(self.config)),
            job_type=self.config.run.method,
        )
        # Each metric one curve: training on the optimizer step counted over the job's training phases,
        # per-iteration metrics (``iter<t>/...`` in summary.json) on the iteration.
        run.define_metric(TRAIN_STEP)
        run.define_metric("train/*", step_metric=TRAIN_STEP)
        run.define_metric(ITERATION)
        return run

    # -- phases ----------------------------------------------------------------------------------------

    def done(self, name: str, key: str | None = None, parts: dict[str, str] | None = None) -> bool:
        """Finished (under this key, when one is given). A finished phase whose key changed runs again (and so does
        everything keyed on its output, since their keys name it): the reason is logged, component by component."""
        phase = self.state["phases"].get(name)
        if phase is None:
            return False
        if key is not None and phase.get("key", phase.get("inputs")) != key:
            log.warning("phase %s runs again: %s", name, key_change(phase.get("key_parts"), parts or {}))
            return False
        return True

    def result(self, name: str) -> Any:
        return self.state["phases"][name].get("result")

    def rows(self, name: str) -> list[dict]:
        return read_parquet(self.dir / "phases" / f"{name}.parquet")

    def _save_state(self) -> None:
        self.lease.check()  # a driver that lost its lease writes nothing more
        save_state(self.state_path, self.state, before_rename=self.lease.check)

    def _claim(self, folder: Path, key: str) -> None:
        """``folder`` (a phase's parts or scratch files) belongs to ``key``: files made under another key go."""
        marker = folder / KEY_FILE
        if folder.exists() and (not marker.exists() or marker.read_text().strip() != key):
            if any(p.name != KEY_FILE for p in folder.iterdir()):
                log.warning("%s: made under another key (or none); discarding it", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not marker.exists():
            write_atomic(marker, key)

    def set_aside(self, path: Path, err: BaseException) -> None:
        """A file that cannot be read (torn by a power loss, zero-length) is moved aside, counted and logged; the
        rows it held are recomputed. Nothing is deleted: the file stays in ``phases/set-aside/``."""
        aside = self.dir / "phases" / "set-aside"
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / f"{path.relative_to(self.dir / 'phases').as_posix().replace('/', '__')}.{int(time.time())}"
        os.replace(path, target)
        self.state.setdefault("set_aside", []).append({"file": str(path), "moved_to": str(target), "error": str(err)})
        self._save_state()
        log.warning("%s cannot be read (%s): moved to %s, its rows are computed again", path, err, target)

    def _read_or_set_aside(self, path: Path) -> list[dict] | None:
        try:
            return read_parquet(path)
        except (OSError, pa.ArrowException) as err:
            self.set_aside(path, err)
            return None

    def _finish(
        self,
        name: str,
        wall_s: float,
        result: Any = None,
        key: str | None = None,
        parts: dict | None = None,
        components: dict | None = None,
    ) -> None:
        self.state["phases"][name] = {
            "wall_s": wall_s,
            "result": result,
            "key": key,
            "key_parts": parts,
            # the small components by value: a dry run (runfolder.dryrun) names the setting that changed, not only
            # the component
            "key_values": key_values(components or {}),
        }
        self.state["started"].pop(name, None)
        self.phase_times[name] = wall_s
        self.finished_now.add(name)
        self._save_state()
        self.log({f"phase_time/{name.split('/')[-1]}": wall_s})
        log.info("phase %s finished in %.1f s", name, wall_s)

    # -- models ----------------------------------------------------------------------------------------

    def model_key(self, path: str | Path) -> str:
        """What names a model in a phase key: the key of the training phase that wrote it, or the content digest
        of a folder the user gave (a hub snapshot by its blobs' content hashes)."""
        resolved = str(Path(path).resolve())
        produced = self.state.setdefault("models", {}).get(resolved)
        if produced is not None:
            return f"phase:{produced}"
        if resolved not in self._digests:
            self._digests[resolved] = model_digest(Path(resolved))
        return f"content:{self._digests[resolved]}"

    def register_model(self, path: str, key: str) -> None:
        """``path`` holds the model a training phase made under ``key`` (kept in state.json across sessions)."""
        models = self.state.setdefault("models", {})
        resolved = str(Path(path).resolve())
        if models.get(resolved) != key:
            models[resolved] = key
            self._save_state()

    def row_phase(
        self,
        name: str,
        rows: list[dict],
        process: Callable[[list[dict]], Iterable[list[dict]]],
        key: str = "id",
        failed: list[dict] | None = None,
        context: dict[str, Any] | None = None,
    ) -> list[dict]:
        """Run ``process`` over the rows not yet done; each yielded batch is written at once as a part.

        ``process`` receives the remaining input rows and yields lists of output rows whose ``key``
        (default ``id``) names the input row they came from. ``failed`` is the list ``process`` appends
        ``{"id", "reason"}`` to for rows it could not produce. With ``key="id"`` (one output per input) an input
        row without output is failed even when nobody said why; with another key (the teacher's 0..k examples
        per seed) only rows in ``failed`` are.

        ``context``: everything else the outputs depend on (the model's key, sampling settings, the judge): with the
        input rows' contents it makes the phase's key. A finished phase runs again when its key changed. Parts of a
        half-done phase are kept only when they were made under the same context, and within them only the outputs
        of input rows whose content is unchanged (each output row carries its input's ``input_digest``).
        """
        final = self.dir / "phases" / f"{name}.parquet"
        digests, context_key, components = row_phase_key(rows, context)
        phase, parts_key = phase_key(**components)
        if self.done(name, phase, parts_key):
            done_rows = self._read_or_set_aside(final)
            if done_rows is not None:
                return done_rows
        parts_dir = self.dir / "phases" / name
        self._claim(parts_dir, context_key)
        parts = sorted(parts_dir.glob("part-*.parquet"))
        written: list[dict] = []
        for part in parts:
            written += self._read_or_set_aside(part) or []
        previous = [r for r in written if r.get(INPUT_DIGEST) is not None and r[INPUT_DIGEST] == digests.get(r[key])]
        if len(previous) < len(written):
            log.warning(
                "phase %s: %d rows of parts written from other inputs dropped", name, len(written) - len(previous)
            )
        finished_ids = {r[key] for r in previous}
        todo = [r for r in rows if r["id"] not in finished_ids]
        if previous:
            log.info("phase %s: %d rows from an interrupted run kept, %d to go", name, len(finished_ids), len(todo))
        self.state["started"][name] = phase
        self._save_state()
        start = time.perf_counter()
        produced = list(previous)
        failed = failed if failed is not None else []
        next_part = 1 + max((int(p.stem.split("-")[1]) for p in parts), default=-1)
        for index, batch in enumerate(process(todo) if todo else [], start=next_part):
            if batch:
                batch = [{**r, INPUT_DIGEST: digests.get(r[key])} for r in batch]
                self.lease.check()
                write_parquet(parts_dir / f"part-{index:05d}.parquet", batch, before_rename=self.lease.check)
                produced.extend(batch)
        produced_ids = {r[key] for r in produced}
        reasons = {f["id"]: f["reason"] for f in failed if f["id"] in digests and f["id"] not in produced_ids}
        if key == "id":
            reasons.update({i: "no output" for i in digests.keys() - produced_ids if i not in reasons})
        self.account(name, reasons, len(rows))
        result = {"rows_in": len(rows), "rows_out": len(produced), "failed": len(reasons)}
        self.lease.check()
        write_parquet(final, produced, before_rename=self.lease.check)
        shutil.rmtree(parts_dir, ignore_errors=True)
        self._finish(name, time.perf_counter() - start, result, phase, parts_key, components)
        return produced

    def block_phase(
        self,
        name: str,
        inputs: Blocks,
        process: Callable[..., list[dict]],
        aligned: tuple[Blocks, ...] = (),
        key: str = "id",
        one_per_row: bool = True,
        failed: list[dict] | None = None,
        settings: Any = None,
        context: dict[str, Any] | None = None,
    ) -> Blocks:
        """``row_phase`` for rows the driver never holds whole: ``process(rows, *aligned_rows)`` runs on one block of
        ``inputs`` at a time and its outputs are written as part k of the phase's folder, its failed rows in the
        block's marker. ``aligned``: earlier streamed phases over the same inputs, whose block k comes along.
        ``one_per_row``: an input row without output is failed even when nobody said why (a generation); off
        for transforms that may drop a row (SPIN pairs need a generation). ``settings`` and ``context``: what else
        the outputs depend on (the model's key, sampling). The folder belongs to the phase's key: a finished or
        half-done phase whose key changed starts over. A rerun of an unfinished phase skips the blocks done, and
        within a block keeps the outputs written and processes only the rest (the failed rows, on a retry)."""
        folder = self.dir / "phases" / name
        components = block_phase_key(inputs, aligned, settings, context)
        phase, parts_key = phase_key(**components)
        output = Blocks.of(folder)
        if self.done(name, phase, parts_key) and (folder / KEY_FILE).exists():
            return output
        self._claim(folder, phase)
        self.state["started"][name] = phase
        self._save_state()
        start = time.perf_counter()
        failed = failed if failed is not None else []
        reasons: dict[str, str] = {}
        rows_in = rows_out = resumed = 0
        for k, rows in inputs.blocks():
            rows_in += len(rows)
            part, marker = folder / part_name(k), folder / f".{part_name(k)}.json"
            try:
                earlier = json.loads(marker.read_text())["failed"] if marker.exists() else None
            except (OSError, ValueError, KeyError, TypeError) as err:
                self.set_aside(marker, err)
                earlier = None
            kept = self._read_or_set_aside(part) if part.exists() else []
            if kept is None:  # its part could not be read and was set aside: the whole block is done again
                kept, earlier = [], None
            if earlier == {}:  # done, nothing failed
                rows_out += len(kept)
                resumed += 1
                continue
            have = {r[key] for r in kept}
            todo = [r for r in rows if r["id"] not in have and (earlier is None or r["id"] in earlier)]
            mark = len(failed)
            new = process(todo, *(a.block(k) for a in aligned)) if todo else []
            produced = kept + new
            self.lease.check()
            if new:
                write_parquet(part, produced, before_rename=self.lease.check)
            produced_ids, todo_ids = {r[key] for r in produced}, {r["id"] for r in todo}
            block_failed = {f["id"]: f["reason"] for f in failed[mark:] if f["id"] in todo_ids - produced_ids}
            if one_per_row:
                block_failed.update({i: "no output" for i in todo_ids - produced_ids if i not in block_failed})
            write_atomic(marker, json.dumps({"failed": block_failed}), before_rename=self.lease.check)
            reasons.update(block_failed)
            rows_out += len(produced)
            log.info(
                "phase %s: block %d done (%d rows, %d outputs, %d failed)",
                name,
                k,
                len(rows),
                len(produced),
                len(block_failed),
            )
        if resumed:
            log.info("phase %s: %d blocks from an interrupted run kept", name, resumed)
        self.account(name, reasons, rows_in)
        result = {"rows_in": rows_in, "rows_out": rows_out, "failed": len(reasons), "blocks": len(inputs.parts())}
        self._finish(name, time.perf_counter() - start, result, phase, parts_key, components)
        return output

    def failed_path(self, name: str) -> Path:
        return self.dir / "phases" / f"{name}.failed.parquet"

    def account(self, name: str, reasons: dict[str, str], rows_in: int) -> None:
        """One failure accounting for every phase that calls a pool: the phase's failed rows now (a retry that
        succeeds clears them) go to ``<name>.failed.parquet`` with their reasons and into state.json's count; a
        phase over ``run.max_failed_fraction`` of its rows raises ``PhaseFailedError`` and is not marked done."""
        path = self.failed_path(name)
        if reasons:
            session = self.state.get("sessions", 0)
            self.lease.check()
            rows = [{"id": i, "reason": r, "session": session} for i, r in reasons.items()]
            write_parquet(path, rows, before_rename=self.lease.check)
            self.state["failed"][name] = {"rows": len(reasons), "of": rows_in}
            log.warning("phase %s: %d of %d rows failed (%s)", name, len(reasons), rows_in, path)
        else:
            path.unlink(missing_ok=True)
            self.state["failed"].pop(name, None)
        self._save_state()
        if len(reasons) > self.config.run.max_failed_fraction * rows_in or (rows_in and len(reasons) == rows_in):
            sample = "; ".join(f"{i}: {r}" for i, r in list(reasons.items())[:3])
            raise PhaseFailedError(
                f"phase {name}: {len(reasons)} of {rows_in} rows failed, more than run.max_failed_fraction="
                f"{self.config.run.max_failed_fraction:g} (e.g. {sample}); they are listed in "
                f"{self.failed_path(name)}. Rerun the same command to retry exactly these rows"
            )

    def failed_rows(self) -> dict[str, int]:
        """Rows each phase could not produce, over every driver session of this run (from state.json)."""
        return {name: f["rows"] for name, f in self.state["failed"].items() if f.get("rows")}

    def once(self, name: str, fn: Callable[[], Any], key: dict[str, Any], scratch: Path | None = None) -> Any:
        """A keyed phase whose result is a small JSON value (a model path, scores): ``key`` names everything the
        result depends on (input rows, settings, model keys, upstream phases' keys). It runs again when the key
        changed; ``scratch`` (reference log-probs, DeepSpeed tags) belongs to the key and goes when it changes.
        ``fn`` reports its failed rows through ``account`` (which stops the phase when too many failed)."""
        phase, parts = phase_key(**key)
        if self.done(name, phase, parts):
            return self.result(name)
        if scratch is not None:
            self._claim(scratch, phase)
        self.state["started"][name] = phase
        self._save_state()
        start = time.perf_counter()
        result = fn()
        self._finish(name, time.perf_counter() - start, result, phase, parts, key)
        return result

    def key_of(self, name: str) -> str | None:
        """The key a finished phase ran under (what downstream phases name it by)."""
        phase = self.state["phases"].get(name)
        return None if phase is None else phase.get("key", phase.get("inputs"))

    def model_dir(self, name: str) -> str:
        return str((self.dir / "models" / name).resolve())

    def phase_dir(self, name: str) -> str:
        return str((self.dir / "phases" / name).resolve())

    def phase_file(self, name: str) -> str:
        """Where a row phase's (or written rows') Parquet file lies; a finished streamed phase's folder of parts."""
        path = self.dir / "phases" / f"{name}.parquet"
        folder = self.dir / "phases" / name
        if not path.exists() and self.state["phases"].get(name) and list(folder.glob("part-*.parquet")):
            return str(folder.resolve())
        return str(path.resolve())

    def write_rows(self, name: str, rows: list[dict]) -> str:
        path = self.dir / "phases" / f"{name}.parquet"
        write_parquet(path, rows)
        return str(path.resolve())

    # -- tracking --------------------------------------------------------------------------------------

    def log(self, metrics: dict) -> None:
        self.step += 1
        if self.wandb is not None:
            self.wandb.log(metrics, step=self.step)

    def train_steps_before(self) -> int:
        """Optimizer steps of the job's finished training phases, this session's and earlier ones'."""
        results = (p.get("result") for p in self.state["phases"].values())
        return sum(r["steps"] for r in results if isinstance(r, dict) and "steps" in r and "train_tokens" in r)

    def log_training(self, metrics: dict) -> None:
        """One optimizer step of the running training phase (``train/*`` on the job's optimizer step)."""
        numbers = {f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if "step" in metrics:
            numbers[TRAIN_STEP] = self.train_steps_before() + metrics["step"]
        self.log(numbers)

    def record_lineage(
        self, name: str, job_type: str, uses: list, outputs: list, label: str | None = None, always: bool = False
    ) -> None:
        """W&B lineage of phase ``name`` if it finished in this session (or ``always``): the files it used and the
        ones it wrote (``runfolder.lineage``), as a W&B run called ``label`` (default: the phase's name)."""
        if self.lineage is None or not (always or name in self.finished_now):
            return
        try:
            self.lineage.phase(label or name, job_type, uses, outputs)
        except Exception as err:  # tracking must never fail a phase whose results are already on disk
            log.warning("W&B lineage of phase %s not recorded: %s", name, err)

    def table(self, name: str, rows: list[dict] | Blocks, columns: list[str]) -> None:
        if self.wandb is None or not rows:
            return
        import wandb

        n = self.config.tracking.log_samples
        shown = rows.head(n) if isinstance(rows, Blocks) else rows[:n]
        data = [[_short(r.get(c)) for c in columns] for r in shown]
        self.wandb.log({name: wandb.Table(columns=columns, data=data)}, step=self.step)

    def metric(self, key: str, value: Any) -> None:
        """A summary metric (per-iteration eval, bucket fractions...): kept in summary.json and W&B. In W&B
        ``iter<t>/eval/accuracy`` is ``eval/accuracy`` at iteration t: one curve over the iterations."""
        self.state["metrics"][key] = value
        self._save_state()
        if isinstance(value, (int, float)):
            name, iteration = iteration_metric(key)
            if iteration is None:
                self.log({key: value})
            else:
                if self.wandb is not None and name not in self.iteration_metrics:
                    self.wandb.define_metric(name, step_metric=ITERATION)
                    self.iteration_metrics.add(name)
                self.log({name: value, ITERATION: iteration})
        if self.wandb is not None:
            self.wandb.summary[key] = value

    def record_placement(self, placement: dict) -> None:
        """Where each pool's replicas and training ranks ran, into W&B's config and summary (summary.json gets
        it from the closing summary)."""
        if self.wandb is not None:
            self.wandb.config.update({"placement": placement}, allow_val_change=True)
            self.wandb.summary["placement"] = placement

    def close(
        self, pools: dict[str, float] | None = None, extra: dict | None = None, error: BaseException | None = None
    ) -> dict:
        """The closing summary (``summary.json``, W&B, the printed table). A driver that lost its lease writes
        nothing; a failure while closing is logged and never replaces the error that ended the run."""
        try:
            if self.lease.lost is not None:
                log.error("not writing the summary: %s", self.lease.lost)
                self.memory.stop()
                return {"status": "lost_lease", "error": self.lease.lost}
            return self._close(pools, extra, error)
        except Exception as close_error:
            if error is None:
                raise
            log.error("closing the run after %s failed too: %s", type(error).__name__, close_error)
            return {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        finally:
            self.lease.release()

    def _close(self, pools: dict[str, float] | None, extra: dict | None, error: BaseException | None) -> dict:
        peak = self.memory.stop()
        summary = {
            "method": self.config.run.method,
            "run_dir": str(self.dir),
            "status": "failed" if error is not None else "finished",
            **({"error": f"{type(error).__name__}: {error}"} if error is not None else {}),
            "failed_rows": self.failed_rows(),
            "set_aside": len(self.state.get("set_aside", [])),
            "wall_s": time.perf_counter() - self.started,
            "phases": self.phase_times,
            "pool_idle_s": pools or {},
            "peak_memory_gib": round(peak, 3),
            "metrics": self.state["metrics"],
            **(extra or {}),
        }
        self.lease.check()
        text = json.dumps(summary, indent=1, default=str)
        write_atomic(self.dir / "summary.json", text, before_rename=self.lease.check)  # whole, as readers see it
        if error is not None:
            log.error("run failed: %s", summary["error"])
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
    if summary.get("status") == "failed":
        lines.insert(1, f"FAILED: {summary.get('error')}")
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
