"""Safe run folders: one driver at a time, resume only what the current config and inputs would produce.

- ``RunLease``: a lease with fencing. The holder of generation g owns ``<run>/driver.lease.<g>`` (host, boot id,
  pid namespace, pid, a random token and a heartbeat refreshed every ``run.lease_timeout_s / 4`` s). A lease file
  is written whole under a temp name and hard-linked into place, which fails if the name exists (atomic on local
  disks and NFS v3+): of several drivers exactly one creates a given generation. A takeover judges the newest
  generation g stale and creates g+1, so it replaces exactly the lease it judged; a second driver that judged
  the same g stale fails to create g+1 and meets the new holder. A holder whose generation is no longer the
  newest (it stalled past the timeout and was taken over) is fenced: ``check()`` raises ``LeaseLostError``
  before every state write, and the heartbeat interrupts the driver the moment it sees it.
  A holder is judged dead by its heartbeat age; by its pid only when host, boot id and pid namespace all match
  (a live driver in another container with the same hostname is not "dead" because its pid is not ours).
- ``config_fingerprint``: the config's fields minus run-control keys (``RUN_CONTROL``: where the run is, how it
  is placed, tracked, batched and guarded, none of which changes what a phase produces), one value per dataclass
  field: a dict option (``data.columns``) is one value, so an entry added or removed is a change. A rerun whose
  fingerprint differs names the changed keys and stops, unless ``run.fresh=true``.
- ``phase_key``: what a phase's output depends on (input rows by content, settings, the models and upstream
  outputs it reads), hashed per named component so a changed key can say which component changed.
- ``load_state``: ``state.json`` or an error naming the file and how to recover.
- Durable writes: ``write_atomic`` / ``replace_durably`` fsync the file and its folder, so after a power loss a
  file is either its old or its new whole self.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("selfimprove")

LEASE_FILE = "driver.lease"

# Keys (or prefixes ending in '.') left out of the config fingerprint: changing them between sessions of one run
# never changes a phase's output, and some exist precisely to let a stuck run finish (a larger failed fraction,
# a longer timeout, more replicas).
RUN_CONTROL = (
    "run.fresh",
    "run.dir",
    "run.method",
    "run.id",
    "run.max_failed_fraction",
    "run.lease_timeout_s",
    "cluster.",
    "pools.",
    "tracking.",
    "model.cache_dir",
    "model.architecture.",  # read by --plan only
    "judge.architecture.",
    "teacher.architecture.",
    "engine.batch_size",  # sampling seeds follow the row id, not its batch
    "engine.batch_timeout_s",
    "engine.max_num_seqs",
    "engine.kv_cache_gib",
    "engine.gpu_memory_utilization",
    "engine.enforce_eager",
    "training.checkpoint_every",
    "training.threads_per_worker",
    "training.layout",  # the resolved rank count is in each training phase's key (jobs.controller)
    "training.allocator",
    "training.stall_timeout_s",
    "training.min_examples",
    "training.keep_checkpoints",  # how many complete DeepSpeed tags are kept, not what they hold
    "evaluation.lm_eval.",  # each lm-eval phase is keyed by its tasks and settings: benchmarks can be added later
    "evaluation.mt_bench.",  # its answer and judging phases are keyed by their settings: it can be added later
)


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked: held by another driver, config changed, state unreadable."""


def temp_path(path: Path) -> Path:
    """A sibling temp name no other process or thread will pick (pid + random), renamed over ``path`` when whole."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new name in ``folder`` durable (POSIX: the folder entry lives in the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and /proc) refuse fsync on folders: nothing more can be done there
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path, before_rename: Callable[[], None] | None = None) -> None:
    """``tmp`` (written whole) becomes ``path``: file contents on disk first, then the rename, then the folder.
    ``before_rename`` (a lease check) runs after the fsync, just before the rename: a driver paused while it
    wrote and fsynced (milliseconds, more on shared storage) and overtaken meanwhile renames nothing. What is
    left is the gap between that check and the rename itself (one system call)."""
    fsync_file(tmp)
    if before_rename is not None:
        try:
            before_rename()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomic(path: Path, text: str, before_rename: Callable[[], None] | None = None) -> None:
    tmp = temp_path(path)
    tmp.write_text(text)
    replace_durably(tmp, path, before_rename)


# -- fingerprints ------------------------------------------------------------------------------------------


def is_run_control(key: str) -> bool:
    return any(key == c or (c.endswith(".") and key.startswith(c)) for c in RUN_CONTROL)


def config_fields(config: Any, prefix: str = "") -> dict[str, Any]:
    """One entry per dataclass field, dotted: nested sections recurse, every other value (a dict option such as
    ``data.columns``, a list) is one value, so adding a key inside a dict option changes that field's value."""
    flat: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        dotted = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            flat.update(config_fields(value, dotted + "."))
        else:
            flat[dotted] = _plain(value)
    return flat


