"""A training phase's DeepSpeed checkpoint tags: which count as complete, which one a phase resumes from.

Design note: DeepSpeed's ``save_checkpoint`` has every rank write its own shard files under ``<ckpt>/<tag>/`` and
rank 0 write ``latest`` as soon as its own files are written, before the other ranks' are (its barrier comes
after). A rank that dies mid-save therefore leaves ``latest`` naming a tag with missing or torn shards, and a
resume that trusts ``latest`` fails on it at every retry. Here a tag counts only once it is complete:

- every rank saves with ``save_latest=False``, fsyncs the files it wrote, and tells rank 0 their names and sizes
  (a collective, so rank 0 knows all ranks finished);
- rank 0 then writes ``<tag>/complete.json`` (world size, micro step, every file with its size) and ``latest``,
  each atomically (temp file, fsync, rename, fsync of the folder), and deletes all but the newest
  ``training.keep_checkpoints`` complete tags, and any incomplete one;
- a resume picks the newest tag whose marker is there, matches the world size and whose files all have their
  recorded sizes; ``latest`` is written for DeepSpeed's own tools (``zero_to_fp32.py``) and never read.

The functions here only look at files: the collectives stay with the rank (``training.worker``).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from runfolder.state import fsync_dir, fsync_file, write_atomic

COMPLETE = "complete.json"
LATEST = "latest"
# DeepSpeed names each rank's shard files zero_pp_rank_<dp rank>_mp_rank_<mp rank>_{model,optim}_states.pt (with a
# bf16_ prefix for its BF16 optimizer); the rest of a tag (mp_rank_00_model_states.pt) is rank 0's.
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


def file_owner(name: str) -> int:
    """The rank that wrote one file of a tag."""
    found = _RANK_FILE.search(name)
    return int(found.group(1)) if found else 0


def sync_own_files(tag_dir: Path, rank: int) -> dict[str, int]:
    """fsync the files of ``tag_dir`` this rank wrote; their names and sizes (what rank 0 records)."""
    files = {}
    for path in sorted(tag_dir.iterdir()):
        if path.is_file() and file_owner(path.name) == rank and path.name != COMPLETE:
            fsync_file(path)
            files[path.name] = path.stat().st_size
    return files


@dataclass(frozen=True)
class Tag:
    name: str
    micro_step: int


def mark_complete(ckpt_dir: Path, tag: str, world_size: int, micro_step: int, files: dict[str, int]) -> None:
    """Rank 0, once every rank has synced its files: the tag's marker, then ``latest``."""
    tag_dir = ckpt_dir / tag
    fsync_dir(tag_dir)  # the files' names, written by every rank
    marker = {"tag": tag, "world_size": world_size, "micro_step": micro_step, "files": files}
    write_atomic(tag_dir / COMPLETE, json.dumps(marker, sort_keys=True))
    write_atomic(ckpt_dir / LATEST, tag)


def check_tag(tag_dir: Path, world_size: int) -> Tag | str:
    """The tag, if complete for ``world_size`` ranks; else why not."""
    try:
        marker = json.loads((tag_dir / COMPLETE).read_text())
        micro_step, ranks, files = int(marker["micro_step"]), int(marker["world_size"]), dict(marker["files"])
    except FileNotFoundError:
        return "no completion marker (a rank stopped while saving it)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable completion marker ({type(err).__name__}: {err})"
    if ranks != world_size:
        return f"saved by {ranks} ranks, this phase runs {world_size} (a ZeRO checkpoint loads on its own world size)"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when saved"
    return Tag(tag_dir.name, micro_step)


def scan(ckpt_dir: Path, world_size: int) -> tuple[list[Tag], dict[str, str]]:
    """(complete tags, oldest first; {unusable tag: why}) of a phase's checkpoint folder."""
    complete, unusable = [], {}
    if not ckpt_dir.is_dir():
        return [], {}
    for path in sorted(ckpt_dir.iterdir()):
        if not path.is_dir():
            continue
        found = check_tag(path, world_size)
        if isinstance(found, Tag):
            complete.append(found)
        else:
            unusable[path.name] = found
    complete.sort(key=lambda t: (t.micro_step, t.name))
    return complete, unusable


def remove_tag(ckpt_dir: Path, name: str) -> None:
    """Marker first: a removal cut short leaves an incomplete tag, never a 'complete' one missing files."""
    (ckpt_dir / name / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def prune(ckpt_dir: Path, world_size: int, keep: int) -> list[str]:
    """Rank 0: delete every tag but the newest ``keep`` complete ones; the deleted tags' names."""
    complete, unusable = scan(ckpt_dir, world_size)
    doomed = sorted(unusable) + [t.name for t in complete[: max(0, len(complete) - keep)]]
    for name in doomed:
        remove_tag(ckpt_dir, name)
    return doomed
