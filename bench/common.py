"""Shared pieces of the benchmarks: a fixed prompt set and table printing."""

from __future__ import annotations

import argparse
import json
from queue import Empty

from data.rows import load_dataset, take

# One bare vLLM engine in one process on both cores: the baseline the actors are measured against.
BARE_VLLM_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "OMP_NUM_THREADS": "2",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def bench_prompts(n: int = 16, seed: int = 0) -> list[dict]:
    """Real instructions (MT-Bench first turns): varied lengths, open-ended answers."""
    rows, _ = load_dataset("mtbench", require_reference=False)  # prompts only: no gold answers needed
    return [{"id": r["id"], "messages": r["messages"]} for r in take(rows, n, seed)]


def in_subprocess(target, *args):
    """Run ``target(*args, queue)`` in a fresh spawned process (its own threads, no Ray) and return what it puts."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    while True:  # a child that dies before putting its result must not hang the benchmark
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{target.__name__} exited with code {proc.exitcode} before reporting") from None
    proc.join()
    return result


def print_table(title: str, rows: list[tuple], headers: tuple) -> None:
    widths = [max([len(str(h))] + [len(_fmt(r[i])) for r in rows]) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    for row in rows:
        print("  ".join(_fmt(v).ljust(w) for v, w in zip(row, widths)))


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def emit(result: dict) -> None:
    print(json.dumps(result))


def parse_cli(doc: str | None, add_options=None) -> argparse.Namespace:
    """Every benchmark answers ``--help`` (its docstring) instead of starting to run; ``add_options(parser)``
    declares a benchmark's own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_options:
        add_options(parser)
    return parser.parse_args()
