"""Generation throughput: the generator actors vs the bare vLLM engine vs transformers `generate`.

Same prompts (16 MT-Bench questions), same sampling (4 samples each, temperature 1.0, 64 new tokens),
SmolLM2-135M-Instruct, both cores in every case:
(a) the default generator pool: 1 actor, its engine bound to both cores, 32-prompt batches;
(a') 2 generator actors, one engine bound to each core, 8-prompt batches (data parallel);
(b) one bare vLLM engine in its own process, bound to both cores;
(c) transformers `generate` in the same dtype as the engines (engine.dtype 'auto') with 2 torch threads.
Each case runs once to warm up and once measured. Then the cost of a new checkpoint: building a fresh engine
vs reloading one in place (``VLLMEngine.load_weights``, which includes re-packing a tied output head; that
repack is also timed alone). Last line: one JSON object.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

if not __package__:  # run as `python bench/x.py`: Python put bench/ on sys.path, not the checkout that holds it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BARE_VLLM_ENV, bench_prompts, emit, in_subprocess, parse_cli, print_table  # noqa: E402

N_SAMPLES, MAX_TOKENS, TEMPERATURE = 4, 64, 1.0


def _timed(generate, prompts) -> tuple[int, float]:
    generate(prompts[:2])  # warm-up
    start = time.perf_counter()
    tokens = generate(prompts)
    return tokens, time.perf_counter() - start


def bare_vllm(model: str, queue) -> None:
    os.environ.update(BARE_VLLM_ENV)
    from actors.engine import Sampling, VLLMEngine, render_prompt

    engine = VLLMEngine(model, max_model_len=1024)
    sampling = Sampling(temperature=TEMPERATURE, max_tokens=MAX_TOKENS, n=N_SAMPLES, seed=0)

    def generate(rows):
        prompts = [render_prompt(engine.tokenizer, r["messages"]) for r in rows]
        return sum(len(c.token_ids) for out in engine.generate(prompts, sampling) for c in out)

    queue.put(_timed(generate, bench_prompts()))


def weight_load(model: str, queue) -> None:
    """Seconds to build an engine on a checkpoint vs to reload the checkpoint into a running engine."""
    import shutil
    import tempfile
    import time

    os.environ.update(BARE_VLLM_ENV)
    from actors.engine import VLLMEngine, reprocess_tied_heads

    start = time.perf_counter()
    engine = VLLMEngine(model, max_model_len=1024)
    fresh_build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = shutil.copytree(model, f"{folder}/checkpoint")  # a new path: the reload reads it from disk
        reload_s = engine.load_weights(checkpoint)
    start = time.perf_counter()
    engine.llm.collective_rpc(reprocess_tied_heads)
    queue.put((fresh_build_s, reload_s, time.perf_counter() - start))


def hf_generate(model: str, queue) -> None:
    import torch

    torch.set_num_threads(2)
    from actors.engine import HFEngine, Sampling, render_prompt

    engine = HFEngine(model)
    sampling = Sampling(temperature=TEMPERATURE, max_tokens=MAX_TOKENS, n=N_SAMPLES, seed=0)

    def generate(rows):
        prompts = [render_prompt(engine.tokenizer, r["messages"]) for r in rows]
        return sum(len(c.token_ids) for out in engine.generate(prompts, sampling) for c in out)

    queue.put(_timed(generate, bench_prompts()))


def actors(model: str, replicas: int, bind: str, batch_size: int) -> tuple[int, float]:
    import ray

    from actors.engine import Sampling
    from actors.llm_actor import EnginePool
    from cluster.connect import connect
    from configs.schema import ClusterConfig, EngineConfig, PoolConfig

    connect(ClusterConfig(num_cpus=4))
    pool = EnginePool(
        "generator",
        model,
        PoolConfig(
            replicas=replicas, num_cpus=1, env={"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        ),
        EngineConfig(batch_size=batch_size),
        600,
    )
    sampling = Sampling(temperature=TEMPERATURE, max_tokens=MAX_TOKENS, n=N_SAMPLES, seed=0)

    def generate(rows):
        out = pool.generate_all(rows, sampling)
        return sum(len(s["token_ids"]) for r in out.values() for s in r["samples"])

    result = _timed(generate, bench_prompts())
    pool.shutdown()
    ray.shutdown()
    return result


def main() -> None:
    from cluster.models import resolve_model

    model = resolve_model("smollm2-135m-instruct")
    cases = {
        "actor (1 replica, 2 cores)": actors(model, 1, "0-1", 32),
        "actors (2 replicas, 1 core each)": actors(model, 2, "0;1", 8),
        "bare vLLM (1 engine, 2 cores)": in_subprocess(bare_vllm, model),
        "transformers generate (bf16, 2 threads)": in_subprocess(hf_generate, model),
    }
    fresh_build_s, reload_s, head_repack_s = in_subprocess(weight_load, model)
    rates = {name: tokens / seconds for name, (tokens, seconds) in cases.items()}
    print_table(
        "generation: 16 prompts x 4 samples x 64 tokens, SmolLM2-135M-Instruct",
        [(name, tokens, seconds, rates[name]) for name, (tokens, seconds) in cases.items()],
        ("case", "tokens", "seconds", "tok/s"),
    )
    print_table(
        "a new checkpoint in the generator (bare vLLM engine, 2 cores)",
        [
            ("fresh engine build", fresh_build_s),
            ("in-place reload (load_weights)", reload_s),
            ("  of which tied-head repack", head_repack_s),
        ],
        ("case", "seconds"),
    )
    actor_tok_s, actors2_tok_s, bare_tok_s, hf_tok_s = rates.values()
    emit(
        {
            "actor_tok_s": round(actor_tok_s, 1),
            "actors_2x1core_tok_s": round(actors2_tok_s, 1),
            "bare_vllm_tok_s": round(bare_tok_s, 1),
            "hf_tok_s": round(hf_tok_s, 1),
            "actor_vs_bare": round(actor_tok_s / bare_tok_s, 3),
            "actors_2x1core_vs_bare": round(actors2_tok_s / bare_tok_s, 3),
            "vllm_vs_hf": round(bare_tok_s / hf_tok_s, 3),
            "fresh_build_s": round(fresh_build_s, 2),
            "reload_s": round(reload_s, 2),
            "head_repack_s": round(head_repack_s, 3),
            "reload_vs_build": round(reload_s / fresh_build_s, 3),
        }
    )


if __name__ == "__main__":
    parse_cli(__doc__)
    main()