def _plain(value: Any) -> Any:
    """A field's value as JSON-able data (a list of sections, such as cluster.node_groups, as plain dicts)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_fingerprint(config: Any) -> dict[str, Any]:
    """The config values that decide what phases produce (JSON-normalised, so a reload compares equal), one per
    field of the typed config."""
    values = {k: v for k, v in config_fields(config).items() if not is_run_control(k)}
    return json.loads(json.dumps(values, default=str))


def changed_keys(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for keys in both whose values differ. A key only one side has was added or removed by a
    code change, not by the user: it is not reported."""
    return [
        f"{k}: {stored[k]!r} -> {current[k]!r}"
        for k in sorted(stored.keys() & current.keys())
        if stored[k] != current[k]
    ]


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def row_digest(row: dict) -> str:
    """A row's content (every field, not only its id): a prompt edited under the same id is another input."""
    return hashlib.sha256(canonical(row).encode()).hexdigest()[:16]


def phase_key(**components: Any) -> tuple[str, dict[str, str]]:
    """(key, {component: short hash}) over named components: rows (a list, order-independent), settings, models
    (their keys), upstream outputs (their phases' keys). The per-component hashes let a rerun say what changed."""
    parts = {name: inputs_fingerprint(value) for name, value in sorted(components.items())}
    return inputs_fingerprint(parts), parts


def key_change(before: dict | None, now: dict[str, str]) -> str:
    """Why a phase's key changed, in words: the components whose hashes differ (or 'an older key format')."""
    if not before:
        return "its key was recorded by an older version"
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return "changed: " + ", ".join(changed) if changed else "its key changed"


def inputs_fingerprint(*parts: Any) -> str:
    """Order-independent hash of a phase's inputs (rows are sorted by their canonical JSON)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, list):
            for line in sorted(json.dumps(x, sort_keys=True, default=str) for x in part):
                digest.update(line.encode())
                digest.update(b"\n")
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


# -- state.json --------------------------------------------------------------------------------------------


def empty_state() -> dict[str, Any]:
    return {"phases": {}, "metrics": {}, "failed": {}, "started": {}}


def load_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return empty_state()
    backup = path.with_name(path.name + ".bak")
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("phases"), dict):
            raise ValueError("not a mapping with a 'phases' mapping")
    except (ValueError, OSError) as err:
        hint = (
            f"copy {backup} (the state before the last write) over it to resume from there, or "
            if backup.exists()
            else ""
        )
        raise RunFolderError(
            f"{path} is corrupt ({err}). To recover: {hint}rerun with run.fresh=true to start the run over "
            f"(deletes {path.parent})"
        ) from None
    for key, value in empty_state().items():
        state.setdefault(key, value)
    return state


def save_state(path: Path, state: dict[str, Any], before_rename: Callable[[], None] | None = None) -> None:
    """Atomic write; the previous version is kept as ``state.json.bak`` for recovery from a damaged file.
    ``before_rename`` runs before each of the two renames: see ``replace_durably``."""
    if path.exists():  # copied whole under a temp name, then renamed: a torn .bak is never left behind
        backup = path.with_name(path.name + ".bak")
        tmp = temp_path(backup)
        shutil.copyfile(path, tmp)
        replace_durably(tmp, backup, before_rename)
    write_atomic(path, json.dumps(state, indent=1, default=str), before_rename)


# -- the folder itself -------------------------------------------------------------------------------------


def check_inside(run_dir: Path, method_dir: Path) -> None:
    """Deletion guard: ``run_dir`` must be a direct child of the method's folder (after resolving symlinks)."""
    target, parent = run_dir.resolve(), method_dir.resolve()
    if target.parent != parent or target == parent:
        raise RunFolderError(f"refusing to delete {run_dir}: it is not a run folder inside {method_dir}")


def clear_folder(run_dir: Path, keep: tuple[str, ...] = (LEASE_FILE,)) -> None:
    """run.fresh: delete everything in the run folder but the lease this driver holds (``driver.lease.<g>``)."""
    for child in run_dir.iterdir():
        if any(child.name == k or child.name.startswith(f"{k}.") for k in keep):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class LeaseLostError(RunFolderError):
    """Another driver took this driver's lease over (it stalled past run.lease_timeout_s): stop writing at once."""


def _identity(path: str) -> str:
    try:
        return Path(path).read_text().strip() if not path.startswith("ns:") else os.readlink(path[3:])
    except OSError:
        return "?"


