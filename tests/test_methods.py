from actors.judge import load_prompt
from data.rows import meta, record
from methods.aft import aggregation_messages, build_examples, propose_and_aggregate
from methods.llm2llm import (
    accumulate,
    instruction_wordings,
    marked_answer,
    official_verdict,
    repeat_rows,
    seed_verdicts,
    wrong_seed_examples,
)
from methods.s3ft import bucket_fractions, keeps_reasoning, reasoning_verdicts, select_target, step_results
from methods.spin import (
    beta_for,
    build_pairs,
    logprob_per_token,
    reward_metrics,
    sequence_scores,
    sft_examples,
    training_pairs,
)

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


def test_spin_heldout_rewards_are_the_training_loss_rewards():
    import torch

    from training.losses import spin_loss

    # per-token log-probs of gold (real) and of the opponent's answer (generated), under the trained model and
    # under the model it started from; "c" lacks a generated score under the policy and is left out
    policy_real = sequence_scores({"a": [-1.0, -1.0], "b": [-3.0], "c": [-2.0]})
    ref_real = sequence_scores({"a": [-2.0, -1.5], "b": [-2.5], "c": [-2.0]})
    policy_gen = sequence_scores({"a": [-4.0], "b": [-1.0, -1.0]})
    ref_gen = sequence_scores({"a": [-3.0], "b": [-2.5, -0.5]})
    assert policy_real["a"] == (-2.0, 2) and logprob_per_token(policy_real) == -7.0 / 4
    metrics = reward_metrics(policy_real, ref_real, policy_gen, ref_gen, beta=0.5)
    # a: real 0.5*(−2+3.5)=0.75, generated 0.5*(−4+3)=−0.5; b: real 0.5*(−3+2.5)=−0.25, generated 0.5*(−2+3)=0.5
    assert metrics["n"] == 2 and metrics["reward_accuracy"] == 0.5
    assert abs(metrics["reward_margin"] - ((0.75 + 0.5) + (-0.25 - 0.5)) / 2) < 1e-9
    _, rewards = spin_loss(
        *(torch.tensor([d[k][0] for k in "ab"]) for d in (policy_real, policy_gen, ref_real, ref_gen)), 0.5, "sigmoid"
    )
    assert abs(rewards["reward_margin"].mean().item() - metrics["reward_margin"]) < 1e-6  # as the trainer logs it
    assert abs(rewards["reward_accuracy"].mean().item() - metrics["reward_accuracy"]) < 1e-6
    assert reward_metrics({}, ref_real, policy_gen, ref_gen, 0.1) == {"n": 0}


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


def test_llm2llm_wrong_answer_test_is_the_official_filter_for_marked_tasks():
    """GSM8K/filter.py: the answer is read after the first '#'-run and a space; without that form it is wrong."""
    gold = "She sells 16 - 3 - 4 = 9 eggs, for 9 * 2 = $18.\n#### 18"
    assert official_verdict("9 eggs at $2 make 18 dollars.\n#### 18", gold) == "yes"
    assert official_verdict("#### $18.00 in total", gold) == "yes"  # digits and points compared as a number
    assert official_verdict("So she makes $18 a day.", gold) == "no"  # right number, no '#### n' form
    assert official_verdict("#### 17\nWait: #### 18", gold) == "no"  # the first marked answer counts
    assert official_verdict("### 18", gold) == "yes"  # any run of '#' then a space, as the code's r"#+ (.*)"
    assert marked_answer("no marker here") is None and marked_answer("x\n## 1,000 apples\nmore") == "1,000 apples"
    assert official_verdict("#### 1,000", "a\n#### 1000") == "yes"
    seed = [ROWS[0], record("m", "Eggs?", gold, "18", "gsm8k"), record("s", "Film?", "positive", "positive")]
    answers = {"a": "2", "m": "She makes $18 a day.", "s": "positive"}
    judged = {"a": "yes", "m": "yes", "s": "yes"}  # the last-number verifier's verdicts
    verdicts, unmarked = seed_verdicts(seed, answers, judged)
    # 'a' has a bare gold '2' (not a '####' task): the judge's verdict stands; 'm' is wrong as officially
    assert verdicts == {"a": "yes", "m": "no", "s": "yes"} and unmarked == 1
    assert [r["id"] for r in wrong_seed_examples(seed, verdicts)] == ["m"]


