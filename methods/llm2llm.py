"""LLM2LLM data logic (arXiv 2403.15042): only original seed examples the student got wrong are augmented;
teacher-made examples are never augmented again; data accumulates across iterations.

The wrong-answer test of a '####' task (GSM8K form) is the official one (SqueezeAILab/LLM2LLM, GSM8K/filter.py):
the student's answer is read at its first '#'-run followed by a space, the rest of that line; an answer without
that form is wrong, however right its last number is; numbers compare as the code's ``compare_strings`` does.
"""

from __future__ import annotations

import re
from collections import Counter

from data.rows import split_prompt


def wrong_seed_examples(seed: list[dict], verdicts: dict[str, str]) -> list[dict]:
    """Seed rows judged wrong. Rows not in the seed set (teacher-made) are ignored even when wrong."""
    return [row for row in seed if verdicts.get(row["id"]) not in ("yes", None)]


_MARKED = re.compile(r"#+ (.*)")  # filter.py: re.search(r"#+ (.*)", text).group(1)


def marked_answer(response: str) -> str | None:
    """The answer after the first '#'-run and a space (rest of that line, stripped); None without one."""
    found = _MARKED.search(response)
    return found.group(1).strip() if found else None


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit() or ch == ".")


def same_answer(gold: str, answer: str) -> bool:
    """filter.py's compare_strings: equal as numbers made of the digits and points of each (so '$1,000' equals
    '1000'), else equal as lower-cased text without commas."""
    try:
        return float(_digits(gold)) == float(_digits(answer))
    except ValueError:
        return gold.lower().replace(",", "") == answer.lower().replace(",", "")


def official_verdict(response: str, reference: str) -> str:
    """'yes' / 'no' for a '####' task's answer by the official filter; the gold answer is what follows '#### '."""
    gold = re.search(r"#### (.*)", reference, re.S)
    answer = marked_answer(response)
    if gold is None or answer is None:
        return "no"
    return "yes" if same_answer(gold.group(1).strip(), answer) else "no"


def seed_verdicts(seed: list[dict], answers: dict[str, str], judged: dict[str, str]) -> tuple[dict[str, str], int]:
    """(verdicts, unmarked): the official test for seed rows whose gold answer has the '#### n' form, the judge's
    verdict for the others; ``unmarked`` counts the answers the judge found right that lack the '#### n' form (the
    seeds the official filter adds to the augmented ones). A seed without an answer keeps no verdict (failed)."""
    verdicts, unmarked = dict(judged), 0
    for row in seed:
        if row["id"] not in answers or re.search(r"#### \S", row["reference"]) is None:
            continue
        verdicts[row["id"]] = official_verdict(answers[row["id"]], row["reference"])
        unmarked += judged.get(row["id"]) == "yes" and marked_answer(answers[row["id"]]) is None
    return verdicts, unmarked


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
