"""LLM2LLM data logic (arXiv 2403.15042): only original seed examples the student got wrong are augmented;
teacher-made examples are never augmented again; data accumulates across iterations."""

from __future__ import annotations


def wrong_seed_examples(seed: list[dict], verdicts: dict[str, str]) -> list[dict]:
    """Seed rows judged wrong. Rows not in the seed set (teacher-made) are ignored even when wrong."""
    return [row for row in seed if verdicts.get(row["id"]) not in ("yes", None)]


def accumulate(data: list[dict], new_examples: list[dict]) -> list[dict]:
    """All data so far plus the new examples, without duplicate ids."""
    seen = {row["id"] for row in data}
    return data + [row for row in new_examples if row["id"] not in seen]
