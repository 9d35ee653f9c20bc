"""A LoRA phase's model in the generator, two ways: merge and reload in place vs vLLM's own LoRA path.

SmolLM2-135M-Instruct with an adapter as a LoRA phase writes it (r 16, alpha 32, every linear layer; its B matrices
random, as after training). (a) what the jobs do: merge it into a float32 HF folder (``training.adapters.merge``)
and reload that into a running engine in place (``VLLMEngine.load_weights``); (b) vLLM's LoRA path: an engine built
with ``enable_lora`` and ``max_lora_rank`` 16 serves the base weights and applies the adapter per request
(``LoRARequest``; one per iteration). Each is a bare engine in its own process bound to both cores, bfloat16 as
the generator runs here. Reported: the seconds a new adapter costs before it generates (a: merge + reload; b: the
first request's extra time over the same request once the adapter is loaded), generation tok/s (64 MT-Bench prompts
x 64 tokens, greedy, after a warm-up), and how far the two ways' greedy tokens agree. ``--model`` takes
any model reference (``tiny-random``: a quick check that it runs). Last line: one JSON object.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as `python bench/x.py`: Python put bench/ on sys.path, not the checkout that holds it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BARE_VLLM_ENV, bench_prompts, emit, in_subprocess, parse_cli, print_table  # noqa: E402

RANK, N_PROMPTS, MAX_TOKENS = 16, 64, 64


def make_adapter(model: str, folder: str, queue) -> None:
    """The adapter folder (B random, std 0.02) and its merge; the merge's seconds."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.adapters import lora_config, merge

    torch.set_num_threads(2)
    settings = {"r": RANK, "lora_alpha": 2.0 * RANK, "lora_dropout": 0.0, "target_modules": ["all-linear"]}
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft_model = get_peft_model(base, lora_config({**settings, "modules_to_save": []}))
    generator = torch.Generator().manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.02
    peft_model.save_pretrained(f"{folder}/adapter")
    start = time.perf_counter()
    merge(model, Path(f"{folder}/adapter"), Path(f"{folder}/merged"), AutoTokenizer.from_pretrained(model))
    queue.put(time.perf_counter() - start)


def _prompts(tokenizer) -> list[list[int]]:
    from actors.engine import render_prompt

    return [render_prompt(tokenizer, r["messages"]) for r in bench_prompts(N_PROMPTS)]


def _generate(llm, prompts, lora_request=None) -> tuple[list[list[int]], int, float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)  # greedy: one sample each
    start = time.perf_counter()
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=lora_request, use_tqdm=False
    )
    seconds = time.perf_counter() - start
    tokens = [list(c.token_ids) for o in outputs for c in o.outputs]
    return tokens, sum(len(t) for t in tokens), seconds


def merged_reload(model: str, merged: str, queue) -> None:
    """(a): build on the base, reload the merged folder in place, generate."""
    os.environ.update(BARE_VLLM_ENV)
    from actors.engine import VLLMEngine

    engine = VLLMEngine(model, dtype="bfloat16", max_model_len=1024)
    prompts = _prompts(engine.tokenizer)
    _generate(engine.llm, prompts[:2])  # warm-up on the base
    reload_s = engine.load_weights(merged)
    _generate(engine.llm, prompts[:2])
    tokens, count, seconds = _generate(engine.llm, prompts)
    queue.put({"reload_s": reload_s, "tok_s": count / seconds, "tokens": tokens})


def vllm_lora(model: str, adapter: str, queue) -> None:
    """(b): an engine with enable_lora; the adapter's first request (loads it) against the same request again."""
    os.environ.update(BARE_VLLM_ENV)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    start = time.perf_counter()
    llm = LLM(
        model=model,
        dtype="bfloat16",
        max_model_len=1024,
        max_num_seqs=64,
        enforce_eager=True,
        enable_lora=True,
        max_lora_rank=RANK,
        max_loras=1,
    )
    build_s = time.perf_counter() - start
    prompts = _prompts(llm.get_tokenizer())
    _generate(llm, prompts[:2])  # warm-up on the base
    request = LoRARequest("iter0", 1, adapter)
    _, _, first_s = _generate(llm, prompts[:2], request)  # loads the adapter
    _, _, again_s = _generate(llm, prompts[:2], request)
    tokens, count, seconds = _generate(llm, prompts, request)
    queue.put({"build_s": build_s, "load_s": max(0.0, first_s - again_s), "tok_s": count / seconds, "tokens": tokens})


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy samples share before they first differ (one flipped argmax changes the rest)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def options(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model reference (default SmolLM2-135M)")


def main(args) -> None:
    from cluster.models import resolve_model

    model = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as folder:
        merge_s = in_subprocess(make_adapter, model, folder)
        merged = in_subprocess(merged_reload, model, f"{folder}/merged")
        lora = in_subprocess(vllm_lora, model, f"{folder}/adapter")
    same = sum(a == b for a, b in zip(merged["tokens"], lora["tokens"])) / len(merged["tokens"])
    prefix = sum(common_prefix(a, b) / len(a) for a, b in zip(merged["tokens"], lora["tokens"])) / len(merged["tokens"])
    print_table(
        f"a new LoRA adapter in the generator: {Path(model).name}, r {RANK}, all-linear, bfloat16, 2 cores",
        [
            ("(a) merge + in-place reload", merge_s + merged["reload_s"], merged["tok_s"]),
            ("(b) vLLM LoRA (enable_lora, LoRARequest)", lora["load_s"], lora["tok_s"]),
        ],
        ("case", "seconds before it generates", "tok/s"),
    )
    print(f"(a): merge {merge_s:.2f} s + reload {merged['reload_s']:.2f} s; (b): engine build {lora['build_s']:.1f} s")
    print(f"same greedy samples both ways: {same:.0%}; tokens before the first difference: {prefix:.0%} on average")
    emit(
        {
            "merge_s": round(merge_s, 2),
            "reload_s": round(merged["reload_s"], 2),
            "merged_tok_s": round(merged["tok_s"], 1),
            "lora_load_s": round(lora["load_s"], 2),
            "lora_build_s": round(lora["build_s"], 1),
            "lora_tok_s": round(lora["tok_s"], 1),
            "lora_vs_merged_tok_s": round(lora["tok_s"] / merged["tok_s"], 3),
            "same_greedy_fraction": round(same, 3),
            "common_prefix_fraction": round(prefix, 3),
        }
    )


if __name__ == "__main__":
    main(parse_cli(__doc__, options))
