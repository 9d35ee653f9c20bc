"""Shared storage, checked from where the work runs.

On a cluster every node must see the same model folders (``model.cache_dir``, a local model path) and the same
run folder (``run.dir``: phase files, training checkpoints the generator reloads, W&B files) at the same paths.
On one machine that is always true, so nothing else would notice a node that lacks the mount until a phase
failed deep inside an engine or a training rank. Each pool replica and training rank therefore runs
``storage_problems`` on its own node when it starts, and the pool fails at once naming the node, the path and
what to mount. Pure Python; the caller passes its node id.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from pathlib import Path

MOUNT_HINT = {
    "read": "mount the shared volume that holds it (HF_HOME or model.cache_dir / the model folder) at the same path on "
    "every node",
    "write": "mount the shared volume that holds run.dir at the same path, writable, on every node",
}


class StorageError(RuntimeError):
    """A node cannot use a path the job shares between nodes."""


def _readable(path: Path) -> str | None:
    if not path.exists():
        return "does not exist on this node"
    if path.is_dir():
        try:
            next(iter(path.iterdir()), None)
        except OSError as err:
            return f"cannot be listed ({err.strerror or err})"
        if (path / "config.json").exists() and not os.access(path / "config.json", os.R_OK):
            return "config.json is not readable"
        return None
    return None if os.access(path, os.R_OK) else "is not readable"


def _writable(path: Path) -> str | None:
    if not path.is_dir():
        return "does not exist on this node" if not path.exists() else "is not a folder"
    probe = path / f".write-probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        return f"is not writable ({err.strerror or err})"
    return None


def storage_problems(read: Iterable[str] = (), write: Iterable[str] = ()) -> list[tuple[str, str, str]]:
    """(path, what is wrong, what to mount) for each path this process cannot use."""
    found = []
    for kind, paths, check in (("read", read, _readable), ("write", write, _writable)):
        for path in paths:
            problem = check(Path(path))
            if problem:
                found.append((str(path), problem, MOUNT_HINT[kind]))
    return found


def check_storage(who: str, node: str, read: Iterable[str] = (), write: Iterable[str] = ()) -> None:
    """Raise ``StorageError`` naming ``who`` (pool and replica), the node, each path and the mount it needs."""
    problems = storage_problems(read, write)
    if problems:
        details = "; ".join(f"{path} {problem}: {hint}" for path, problem, hint in problems)
        raise StorageError(f"{who} on node {node} ({socket.gethostname()}): {details}")