def test_s3ft_paraphrase_must_keep_the_gold_steps():
    gold = "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day.\n#### 18"
    assert step_results(gold) == [9.0]  # the final answer (18) is not a step
    assert not keeps_reasoning(gold, "The answer to the question is: 18", 0.5)  # the quality run's answer-only
    assert keeps_reasoning(gold, "After eating 3 and baking 4 she has 9 eggs; at $2 each that is $18.", 0.5)
    house = "80,000+50,000=$130,000 spent\n80,000*1.5=120,000 gained\nso 120,000+80,000=$200,000\n#### 70000"
    assert step_results(house) == [130000.0, 120000.0, 200000.0]
    assert keeps_reasoning(house, "Costs 130,000; worth 200,000 now; profit 70000.", 0.5)  # 2 of 3 steps
    assert not keeps_reasoning(house, "It is worth 200,000, so the profit is 70000.", 0.5)  # 1 of 3
    assert keeps_reasoning(house, "70000", 0.0) and keeps_reasoning("#### 4", "4", 0.5)  # no steps to keep
    rows = [record("g", "Eggs?", gold, "18", "gsm8k"), record("c", "Film?", "positive", "positive", "classification")]
    verdicts, answer_only = reasoning_verdicts(
        rows, {"g": "The answer is 18.", "c": "positive"}, {"g": "yes", "c": "yes"}, 0.5
    )
    assert verdicts == {"g": "no", "c": "yes"} and answer_only == ["g"]
    assert select_target(rows[0], "17", "no", "The answer is 18.", verdicts["g"]) == ("gold", gold)


def test_llm2llm_matched_steps_control_repeats_the_seed_to_the_final_data_size():
    from actors.teacher import new_example
    from data.rows import load_dataset, take
    from training.sequences import deal, micro_batches

    seed = take(load_dataset("sst2")[0], 5, 0)
    teacher_made = [new_example(seed[i], f"A new review {i}.", "positive", 0, 0) for i in range(3)]
    final = seed + teacher_made
    control = repeat_rows(seed, len(final))
    assert len(control) == len(final) == 8 and len({r["id"] for r in control}) == 8
    assert [r["source_id"] for r in control] == [r["id"] for r in seed] + [r["id"] for r in seed[:3]]
    assert control[5]["id"] == f"{seed[0]['id']}#1" and control[5]["messages"] == seed[0]["messages"]
    assert all(r.get("origin") != "teacher" for r in map(meta, control))  # no teacher-made content
    # the worker's micro steps per rank (no token budget) follow the number of rows: the control runs as many as
    # the final student (1 row per micro step, 2 ranks), more than the seed alone
    steps = lambda rows: len(deal(micro_batches(len(rows), [1] * len(rows), 1, 0, 0, 0), 0, 2))  # noqa: E731
    assert steps(control) == steps(final) == 4 > steps(seed) == 3
    assert [steps(repeat_rows(seed, n)) for n in (5, 9, 13)] == [3, 5, 7]
    assert repeat_rows(seed, 2) == [{**r, "source_id": r["id"]} for r in seed]  # never fewer than the seed
    # every teacher-made example sits in its seed's instruction: one wording for all 8 rows
    wordings = instruction_wordings(final)
    assert list(wordings.values()) == [8] and next(iter(wordings)).startswith("Is the sentiment")


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


def test_propose_and_aggregate_final_layer_samples_at_its_own_top_p():
    """Official AFT (configs/default.yaml, net.MoA): proposals and intermediate aggregations at top_p 0.95, the
    final layer at final_layer_top_p 1.0; a callback without a top_p argument is never given one."""
    calls = []

    def generate(requests, n, temperature, top_p=None):
        calls.append((n, temperature, top_p))
        return {r["id"]: [f"{r['id']}-{i}" for i in range(n)] for r in requests}

    template = load_prompt("actors/prompts", "aggregate_system")
    propose_and_aggregate(ROWS[:1], generate, template, 5, 2, 0.7, 0.7, final_top_p=1.0)
    assert calls == [(5, 0.7, None), (5, 0.7, None), (1, 0.7, 1.0)]
    three_args = lambda requests, n, temperature: {r["id"]: ["x"] * n for r in requests}  # noqa: E731
    assert propose_and_aggregate(ROWS[:1], three_args, template, 2, 1, 0.7, 0.7)["a"]["answer"] == "x"
