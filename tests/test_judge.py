import pytest

from actors.judge import (
    combine_orders,
    extract_final_number,
    extract_letter,
    parse_preference,
    parse_yes_no,
    rule_verdict,
)
from cluster.data import load_dataset


def test_gold_gsm8k_answers_verify_against_their_labels():
    rows, _ = load_dataset("gsm8k")
    sample = rows[:200]
    assert all(rule_verdict(r, r["reference"]) == "yes" for r in sample)
    # A wrong final number fails, even when the right one appears earlier in the reasoning.
    assert rule_verdict(sample[0], "16 - 3 - 4 = 9 eggs, so 9 * 2 = 18. #### 19") == "no"
    assert rule_verdict(sample[0], "She makes $18.") == "yes"
    assert rule_verdict(sample[0], "") == "no"


def test_number_extraction():
    assert extract_final_number("The answer is 1,234.") == 1234
    assert extract_final_number("#### -5") == -5
    assert extract_final_number("no digits") is None


def test_classification_and_choice_verifiers():
    rows, _ = load_dataset("sst2")
    positive = next(r for r in rows if r["label"] == "positive")
    assert rule_verdict(positive, "Positive.") == "yes"
    assert rule_verdict(positive, "The review is negative, not positive.") == "no"  # first commitment counts
    assert rule_verdict(positive, "I cannot tell") == "no"
    arc, _ = load_dataset("arc_easy")
    row = arc[0]
    assert rule_verdict(row, f"The answer is ({row['label']}).") == "yes"
    assert rule_verdict(row, f"{row['label']}. something") == "yes"
    assert extract_letter("Answer: C") == "C" and extract_letter("I think so") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Verdict: yes", "yes"),
        ("verdict: NO", "no"),
        ("", "unknown"),
        ("Verdict: yes\nVerdict: no", "unknown"),
        ("yes and no", "unknown"),
        ("I am not sure.", "unknown"),
        ("Reasoning... **Verdict:** yes trailing", "yes"),
        ("no", "no"),
    ],
)
def test_parse_yes_no_adversarial(text, expected):
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Verdict: A", "A"),
        ("Verdict: b", "B"),
        ("Verdict: tie", "tie"),
        ("A is better. Verdict: B", "B"),
        ("Verdict: A or Verdict: B", "unknown"),
        ("", "unknown"),
        ("both are fine", "unknown"),
    ],
)
def test_parse_preference_adversarial(text, expected):
    assert parse_preference(text) == expected


def test_position_bias_cancels():
    assert combine_orders("A", "B") == "win"  # A preferred in both orders
    assert combine_orders("B", "A") == "lose"
    assert combine_orders("A", "A") == "tie"  # always the first slot: position bias, no preference
    assert combine_orders("tie", "tie") == "tie"
    assert combine_orders("A", "unknown") == "unknown"
