import pytest

from actors.judge import (
    combine_orders,
    extract_final_number,
    extract_label,
    extract_letter,
    label_mentions,
    parse_preference,
    parse_yes_no,
    rule_verdict,
)
from data.rows import load_dataset


def test_gold_gsm8k_answers_verify_against_their_labels():
    rows, _ = load_dataset("gsm8k")
    sample = rows[:200]
    assert all(rule_verdict(r, r["reference"]) == "yes" for r in sample)
    # A wrong final number fails, even when the right one appears earlier in the reasoning.
    assert rule_verdict(sample[0], "16 - 3 - 4 = 9 eggs, so 9 * 2 = 18. #### 19") == "no"
    assert rule_verdict(sample[0], "She makes $18.") == "yes"
    assert rule_verdict(sample[0], "") == "unknown"  # no number at all: unreadable, not a wrong number


def test_number_extraction():
    assert extract_final_number("The answer is 1,234.") == 1234
    assert extract_final_number("#### -5") == -5
    assert extract_final_number("no digits") is None


def test_classification_and_choice_verifiers():
    rows, _ = load_dataset("sst2")
    positive = next(r for r in rows if r["label"] == "positive")
    assert rule_verdict(positive, "Positive.") == "yes"
    assert rule_verdict(positive, "The review is negative, not positive.") == "no"  # first commitment counts
    assert rule_verdict(positive, "I cannot tell") == "unknown"
    arc, _ = load_dataset("arc_easy")
    row = arc[0]
    assert rule_verdict(row, f"The answer is ({row['label']}).") == "yes"
    assert rule_verdict(row, f"{row['label']}. something") == "yes"
    assert extract_letter("Answer: C") == "C" and extract_letter("I think so") is None
    assert rule_verdict(row, "I think so") == "unknown"


# (answer, verdict against the gold label 'positive', verdict against 'negative'). The first-label rule this
# replaced fails 13 of these: it read "positive or negative? It is negative" as positive, "not negative" as
# negative, "non-negative" as negative, and every answer without a label as a wrong one.
SENTIMENT_ANSWERS = [
    ("positive", "yes", "no"),
    ("Positive!", "yes", "no"),
    ("The sentiment of this review is positive.", "yes", "no"),
    ("The sentiment of this movie review is negative. The reviewer dislikes the plot.", "no", "yes"),
    ("**Negative**", "no", "yes"),
    ("Sentiment: NEGATIVE", "no", "yes"),
    # the options echoed before the answer are no commitment
    ("positive or negative? It is negative", "no", "yes"),
    ("Is it positive or negative? Positive.", "yes", "no"),
    ("positive/negative: negative", "no", "yes"),
    # negated mentions are no commitment
    ("The review is negative, not positive.", "no", "yes"),
    ("It is not negative; the reviewer loved it, so positive.", "yes", "no"),
    ("This review isn't positive at all. Negative.", "no", "yes"),
    ("The tone is never negative. Overall: positive", "yes", "no"),
    ("not negative", "unknown", "unknown"),
    ("It is non negative.", "unknown", "unknown"),
    # both named as options, or as a mix: no commitment
    ("The review is both positive and negative.", "unknown", "unknown"),
    ("neither positive nor negative", "unknown", "unknown"),
    # a label inside another word is no mention of it
    ("The reviewer speaks positively about the film.", "unknown", "unknown"),
    ("a non-negative review", "unknown", "unknown"),
    ("Negatively.", "unknown", "unknown"),
    ("", "unknown", "unknown"),
    # the verdict first, the details after: the first commitment counts
    ("Positive. Some scenes are negative, though.", "yes", "no"),
    ("The sentiment is negative, but the acting is positive.", "no", "yes"),
]


@pytest.mark.parametrize("answer, if_positive, if_negative", SENTIMENT_ANSWERS)
def test_classification_verifier_reads_the_label_the_answer_commits_to(answer, if_positive, if_negative):
    rows, _ = load_dataset("sst2")
    positive = next(r for r in rows if r["label"] == "positive")
    negative = next(r for r in rows if r["label"] == "negative")
    assert (rule_verdict(positive, answer), rule_verdict(negative, answer)) == (if_positive, if_negative)


def test_label_mentions_roles_and_yes_no_labels():
    labels = ["negative", "positive"]
    assert label_mentions("positive or negative? It is negative", labels) == [
        (0, "positive", "listed"),
        (12, "negative", "listed"),
        (28, "negative", "committed"),
    ]
    assert [m[2] for m in label_mentions("not negative", labels)] == ["negated"]
    assert extract_label("It doesn't seem negative. It is positive.", labels) == "positive"
    # BoolQ's labels: 'no' is a label there, and still a negation word for a following label
    boolq = ["no", "yes"]
    assert extract_label("No, the passage says otherwise.", boolq) == "no"
    assert extract_label("Yes.", boolq) == "yes"
    assert extract_label("yes or no? Yes", boolq) == "yes"
    assert extract_label("I know nothing", boolq) is None


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
