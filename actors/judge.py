"""One verdict interface for every method: rule verifiers where the task has a checkable answer, an LLM
judge on the judge pool otherwise.

Design note: parsing and verifying are pure functions (unit-tested on adversarial outputs); ``Judge``
only decides which one applies and batches LLM calls through an ``EnginePool``. Output that cannot be
parsed is the verdict ``unknown`` and is counted, never raised. Prompts live in ``actors/prompts/``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from cluster.environment import PROJECT_ROOT
from data.rows import meta, prompt_text

YES, NO, UNKNOWN = "yes", "no", "unknown"
WIN, LOSE, TIE = "win", "lose", "tie"

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _to_number(text: str) -> float | None:
    cleaned = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_final_number(response: str) -> float | None:
    """GSM8K/MATH-style final answer: the number after the last '####' (or 'answer is'), else the last number."""
    for marker in ("####", "answer is", "Answer:"):
        if marker in response:
            tail = response.rsplit(marker, 1)[1]
            match = _NUMBER.search(tail)
            if match:
                return _to_number(match.group())
    numbers = _NUMBER.findall(response)
    return _to_number(numbers[-1]) if numbers else None


def verify_number(response: str, label: str) -> str:
    """yes / no against the gold number; unknown when the response has no number to compare."""
    gold = _to_number(label)
    got = extract_final_number(response)
    if gold is None:
        return NO
    if got is None:
        return UNKNOWN
    return YES if abs(got - gold) < 1e-6 else NO


# Words that make the label mentioned right after them (same clause, at most 3 words on) no commitment:
# "not negative", "isn't positive", "never positive", "non negative", "neither ... nor".
_NEGATION = re.compile(r"\b(?:not|no|never|non|neither|nor|hardly|without|\w+n't)\b")
_CLAUSE_END = re.compile(r"[.!?;:,\n]|\bbut\b")
# Two labels joined as a list of options ("positive or negative", "positive/negative", "positive and negative"):
# the answer echoing the question or hedging, not committing to either.
_JOINER = r"\s*(?:,|/|\bor\b|\band\b|\bnor\b|\bvs\.?|\bversus\b)\s*(?:either\s+|both\s+)?"


def label_mentions(response: str, labels: list[str]) -> list[tuple[int, str, str]]:
    """Every whole-word mention of a label, in order: (position, label, role). role is 'committed', 'negated'
    (a negation word earlier in its clause, at most 3 words before it) or 'listed' (joined to another label
    as one of the options). A label inside another word ('positively', 'non-negative') is no mention."""
    lowered = response.lower()
    found = []
    for label in labels:
        # letters, digits, '-' and an apostrophe on either side make it part of another word
        for match in re.finditer(rf"(?<![\w'-]){re.escape(label.lower())}(?![\w'-])", lowered):
            found.append((match.start(), match.end(), label))
    found.sort()
    listed = set()
    for (start_a, end_a, a), (start_b, _, b) in zip(found, found[1:]):
        if a != b and re.fullmatch(_JOINER, lowered[end_a:start_b]):
            listed.update({start_a, start_b})
    mentions = []
    for start, _, label in found:
        before = _CLAUSE_END.split(lowered[:start])[-1]
        negated = any(_NEGATION.fullmatch(w) for w in re.findall(r"[\w']+", before)[-3:])
        role = "listed" if start in listed else "negated" if negated else "committed"
        mentions.append((start, label, role))
    return mentions


def extract_label(response: str, labels: list[str]) -> str | None:
    """The label the response commits to: its first mention that is neither negated ('not negative') nor one
    of a list of options ('positive or negative?'); None when there is none. A later different label does not
    override the first ('Positive. Some scenes are negative, though.'): answers state the verdict first."""
    committed = [label for _, label, role in label_mentions(response, labels) if role == "committed"]
    return committed[0] if committed else None


def verify_label(response: str, label: str, labels: list[str]) -> str:
    """yes / no against the gold label; unknown when the response commits to no label (none named, only
    negated ones, only the options listed), so an evaluation can report what it could not read apart from
    what was wrong."""
    found = extract_label(response, labels or [label])
    if found is None:
        return UNKNOWN
    return YES if found == label else NO


_LETTER_PATTERNS = [
    re.compile(r"(?i:answer)(?:\s+is)?\s*:?\s*\(?([A-J])\b"),
    re.compile(r"^\s*\(?([A-J])[\).:]", re.M),
    re.compile(r"^\s*\(?([A-J])\)?\s*$", re.M),
    re.compile(r"\(([A-J])\)"),
]


def extract_letter(response: str) -> str | None:
    for pattern in _LETTER_PATTERNS:
        match = pattern.search(response)
        if match:
            return match.group(1)
    return None


def verify_choice(response: str, label: str, choices: list[str] | None = None) -> str:
    letter = extract_letter(response)
    if letter is None and choices:
        # "The answer is Paris" without a letter: accept the exact choice text when only one appears.
        found = [i for i, c in enumerate(choices) if c and c.lower() in response.lower()]
        letter = "ABCDEFGHIJ"[found[0]] if len(found) == 1 else None
    if letter is None:
        return UNKNOWN
    return YES if letter == label else NO


def rule_verdict(row: dict, response: str) -> str | None:
    """Verdict of the task's rule verifier, or None when the task has none."""
    task, label = row.get("task", "none"), row.get("label", "")
    if not label:
        return None
    if task == "gsm8k":
        return verify_number(response, label)
    if task == "classification":
        return verify_label(response, label, meta(row).get("labels", []))
    if task == "multiple_choice":
        return verify_choice(response, label, meta(row).get("choices"))
    return None


