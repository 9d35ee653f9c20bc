"""Shared pieces of the benchmarks: a fixed prompt set and table printing."""

from __future__ import annotations

import json

from cluster.data import load_dataset, take


def bench_prompts(n: int = 16, seed: int = 0) -> list[dict]:
    """Real instructions (MT-Bench first turns): varied lengths, open-ended answers."""
    rows, _ = load_dataset("mtbench")
    return [{"id": r["id"], "messages": r["messages"]} for r in take(rows, n, seed)]


def print_table(title: str, rows: list[tuple], headers: tuple) -> None:
    widths = [max(len(str(h)), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    for row in rows:
        print("  ".join(_fmt(v).ljust(w) for v, w in zip(row, widths)))


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def emit(result: dict) -> None:
    print(json.dumps(result))
