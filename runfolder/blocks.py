"""Rows too many for the driver: a folder of Parquet parts read one block at a time.

A streamed ``data.train`` (``data.streaming``) is written as ``phases/data-train/part-<k>.parquet``, and every
phase run on it (``Run.block_phase``) writes its output for input part k as its own part k. Part numbers are
the block identity: a phase resumes at the first block not done, and a later phase reads block k of two earlier
ones together (SPIN: the prompts and their own answers). A folder is one Parquet dataset: pyarrow and
``ray.data.read_parquet`` read it whole; the per-block markers (``.part-<k>.json``) start with a dot, which both skip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq


def part_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def part_index(path: Path) -> int:
    return int(path.name.removeprefix("part-").removesuffix(".parquet"))


@dataclass(frozen=True)
class Blocks:
    """One or more part folders. Only counts and fingerprints look at every part, and they read no text."""

    folders: tuple[str, ...]

    @classmethod
    def of(cls, folder: str | Path) -> Blocks:
        return cls((str(Path(folder).resolve()),))

    def parts(self) -> list[Path]:
        found: list[Path] = []
        for folder in self.folders:
            found += sorted(Path(folder).glob("part-*.parquet"), key=part_index)
        return found

    def files(self) -> list[str]:
        return [str(p) for p in self.parts()]

    def __len__(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.parts())

    def block(self, k: int) -> list[dict]:
        """Rows of part k (of a single folder); [] when that block gave no rows."""
        path = Path(self.folders[0]) / part_name(k)
        return pq.read_table(path).to_pylist() if path.exists() else []

    def blocks(self) -> Iterator[tuple[int, list[dict]]]:
        for path in self.parts():
            yield part_index(path), pq.read_table(path).to_pylist()

    def head(self, n: int) -> list[dict]:
        rows: list[dict] = []
        for path in self.parts():
            if len(rows) >= n:
                break
            rows += pq.read_table(path).slice(0, n - len(rows)).to_pylist()
        return rows

    def fingerprint(self) -> str:
        """Content hash of the parts (read in 1 MiB chunks): equal parts, equal fingerprint, in any session."""
        digest = hashlib.sha256()
        for path in self.parts():
            digest.update(path.name.encode())
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()[:16]

    def __add__(self, other: Blocks | list) -> Blocks:
        """``current + previous``: SPIN's data schedule (``methods.spin.training_pairs``) on streamed pairs."""
        if isinstance(other, Blocks):
            return Blocks(self.folders + other.folders)
        if other == []:
            return self
        raise TypeError(f"cannot add {type(other).__name__} rows to streamed Blocks")