def parse_yes_no(text: str) -> str:
    """'Verdict: yes' / 'Verdict: no'; a bare yes/no as last word; anything ambiguous is unknown."""
    verdicts = re.findall(r"verdict\s*[:\-]?\s*\**\s*(yes|no)\b", text, re.I)
    if verdicts:
        return verdicts[-1].lower() if len({v.lower() for v in verdicts}) == 1 else UNKNOWN
    words = set(re.findall(r"\b(yes|no)\b", text.lower()))
    return words.pop() if len(words) == 1 else UNKNOWN


def parse_preference(text: str) -> str:
    """'Verdict: A' / 'B' / 'tie' -> 'A', 'B', 'tie' or unknown."""
    verdicts = re.findall(r"verdict\s*[:\-]?\s*\**\s*(A|B|tie)\b", text, re.I)
    values = {v.upper() if v.lower() != "tie" else "tie" for v in verdicts}
    return values.pop() if len(values) == 1 else UNKNOWN


_FASTCHAT_VERDICT = re.compile(r"\[\[([ABC])\]\]")


def parse_fastchat_verdict(text: str) -> str:
    """FastChat's pairwise verdict format: '[[A]]', '[[B]]' or '[[C]]' (a tie) anywhere in the judgment -> 'A', 'B'
    or 'tie'. None of them, or two different ones, is unknown: FastChat would read '[[A]] ... [[B]]' as A (it
    looks for A, then B, then C), which lets a judge that quotes the format decide by where it quoted it."""
    found = set(_FASTCHAT_VERDICT.findall(text))
    if len(found) != 1:
        return UNKNOWN
    verdict = found.pop()
    return "tie" if verdict == "C" else verdict


def combine_orders(first: str, swapped: str) -> str:
    """A-vs-B asked as (A, B) and (B, A): agreement wins, disagreement or a tie is a tie."""
    if UNKNOWN in (first, swapped):
        return UNKNOWN
    forward = {"A": WIN, "B": LOSE, "tie": TIE}[first]
    backward = {"A": LOSE, "B": WIN, "tie": TIE}[swapped]
    return forward if forward == backward else TIE


