"""LLM2LLM data logic (arXiv 2403.15042): only original seed examples the student got wrong are augmented;
teacher-made examples are never augmented again; data accumulates across iterations."""

from __future__ import annotations

from collections import Counter

from cluster.data import split_prompt


def wrong_seed_examples(seed: list[dict], verdicts: dict[str, str]) -> list[dict]:
    """Seed rows judged wrong. Rows not in the seed set (teacher-made) are ignored even when wrong."""
    return [row for row in seed if verdicts.get(row["id"]) not in ("yes", None)]


def accumulate(data: list[dict], new_examples: list[dict]) -> list[dict]:
    """All data so far plus the new examples, without duplicate ids."""
    seen = {row["id"] for row in data}
    return data + [row for row in new_examples if row["id"] not in seen]


def repeat_rows(rows: list[dict], n: int) -> list[dict]:
    """``rows`` cycled up to ``n`` rows, each copy under its own id (``<id>#<copy>``, the first copy keeps its id):
    the seed-only control's data, as many rows as the final student's so that, with the same training settings,
    it runs the same number of optimizer steps on the same schedule, with no teacher-made content."""
    if not rows:
        return []
    out = []
    for i in range(max(n, len(rows))):
        row, copy = rows[i % len(rows)], i // len(rows)
        out.append({**row, "id": row["id"] if copy == 0 else f"{row['id']}#{copy}", "source_id": row["id"]})
    return out


def instruction_wordings(rows: list[dict]) -> Counter:
    """How many rows put their input in each instruction framing (the prompt around the input: the template's
    head and tail). LLM2LLM's teacher writes new inputs that are put back into the seed's framing, so augmented
    data adds examples but no new wording of the task."""
    return Counter(split_prompt(r)[0] + "{input}" + split_prompt(r)[2] for r in rows)
