"""evaluation.mt_bench: the pure part of the MT-Bench pairwise win rate (jobs.mt_bench_phase), without Ray.

FastChat's verdict format and swap rule, the counts and the bootstrap interval, the question order, the judge's
conversation as FastChat builds it from its own prompts (shipped verbatim), and the check before Ray. The phases
themselves run in the AFT tiny job (tests/test_jobs.py::test_aft_propose_and_aggregate).
"""

import json

import pytest

from actors.judge import parse_fastchat_verdict
from configs.schema import ConfigError, load_config
from data.rows import mtbench_file, mtbench_questions, mtbench_references
from jobs import mt_bench_phase as mt
from jobs.mt_bench_phase import FAILED, UNPARSEABLE

ROOT = mt.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("Assistant A is more detailed. [[A]]", "A"),
        ("[[B]]", "B"),
        ("Both are equally good, so [[C]]", "tie"),
        ("My final verdict: [[A]]. Again: [[A]]", "A"),  # the same verdict twice is that verdict
        ('I output "[[A]]" if A is better... here B is: [[B]]', "unknown"),  # two kinds: not FastChat's "A"
        ("Assistant A is better.", "unknown"),  # the words, not the format
        ("[A]", "unknown"),
        ("[[a]]", "unknown"),
        ("[[D]]", "unknown"),
        ("", "unknown"),
        ("\u2020\ufffd random tokens [[", "unknown"),
    ],
)
def test_fastchat_verdict_format(text, verdict):
    assert parse_fastchat_verdict(text) == verdict


@pytest.mark.parametrize(
    "first, swapped, outcome, inconsistent",
    [
        ("A", "B", "win", False),  # newer as A wins, and newer as B wins
        ("B", "A", "lose", False),
        ("tie", "tie", "tie", False),
        ("A", "A", "tie", True),  # each order prefers position A: position bias, a tie
        ("B", "B", "tie", True),
        ("A", "tie", "tie", True),  # a win in one order only is no win
        ("tie", "A", "tie", True),
        ("A", UNPARSEABLE, UNPARSEABLE, False),  # never a tie
        (UNPARSEABLE, "B", UNPARSEABLE, False),
        ("A", FAILED, FAILED, False),
        (FAILED, UNPARSEABLE, FAILED, False),
    ],
)
def test_swap_rule(first, swapped, outcome, inconsistent):
    assert mt.game_outcome(first, swapped) == outcome
    assert mt.inconsistent(first, swapped) is inconsistent


def test_counts_win_rate_and_interval():
    games = (
        [{"question_id": q, "turn": 1, "first": "A", "swapped": "B"} for q in range(6)]  # 6 wins
        + [{"question_id": 6 + q, "turn": 1, "first": "A", "swapped": "A"} for q in range(2)]  # 2 ties (inconsistent)
        + [{"question_id": 8, "turn": 1, "first": "B", "swapped": "A"}]  # 1 loss
        + [{"question_id": 9, "turn": 1, "first": UNPARSEABLE, "swapped": "B"}]  # left out of the rate
        + [{"question_id": 10, "turn": 1, "first": FAILED, "swapped": FAILED}]
    )
    s = mt.summarize(games, resamples=2000, seed=0)
    assert (s["win"], s["tie"], s["lose"], s["unparseable"], s["failed"]) == (6, 2, 1, 1, 1)
    assert s["win"] + s["tie"] + s["lose"] + s["unparseable"] + s["failed"] == s["games"] == 11
    assert s["decided"] == 9 and s["inconsistent"] == 2
    assert s["win_rate"] == round((6 + 0.5 * 2) / 9, 4)
    # each order's verdicts add up to the games; both orders to games x 2
    assert all(sum(s["verdicts"][o].values()) == 11 for o in mt.ORDERS)
    assert s["verdicts"]["first"] == {"A": 8, "B": 1, "tie": 0, UNPARSEABLE: 1, FAILED: 1}
    assert s["verdicts"]["swapped"] == {"A": 3, "B": 7, "tie": 0, UNPARSEABLE: 0, FAILED: 1}
    low, high = s["ci95"]
    assert 0.0 <= low < s["win_rate"] < high <= 1.0
    assert s == mt.summarize(games, resamples=2000, seed=0)  # seeded: the same interval on a rerun
    # more decided questions with the same rate: a narrower interval
    wide = high - low
    many = mt.summarize([{**g, "question_id": (g["question_id"], k)} for g in games for k in range(10)], 2000, 0)
    assert many["win_rate"] == s["win_rate"] and many["ci95"][1] - many["ci95"][0] < wide / 2