def load_prompt(prompts_dir: str | Path, name: str) -> str:
    path = Path(prompts_dir)
    if not path.is_absolute():
        path = PROJECT_ROOT / path
    return (path / f"{name}.txt").read_text()


class Judge:
    """Equivalence (yes/no/unknown) and pairwise preference (win/lose/tie/unknown) for all methods."""

    def __init__(self, kind: str, prompts_dir: str, max_tokens: int, pool=None):
        self.kind, self.pool, self.max_tokens = kind, pool, max_tokens
        self.equivalence_prompt = load_prompt(prompts_dir, "equivalence")
        self.pairwise_prompt = load_prompt(prompts_dir, "pairwise")
        self.counts: Counter = Counter()

    def needs_llm(self, rows: list[dict]) -> bool:
        return self.kind == "llm" or (self.kind == "auto" and any(rule_verdict(r, "") is None for r in rows))

    def equivalent(self, items: list[dict], failed: list[dict] | None = None) -> dict[str, str]:
        """items: {id, row (the dataset record), response} -> {id: yes/no/unknown}. A row whose judge request
        failed gets no verdict (it is a failed row, appended to ``failed`` with the reason, not a wrong one)."""
        verdicts: dict[str, str] = {}
        llm_items = []
        for item in items:
            verdict = None if self.kind == "llm" else rule_verdict(item["row"], item["response"])
            if verdict is None:
                llm_items.append(item)
            else:
                verdicts[item["id"]] = verdict
                self.counts[f"rule_{verdict}"] += 1
        if llm_items:
            if self.pool is None:
                raise RuntimeError("judge: these rows have no rule verifier and no judge pool was started")
            from actors.engine import Sampling

            requests = [
                {
                    "id": it["id"],
                    "messages": [
                        {
                            "role": "user",
                            "content": self.equivalence_prompt.format(
                                question=prompt_text(it["row"]),
                                reference=it["row"]["reference"],
                                response=it["response"],
                            ),
                        }
                    ],
                }
                for it in llm_items
            ]
            sampling = Sampling(temperature=0.0, max_tokens=self.max_tokens)
            for out in self.pool.generate_all(requests, sampling, desc="judge", failed=failed).values():
                verdict = parse_yes_no(out["samples"][0]["text"])
                verdicts[out["id"]] = verdict
                self.counts[f"llm_{verdict}"] += 1
            self.counts["llm_failed"] += sum(it["id"] not in verdicts for it in llm_items)
        return verdicts

    def compare(self, items: list[dict], failed: list[dict] | None = None) -> dict[str, str]:
        """items: {id, question, a, b} -> {id: win/lose/tie/unknown} for A, asked in both orders. An item whose
        judge requests failed in both orders is appended to ``failed`` with the reason (and left out)."""
        from actors.engine import Sampling

        requests = []
        for it in items:
            for order, (x, y) in (("ab", (it["a"], it["b"])), ("ba", (it["b"], it["a"]))):
                text = self.pairwise_prompt.format(question=it["question"], a=x, b=y)
                requests.append({"id": f"{it['id']}::{order}", "messages": [{"role": "user", "content": text}]})
        lost: list[dict] = []
        outputs = self.pool.generate_all(
            requests, Sampling(temperature=0.0, max_tokens=self.max_tokens), desc="judge pairwise", failed=lost
        )
        results = {}
        for it in items:
            if all(f"{it['id']}::{o}" not in outputs for o in ("ab", "ba")):
                if failed is not None:
                    failed.append({"id": it["id"], "reason": "; ".join(f["reason"] for f in lost[:1]) or "no output"})
                continue
            parsed = [
                parse_preference(outputs[f"{it['id']}::{o}"]["samples"][0]["text"])
                if f"{it['id']}::{o}" in outputs
                else UNKNOWN
                for o in ("ab", "ba")
            ]
            results[it["id"]] = combine_orders(*parsed)
            self.counts[f"pairwise_{results[it['id']]}"] += 1
        return results