def machine_identity() -> dict[str, str]:
    """What makes a pid meaningful: the host name, the kernel's boot id, and the pid namespace (a container)."""
    return {
        "host": socket.gethostname(),
        "boot_id": _identity("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _identity("ns:/proc/self/ns/pid"),
    }


class RunLease:
    """The driver's exclusive, fenced lease on a run folder for its lifetime (see module docstring)."""

    def __init__(self, run_dir: Path, timeout_s: float):
        self.folder = run_dir
        self.timeout_s = timeout_s
        self.identity = machine_identity()
        self.host, self.pid = self.identity["host"], os.getpid()
        self.token = secrets.token_hex(8)
        self.started = time.time()
        self.generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why this driver no longer holds the lease (the new holder), once it does not
        self._noticed = False  # the main thread has seen the loss itself: the heartbeat must not interrupt it too

    @property
    def path(self) -> Path:
        """This driver's lease file once held; before that, the newest one (the holder's)."""
        if self.generation is not None:
            return self._file(self.generation)
        newest = self._generations()
        return self._file(newest[-1]) if newest else self.folder / f"{LEASE_FILE}.0"

    def _file(self, generation: int) -> Path:
        return self.folder / f"{LEASE_FILE}.{generation}"

    def _generations(self) -> list[int]:
        found = []
        for path in self.folder.glob(f"{LEASE_FILE}.*"):
            suffix = path.name[len(LEASE_FILE) + 1 :]
            if suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def _record(self) -> dict:
        now = time.time()
        return {**self.identity, "pid": self.pid, "token": self.token, "started": self.started, "heartbeat": now}

    def _read(self, generation: int) -> dict | None:
        try:
            return json.loads(self._file(generation).read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # never half-written (linked whole); unreadable storage: judge by age
            try:
                return {"host": "?", "pid": -1, "heartbeat": self._file(generation).stat().st_mtime}
            except FileNotFoundError:
                return None

    def holder(self) -> dict | None:
        """The newest lease's record (the current holder), or None when nobody holds the folder."""
        for generation in reversed(self._generations()):
            record = self._read(generation)
            if record is not None:
                return {**record, "generation": generation}
        return None

    def stale_reason(self, holder: dict) -> str | None:
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.timeout_s:
            return f"its heartbeat is {age:.0f} s old (run.lease_timeout_s={self.timeout_s:g})"
        same_machine = all(holder.get(k) == v for k, v in self.identity.items())
        if same_machine and holder.get("pid", -1) > 0 and not pid_alive(holder["pid"]):
            return f"its pid {holder['pid']} is not running on this host (same boot and pid namespace)"
        return None

    def _describe(self, holder: dict) -> str:
        age = time.time() - float(holder.get("heartbeat", 0))
        return f"host {holder.get('host')}, pid {holder.get('pid')}, heartbeat {age:.0f} s ago"

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            holder = self.holder()
            if holder is not None:
                reason = self.stale_reason(holder)
                if reason is None:
                    raise RunFolderError(
                        f"{self.folder} is in use by another driver ({self._describe(holder)}; lease "
                        f"{self._file(holder['generation'])}). One driver per run folder: wait for it to finish or "
                        "stop it, or use another run.id"
                    )
                target = holder["generation"] + 1  # replaces exactly the lease judged stale, or fails
            else:
                newest = self._generations()
                target = newest[-1] + 1 if newest else 0
            pending = temp_path(self._file(target))
            pending.write_text(json.dumps(self._record()))
            try:
                fsync_file(pending)
                os.link(pending, self._file(target))
            except FileExistsError:
                continue  # another driver made this generation first: judge its lease next
            finally:
                pending.unlink(missing_ok=True)
            fsync_dir(self.folder)
            if holder is not None:
                log.warning("took over the stale lease of %s: %s", self.folder, reason)
            self.generation = target
            for older in self._generations():
                if older < target:
                    self._file(older).unlink(missing_ok=True)
            self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="run-lease")
            self._thread.start()
            return
        raise RunFolderError(f"{self.folder}: could not acquire the lease (it kept changing hands)")

    def check(self) -> None:
        """Raise ``LeaseLostError`` unless this driver still holds the newest lease: call before every write."""
        if self.lost is None and self.generation is not None:
            newer = [g for g in self._generations() if g > self.generation]
            mine = self._read(self.generation)
            if newer or mine is None or mine.get("token") != self.token:
                holder = self.holder()
                self.lost = (
                    f"another driver took over the lease of {self.folder} ({self._describe(holder)})"
                    if holder and holder.get("token") != self.token
                    else f"the lease file {self._file(self.generation)} is gone"
                )
        if self.lost is not None:
            if threading.current_thread() is threading.main_thread():
                self._noticed = True
            raise LeaseLostError(f"{self.lost}; this driver stops without writing anything more")

    def owned(self) -> bool:
        try:
            self.check()
        except LeaseLostError:
            return False
        return self.generation is not None

    def _heartbeat(self) -> None:
        import _thread

        while not self._stop.wait(self.timeout_s / 4):
            if not self.owned():
                log.error("%s", self.lost)
                if not self._noticed:  # once: a second interrupt would land in the driver's own clean-up
                    self._noticed = True
                    _thread.interrupt_main()  # the driver stops now, not at its next state write
                return
            try:
                write_atomic(self._file(self.generation), json.dumps(self._record()))
            except OSError as err:  # shared storage hiccup: the next beat tries again before the lease goes stale
                log.warning("could not refresh the lease %s: %s", self.path, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.owned():
            self._file(self.generation).unlink(missing_ok=True)
