"""SPIN data construction (arXiv 2401.01335): gold answer = chosen ("real"), own answer = rejected."""

from __future__ import annotations


def beta_for(iteration: int, betas: list[float]) -> float:
    """β of iteration t, counted from 0 as the paper does; the last configured value repeats (paper: 0.1, raised
    to 5.0 at iteration 3, so [0.1, 0.1, 0.1, 5.0])."""
    return betas[min(iteration, len(betas) - 1)]


def lr_for(iteration: int, lrs: list[float]) -> float | None:
    """Peak lr of iteration t (last value repeats; paper: 5e-7 for iterations 0-1, then 1e-7); None when no list
    is configured, so the preference phases' lr applies."""
    return lrs[min(iteration, len(lrs) - 1)] if lrs else None


def sft_examples(rows: list[dict]) -> list[dict]:
    """Gold answers as SFT targets: the SFT'd starting point SPIN assumes."""
    return [
        {"id": r["id"], "source_id": r["id"], "messages": r["messages"], "response": r["reference"]}
        for r in rows
        if r["reference"]
    ]


def build_pairs(rows: list[dict], generations: dict[str, dict], iteration: int) -> list[dict]:
    """One pair per prompt that has both a gold answer and a generation; ids stay tied to the source row."""
    pairs = []
    for row in rows:
        generated = generations.get(row["id"])
        if generated is None or not row["reference"]:
            continue
        pairs.append(
            {
                "id": f"{row['id']}@{iteration}",
                "source_id": row["id"],
                "iteration": iteration,
                "messages": row["messages"],
                "chosen": row["reference"],
                "rejected": generated["response"],
            }
        )
    return pairs


def training_pairs(current: list[dict], previous: list[dict], mix_previous: bool) -> list[dict]:
    """Iteration t's pairs, plus iteration t-1's when mixing (the official code's data schedule)."""
    return current + (previous if mix_previous else [])
