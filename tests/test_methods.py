from actors.judge import load_prompt
from cluster.data import record
from methods.aft import aggregation_messages, build_examples, propose_and_aggregate
from methods.llm2llm import accumulate, wrong_seed_examples
from methods.s3ft import bucket_fractions, select_target
from methods.spin import beta_for, build_pairs, sft_examples, training_pairs

ROWS = [record("a", "What is 1+1?", "2", "2", "gsm8k"), record("b", "Say hi", "hi"), record("c", "No gold")]


def test_spin_pairs_chosen_is_gold_rejected_is_own():
    generations = {"a": {"response": "3"}, "b": {"response": "hello"}, "c": {"response": "x"}}
    pairs = build_pairs(ROWS, generations, iteration=1)
    assert [(p["source_id"], p["chosen"], p["rejected"]) for p in pairs] == [("a", "2", "3"), ("b", "hi", "hello")]
    assert pairs[0]["id"] == "a@1"  # unique across iterations, so mixing t-1 never collides
    assert len(training_pairs(pairs, build_pairs(ROWS, generations, 0), True)) == 4
    assert training_pairs(pairs, ["old"], False) == pairs
    assert [beta_for(t, [0.1, 0.1, 5.0]) for t in range(5)] == [0.1, 0.1, 5.0, 5.0, 5.0]
    assert [(e["id"], e["response"]) for e in sft_examples(ROWS)] == [("a", "2"), ("b", "hi")]  # no gold: skipped


def test_s3ft_bucket_selection():
    row = ROWS[0]
    assert select_target(row, "2", "yes", None, None) == ("own", "2")
    assert select_target(row, "3", "no", "two", "yes") == ("paraphrase", "two")
    assert select_target(row, "3", "no", "three", "no") == ("gold", "2")
    assert select_target(row, "3", "unknown", "two", "unknown") == ("gold", "2")
    assert select_target(row, "  ", "yes", None, None) == ("gold", "2")
    assert bucket_fractions(["own", "gold", "gold", "paraphrase"]) == {"own": 0.25, "paraphrase": 0.25, "gold": 0.5}


def test_llm2llm_only_seed_examples_are_eligible():
    seed = ROWS[:2]
    teacher_made = record("a-aug0-0", "What is 2+2?", "4", "4", "gsm8k")
    verdicts = {"a": "no", "b": "yes", "a-aug0-0": "no"}
    wrong = wrong_seed_examples(seed, verdicts)
    assert [r["id"] for r in wrong] == ["a"]  # the wrong teacher-made example is never re-augmented
    assert [r["id"] for r in wrong_seed_examples(seed, {"a": "unknown"})] == ["a"]  # unknown counts as wrong
    data = accumulate(seed, [teacher_made])
    assert [r["id"] for r in accumulate(data, [teacher_made])] == ["a", "b", "a-aug0-0"]


def test_aft_aggregation_prompt_and_examples():
    template = load_prompt("actors/prompts", "aggregate_system")
    messages = aggregation_messages(template, ROWS[0]["messages"], ["two", " 3 "])
    assert messages[0]["role"] == "system" and "1. two\n2. 3" in messages[0]["content"]
    assert messages[1:] == ROWS[0]["messages"]  # the query stays the user turn
    examples = build_examples(ROWS, {"a": ["two", "3"]}, template)
    assert [(e["id"], e["response"]) for e in examples] == [
        ("a:propose", "2"),
        ("a:aggregate", "2"),
        ("b:propose", "hi"),
    ]


def test_propose_and_aggregate_layer_structure():
    calls, ids = [], []

    def generate(requests, n, temperature):
        calls.append((len(requests), n, temperature, requests[0]["messages"][0]["role"]))
        ids.append({r["id"] for r in requests})
        return {r["id"]: [f"{r['id']}-{len(calls)}-{i}" for i in range(n)] for r in requests}

    template = load_prompt("actors/prompts", "aggregate_system")
    out = propose_and_aggregate(
        ROWS[:2], generate, template, n_proposals=5, layers=2, proposal_temperature=0.7, aggregate_temperature=0.5
    )
    # 5 proposals -> 5 aggregations -> 1 final answer; aggregation layers see a system prompt.
    assert calls == [(2, 5, 0.7, "user"), (2, 5, 0.5, "system"), (2, 1, 0.5, "system")]
    assert out["a"]["answer"] == "a@2-3-0" and [len(x) for x in out["a"]["layers"]] == [5, 5, 1]
    # Every layer's requests have their own ids, so seeds that follow the id differ from layer to layer.
    assert ids[0].isdisjoint(ids[1]) and ids[1].isdisjoint(ids[2])