def test_a_questions_games_are_resampled_together_and_nothing_decided_has_no_rate():
    # Two turns of one question count as two games, resampled as one question: all-win and all-lose questions.
    games = [
        {"question_id": q, "turn": t, "first": v, "swapped": w}
        for q, (v, w) in enumerate([("A", "B"), ("B", "A")])
        for t in (1, 2)
    ]
    s = mt.summarize(games, resamples=500, seed=1)
    assert s["questions"] == 2 and s["games"] == 4 and s["win_rate"] == 0.5
    assert s["ci95"] == [0.0, 1.0]  # with 2 questions, a resample is both wins, both losses or one of each
    none = mt.summarize([{"question_id": 1, "turn": 1, "first": UNPARSEABLE, "swapped": UNPARSEABLE}], 500, 0)
    assert none["win_rate"] is None and none["ci95"] is None and none["unparseable"] == 1


def test_unparseable_judgments_over_the_limit_stop_the_comparison():
    counts = {"A": 3, "B": 3, "tie": 1, UNPARSEABLE: 3, FAILED: 2}
    result = {"verdicts": {"first": counts, "swapped": counts}}
    assert mt.unparseable_share(result) == (6, 20)  # failed requests are not unreadable verdicts
    assert mt.too_many_unparseable(result, 0.2) and not mt.too_many_unparseable(result, 0.3)
    assert not mt.too_many_unparseable(result, 1.0)


def test_questions_are_taken_in_turns_across_categories():
    questions = mtbench_questions()
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    assert mt.select_questions(questions, 0) == questions
    first8 = mt.select_questions(questions, 8)
    assert sorted(q["category"] for q in first8) == sorted(set(q["category"] for q in questions))
    assert [q["question_id"] for q in mt.select_questions(questions, 3)] == [81, 91, 101]
    assert mt.select_questions(questions, 9)[-1]["question_id"] == 82  # the second writing question comes next


def test_shipped_judge_prompts_are_fastchats():
    shipped = json.loads((ROOT / "actors/prompts/mt_bench_judge.json").read_text())
    assert "lm-sys/FastChat" in shipped["source"]
    packaged = {
        p["name"]: p
        for p in map(json.loads, (mtbench_file("..") / "judge_prompts.jsonl").read_text().splitlines())
        if p["type"] == "pairwise"
    }
    assert (
        set(shipped["prompts"])
        == set(packaged)
        == {"pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn"}
    )
    for name, prompt in shipped["prompts"].items():  # the package's copy says "position biases"; FastChat's not
        assert prompt["prompt_template"] == packaged[name]["prompt_template"]
        assert prompt["system_prompt"] == packaged[name]["system_prompt"].replace(
            "position biases", "positional biases"
        )
        assert (
            '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie'
            in (prompt["system_prompt"])
        )


def test_judge_conversation_as_fastchat_builds_it():
    prompts = mt.load_judge_prompts("actors/prompts")
    questions = {q["question_id"]: q for q in mtbench_questions()}
    references = mtbench_references()
    writing, reasoning = questions[81], questions[101]
    assert mt.judge_prompt_name("writing", 1, True) == "pair-v2"
    assert mt.judge_prompt_name("reasoning", 1, True) == "pair-math-v1"
    assert mt.judge_prompt_name("coding", 2, True) == "pair-math-v1-multi-turn"
    assert mt.judge_prompt_name("math", 1, False) == "pair-v2"
    system, user = mt.judge_messages(prompts, "pair-v2", writing, ["new one"], ["old one"], None)
    assert system == {"role": "system", "content": prompts["pair-v2"]["system_prompt"]}
    assert user["content"] == (
        f"[User Question]\n{writing['turns'][0]}\n\n[The Start of Assistant A's Answer]\nnew one\n"
        "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\nold one\n"
        "[The End of Assistant B's Answer]"
    )
    _, user = mt.judge_messages(
        prompts, "pair-math-v1-multi-turn", reasoning, ["a1", "a2"], ["b1", "b2"], references[101]
    )
    text = user["content"]
    assert references[101][0] in text and references[101][1] in text
    assert text.index("### Assistant A:\na1") < text.index("### Assistant A:\na2") < text.index("### Assistant B:\nb1")
    assert reasoning["turns"][1] in text
    assert mt.temperature_for("writing", "by_category") == 0.7 and mt.temperature_for("stem", "by_category") == 0.1
    assert mt.temperature_for("math", "by_category") == 0.0 and mt.temperature_for("writing", "greedy") == 0.0


def test_check_before_ray(tmp_path):
    base = ROOT / "configs/aft-tiny.yaml"
    mt.check(load_config(base, ["evaluation.mt_bench.enabled=true"]))  # the shipped prompts and questions pass
    (tmp_path / "equivalence.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"evaluation.mt_bench: judge.prompts_dir has no readable mt_bench_judge"):
        mt.check(load_config(base, ["evaluation.mt_bench.enabled=true", f"judge.prompts_dir={tmp_path}"]))
    mt.check(load_config(base, [f"judge.prompts_dir={tmp_path}"]))  # off: nothing to read
    with pytest.raises(ConfigError, match="evaluation.mt_bench.turns: must be in"):
        load_config(base, ["evaluation.mt_bench.turns=3"])
