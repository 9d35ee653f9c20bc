"""S3FT target selection (arXiv 2502.08130): own answer if judged equivalent, else the model's paraphrase
of the gold answer if judged equivalent, else the gold answer.

A paraphrase is the gold response in the model's own words, so it must keep the gold's reasoning, not only its
final answer: a GSM8K paraphrase judged equivalent by its final number alone was, in a quality run, 24 times out
of 53 the bare answer ("The answer to the question is: 73"), and S3FT then trained on answers without their
working. ``keeps_reasoning`` checks it structurally for a worked gold answer (GSM8K): its calculation results are
its steps, and a rewording keeps those numbers whatever its words, while a bare answer keeps none of them.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_RESULT = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")  # a calculation's result: the number after '='

OWN, PARAPHRASE, GOLD = "own", "paraphrase", "gold"
BUCKETS = (OWN, PARAPHRASE, GOLD)


def select_target(
    row: dict, own: str, own_verdict: str, paraphrase: str | None, paraphrase_verdict: str | None
) -> tuple[str, str]:
    """(bucket, training target). 'unknown' verdicts count as not equivalent: the gold answer is the safe target."""
    if own_verdict == "yes" and own.strip():
        return OWN, own
    if paraphrase is not None and paraphrase_verdict == "yes" and paraphrase.strip():
        return PARAPHRASE, paraphrase
    return GOLD, row["reference"]


def bucket_fractions(buckets: list[str]) -> dict[str, float]:
    total = max(len(buckets), 1)
    return {b: buckets.count(b) / total for b in BUCKETS}


def _value(text: str) -> float:
    return float(text.replace(",", ""))


def step_results(reference: str) -> list[float]:
    """The intermediate results of a worked answer: the number after each '=' before the '####' line (a GSM8K
    solution's calculations; its calculator annotations are removed on load), the final answer left out; with
    no '=' in it, every number of its working. Distinct, in order."""
    working, _, final = reference.partition("####")
    finals = {_value(n) for n in _NUMBER.findall(final)}
    found = [_value(n) for n in _RESULT.findall(working)] or [_value(n) for n in _NUMBER.findall(working)]
    out: list[float] = []
    for value in found:
        if value not in finals and value not in out:
            out.append(value)
    return out


def keeps_reasoning(reference: str, paraphrase: str, min_fraction: float) -> bool:
    """Whether ``paraphrase`` states at least ``min_fraction`` of the gold's intermediate results (at least one).
    A gold answer without any (a one-step answer, a label) has no steps to keep: True. Below 1 because a rewording
    may merge two steps (3 * 4 * 5 = 60 without the 12)."""
    steps = step_results(reference)
    if not steps or min_fraction <= 0:
        return True
    stated = {_value(n) for n in _NUMBER.findall(paraphrase)}
    needed = max(1, -(-len(steps) * min_fraction // 1))  # ceil
    return sum(step in stated for step in steps) >= needed


def reasoning_verdicts(
    rows: list[dict], paraphrases: dict[str, str], verdicts: dict[str, str], min_fraction: float
) -> tuple[dict[str, str], list[str]]:
    """(verdicts, answer_only ids): a 'yes' verdict on a worked task's paraphrase (GSM8K) becomes 'no' when the
    paraphrase drops the gold's steps (``keeps_reasoning``); those rows' ids are returned to be counted."""
    out, answer_only = dict(verdicts), []
    for row in rows:
        text = paraphrases.get(row["id"])
        if row.get("task") != "gsm8k" or text is None or out.get(row["id"]) != "yes":
            continue
        if not keeps_reasoning(row["reference"], text, min_fraction):
            out[row["id"]] = "no"
            answer_only.append(row["id"])
    return out, answer_only
