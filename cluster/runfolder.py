"""Safe run folders: one driver at a time, resume only what the current config and inputs would produce.

- ``RunLease``: ``<run>/driver.lease`` holds the driver's host, pid and a heartbeat refreshed every
  ``run.lease_timeout_s / 4`` s. It is created with ``O_CREAT | O_EXCL`` (atomic on local disks and NFS v3+),
  so of two drivers starting together exactly one gets it; the other exits at once naming the holder. A lease is
  stale, and may be taken over, when its pid is dead on this host or its heartbeat is older than the timeout
  (a driver on another host that died: its pid cannot be checked from here). Taking over renames the stale file
  to a unique name first, so of two drivers taking over the same stale lease only one wins the rename.
- ``config_fingerprint``: the flattened config minus run-control keys (``RUN_CONTROL``: where the run is, how it
  is placed, tracked, batched and guarded, none of which changes what a phase produces). A rerun whose fingerprint
  differs names the changed keys and stops, unless ``run.fresh=true``.
- ``inputs_fingerprint``: a hash of a phase's input rows; a finished phase whose inputs changed runs again.
- ``load_state``: ``state.json`` or an error naming the file and how to recover.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
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
    "training.allocator",
    "training.stall_timeout_s",
    "training.min_examples",
)


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked: held by another driver, config changed, state unreadable."""


def temp_path(path: Path) -> Path:
    """A sibling temp name no other process or thread will pick (pid + random), renamed over ``path`` when whole."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, text: str) -> None:
    tmp = temp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


# -- fingerprints ------------------------------------------------------------------------------------------


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def is_run_control(key: str) -> bool:
    return any(key == c or (c.endswith(".") and key.startswith(c)) for c in RUN_CONTROL)


def config_fingerprint(config_dict: dict) -> dict[str, Any]:
    """The config values that decide what phases produce (JSON-normalised, so a reload compares equal)."""
    values = {k: v for k, v in flatten(config_dict).items() if not is_run_control(k)}
    return json.loads(json.dumps(values, default=str))


def changed_keys(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for keys in both whose values differ. A key only one side has was added or removed by a
    code change, not by the user: it is not reported."""
    return [
        f"{k}: {stored[k]!r} -> {current[k]!r}"
        for k in sorted(stored.keys() & current.keys())
        if stored[k] != current[k]
    ]


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


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic write; the previous version is kept as ``state.json.bak`` for recovery from a damaged file."""
    if path.exists():
        shutil.copyfile(path, path.with_name(path.name + ".bak"))
    write_atomic(path, json.dumps(state, indent=1, default=str))


# -- the folder itself -------------------------------------------------------------------------------------


def check_inside(run_dir: Path, method_dir: Path) -> None:
    """Deletion guard: ``run_dir`` must be a direct child of the method's folder (after resolving symlinks)."""
    target, parent = run_dir.resolve(), method_dir.resolve()
    if target.parent != parent or target == parent:
        raise RunFolderError(f"refusing to delete {run_dir}: it is not a run folder inside {method_dir}")


def clear_folder(run_dir: Path, keep: tuple[str, ...] = (LEASE_FILE,)) -> None:
    """run.fresh: delete everything in the run folder but the lease this driver holds."""
    for child in run_dir.iterdir():
        if child.name in keep:
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


class RunLease:
    """The driver's exclusive lease on a run folder for its lifetime (see module docstring)."""

    def __init__(self, run_dir: Path, timeout_s: float):
        self.path = run_dir / LEASE_FILE
        self.timeout_s = timeout_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.token = secrets.token_hex(8)
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _record(self) -> dict:
        return {
            "host": self.host,
            "pid": self.pid,
            "token": self.token,
            "started": self.started,
            "heartbeat": time.time(),
        }

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # half-written by a creator right now: judge it by the file's age
            try:
                return {"host": "?", "pid": -1, "heartbeat": self.path.stat().st_mtime}
            except FileNotFoundError:
                return None

    def stale_reason(self, holder: dict) -> str | None:
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("host") == self.host and holder.get("pid", -1) > 0 and not pid_alive(holder["pid"]):
            return f"its pid {holder['pid']} is not running on this host"
        if age > self.timeout_s:
            return f"its heartbeat is {age:.0f} s old (run.lease_timeout_s={self.timeout_s:g})"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            # Written whole under a temp name, then hard-linked into place: the link fails if a lease exists
            # (atomic, on NFS too), and a reader never sees a half-written lease.
            pending = temp_path(self.path)
            pending.write_text(json.dumps(self._record()))
            try:
                os.link(pending, self.path)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released between our create and our read: try again
                reason = self.stale_reason(holder)
                if reason is None:
                    age = time.time() - float(holder.get("heartbeat", 0))
                    raise RunFolderError(
                        f"{self.path.parent} is in use by another driver (host {holder.get('host')}, pid "
                        f"{holder.get('pid')}, heartbeat {age:.0f} s ago; lease {self.path}). One driver per run "
                        f"folder: wait for it to finish or stop it, or use another run.id"
                    ) from None
                try:  # only one of several drivers taking over the same stale lease wins this rename
                    os.rename(self.path, temp_path(self.path.with_name(LEASE_FILE + ".stale")))
                    log.warning("taking over the stale lease of %s: %s", self.path.parent, reason)
                except FileNotFoundError:
                    pass
                time.sleep(0.05)
                continue
            finally:
                pending.unlink(missing_ok=True)
            for old in self.path.parent.glob(f".{LEASE_FILE}.stale.*"):
                old.unlink(missing_ok=True)
            self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="run-lease")
            self._thread.start()
            return
        raise RunFolderError(f"{self.path}: could not acquire the lease (it kept changing hands)")

    def owned(self) -> bool:
        holder = self.holder()
        return bool(holder) and holder.get("token") == self.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            if not self.owned():
                self.lost = True
                log.error("lost the lease on %s to another driver (heartbeat missed for too long?)", self.path.parent)
                return
            try:
                write_atomic(self.path, json.dumps(self._record()))
            except OSError as err:  # shared storage hiccup: the next beat tries again before the lease goes stale
                log.warning("could not refresh the lease %s: %s", self.path, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.owned():
            self.path.unlink(missing_ok=True)
