"""S3FT target selection (arXiv 2502.08130): own answer if judged equivalent, else the model's paraphrase
of the gold answer if judged equivalent, else the gold answer."""

from __future__ import annotations

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
