"""Training throughput and how far it is from the machine: Ray Train + DeepSpeed (2 workers, gloo) vs one plain
PyTorch process, with model FLOP/s utilisation (MFU) against this machine's measured matmul peak.

The same SFT steps on SmolLM2-135M-Instruct (GSM8K gold solutions, global batch 8 sequences, AdamW), both using
the machine's 2 cores: (a) 2 ranks x 1 thread under ZeRO-3, ZeRO-2 and stage 0 (plain data parallel), in fp32
and, where the CPU runs bf16 natively (avx512_bf16 / AMX), bf16 mixed precision; (b) 1 process x 2 threads in
the same precisions. All (a) cases are phases of one Ray Train ``fit()`` (as in a job), so start-up is paid once.
``ratio`` compares steady-state tokens/s of ZeRO-3 fp32 with (b) fp32 (the first 2 optimizer steps excluded);
``ratio_best`` the fastest (a) case with the fastest (b) case; ``startup_s`` is (a)'s fixed cost before its
first step. MFU = model FLOP/s / peak, model FLOPs per trained token = 6 N + 12 L d T (PaLM's count: N
parameters, L layers, width d, T the mean sequence length, attention included); peak = the best of repeated
2048^3 matmuls on both cores in that dtype, measured in the same run. (c) LoRA (training.peft: r 16, alpha 32, every
linear layer) as more phases of the same ``fit()``, fp32, under each ``--lora-stages`` stage: steady tok/s and rank
0's peak RSS during the steps beside full fine-tuning's at the same stage (``lora`` in the JSON). ``--model`` takes
any model reference (``tiny-random`` for a quick check that it runs).
(d) The layout (training.layout): the full-weight cases again as phases of a second ``fit()`` with one rank x 2
threads (``one_rank``: grad_accum 2, the same global batch and sequences per step); ``one_rank_vs_pool`` is its
tok/s over (a)'s per case, and ``default_layout_is_faster`` says whether ``auto``'s pick (one_rank on an embedded
Ray) was the faster layout for the default case in this run. ``--layouts`` picks them.
What a user runs: ``default_tok_s`` is the case the embedded default (``configs/demo.yaml``, ``make demo``) trains
with, its ZeRO stage, precision and layout read from that file and resolved on this machine (auto's one rank runs
stage 0; run even when ``--stages`` leaves it out); ``best_plain_tok_s`` the fastest plain loop of this run, and
``default_vs_best_plain`` their ratio (issue 32's goal: >= 0.9 on every machine kind). ``mfu`` holds every
full-weight case, plain loops included. Every loop computes logits over the loss window only, as the ranks do
(training.losses.loss_window); ``plain_full_logits_tok_s`` is a plain loop in the default's precision over every
position, as transformers computes by default (``loss_window_speedup``: what the window saves). Last line: one JSON
object.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

if not __package__:  # run as `python bench/x.py`: Python put bench/ on sys.path, not the checkout that holds it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, in_subprocess, parse_cli, print_table  # noqa: E402

GLOBAL_BATCH, WARMUP_STEPS = 8, 2
BENCH_LAYOUT = (2, 1)  # the Ray cases' train pool: ranks, CPUs (threads) per rank
EMBEDDED_DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def default_case() -> tuple[tuple[int, bool], tuple[int, int], str]:
    """(ZeRO stage, bf16) the embedded default trains with on this machine (training.deepspeed.bf16 'auto' resolved
    as a rank here would), its train pool's (ranks, CPUs per rank), and the layout those resolve to on an embedded
    Ray (training.layout)."""
    from configs.schema import load_config
    from training.layout import resolve_layout
    from training.worker import uses_bf16

    config = load_config(EMBEDDED_DEFAULT)
    ds, pool, t = config.training.deepspeed, config.pools.train, config.training
    layout = resolve_layout(t.layout, pool, t.threads_per_worker, False, ds.zero_stage, ds.offload_optimizer)
    stage = ds.zero_stage if layout.zero_stage is None else layout.zero_stage  # auto's one rank runs stage 0
    return (stage, uses_bf16(ds.bf16)), (pool.replicas, int(pool.num_cpus)), layout.name


def case_name(stage: int, bf16: bool) -> str:
    return f"zero{stage}_{'bf16' if bf16 else 'fp32'}"


def peak_gflops(dtype_name: str, queue, size: int = 2048, seconds: float = 4.0) -> None:
    """Best GFLOP/s of repeated square matmuls on both cores (torch's own GEMM, the one training uses)."""
    import torch

    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    queue.put(best)


def flops_per_token(model: str, mean_length: float) -> float:
    """6 N + 12 L d T: forward + backward of every weight once per token, plus attention scores and values.
    N counts a tied embedding once: its lookup is free and its use as the output head is one matmul."""
    import json
    import math

    from safetensors import safe_open

    config = json.loads((Path(model) / "config.json").read_text())
    with safe_open(str(Path(model) / "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return 6 * n_params + 12 * config["num_hidden_layers"] * config["hidden_size"] * mean_length


def examples(n: int) -> list[dict]:
    from data.rows import load_dataset, take

    rows, _ = load_dataset("gsm8k")
    return [{"id": r["id"], "messages": r["messages"], "response": r["reference"]} for r in take(rows, n, 0)]


def steady(steps: list[tuple[float, float]]) -> float:
    """tokens/s over (tokens, seconds) steps after warm-up."""
    kept = steps[WARMUP_STEPS:] or steps
    return sum(t for t, _ in kept) / sum(s for _, s in kept)


LORA = {"enabled": True, "r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0, "target_modules": ["all-linear"]}


def ray_cases(
    model: str, rows: list[dict], root: Path, cases: list[tuple[int, bool, bool]], layout: str
) -> tuple[dict, float]:
    """(steady tok/s, optimizer steps, rank 0's peak RSS MiB in the steps) of each (ZeRO stage, bf16, LoRA) case,
    run as phases of one fit() in ``layout`` (training.layout: pool = 2 ranks x 1 thread, one_rank = 1 x 2); the
    fit()'s start-up s."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from cluster.connect import connect
    from configs.schema import load_config
    from training.service import TrainingService

    config = load_config(
        None,
        [f"run.dir={root}", "run.id=bench", "pools.train.replicas=2", "pools.train.num_cpus=1", "cluster.num_cpus=4"]
        + [f"training.layout={layout}"],
    )
    connect(config.cluster)
    steps: list[tuple[float, float]] = []
    data = root / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    start = time.perf_counter()
    service = TrainingService(
        config, on_metrics=lambda m: steps.append((m["tokens_per_s"] * m["step_time_s"], m["step_time_s"]))
    )
    results, startup = {}, 0.0
    for stage, bf16, lora in cases:
        steps.clear()
        base = asdict(config.training)
        training = {
            **base,
            "micro_batch_size": GLOBAL_BATCH // 2,
            "lr": 1e-4 if lora else 1e-5,
            "max_length": 512,
            "deepspeed": {**base["deepspeed"], "zero_stage": stage, "bf16": bf16},
            "peft": {**LORA, "modules_to_save": []} if lora else base["peft"],
        }
        name = f"{layout}-zero{stage}-{'bf16' if bf16 else 'fp32'}{'-lora' if lora else ''}"
        result = service.train(
            {
                "name": name,
                "kind": "sft",
                "init_model": model,
                "data": str(data),
                "phase_dir": str(root / name),
                "output": str(root / f"{name}-out"),
                "training": training,
                "seed": 0,
            }
        )
        if not startup:  # the first phase pays the worker group, process group and model load
            startup = time.perf_counter() - start - sum(s for _, s in steps)
        results[(stage, bf16, lora)] = (steady(steps), result["steps"], result["train_peak_rss_mib"])
        assert result["layout"]["name"] == layout, result["layout"]
        print(
            f"{name}: rank 0 peak RSS {result['train_peak_rss_mib']:.0f} MiB, linear layers: {result['linear_impl']}, "
            f"trainable parameters {result['trainable_parameters']:,} of {result['total_parameters']:,}"
        )
    service.shutdown()
    ray.shutdown()
    return results, startup


def single_process(model: str, rows: list[dict], bf16: bool, rounding: str, keep_window: bool, queue) -> None:
    """One plain process's steady tok/s. bf16 with ``rounding='nearest'`` is plain autocast (the fastest loop, which
    does not learn at fine-tuning lrs: NOTES.md "bf16 on the CPU: the cause"); 'stochastic' adds the ranks' own
    stochastically rounded weight copies (training/precision.py), to split the default's gap into rounding and the
    rest (Ray Train + DeepSpeed). ``keep_window``: logits only over the loss window, as the ranks compute them
    (training.losses.loss_window); False: every position's, as a plain transformers loop does by default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from configs.schema import load_config
    from training.losses import loss_window, sft_loss
    from training.sequences import TruncationReport, build_sequence, collate, micro_batches

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    # bf16 as DeepSpeed's CPU bf16 mode would not be comparable here; autocast keeps fp32 master weights too.
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    compute = None
    if bf16 and rounding == "stochastic":
        from training.precision import Bf16Compute

        compute = Bf16Compute(0, "stochastic")
        compute.attach(net)
    report = TruncationReport()
    sequences = [build_sequence(tokenizer, r["id"], r["messages"], r["response"], 512, 256, report) for r in rows]
    # the batches (a)'s two ranks get, in the same order (training.group_by_length as configured)
    group = load_config(None, []).training.group_by_length
    batches = micro_batches(
        len(sequences), [len(s.input_ids) for s in sequences], GLOBAL_BATCH // 2, 0, 0, 0, group, ranks=2
    )
    steps = []
    for i in range(0, len(batches) - 1, 2):  # two micro-batches of 4 = one global batch of 8, as (a)
        start = time.perf_counter()
        tokens = 0
        if compute is not None:
            compute.optimizer_step(i // 2 + 1)
        for indices in batches[i : i + 2]:
            batch = collate([sequences[j] for j in indices], tokenizer.pad_token_id)
            window = loss_window(batch["labels"]) if keep_window else 0  # 0: every logit (transformers' default)
            with precision:
                logits = net(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=window
                ).logits
            loss, _ = sft_loss(logits.float(), batch["labels"][:, -window or None :])
            (loss / 2).backward()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        steps.append((tokens, time.perf_counter() - start))
    queue.put((steady(steps), len(steps), sum(len(x.input_ids) for x in sequences) / len(sequences)))


def options(parser) -> None:
    parser.add_argument("--examples", type=int, default=48, help="SFT examples per case (global batch 8; default 48)")
    parser.add_argument(
        "--stages", default="3,2,0", help="ZeRO stages to run, comma-separated (0 = plain data parallel)"
    )
    parser.add_argument("--no-bf16", action="store_true", help="fp32 only, even where the CPU runs bf16 natively")
    parser.add_argument(
        "--lora-stages", default="2", help="ZeRO stages of the LoRA cases, fp32, comma-separated ('' = none)"
    )
    parser.add_argument(
        "--layouts",
        default="pool,one_rank",
        help="training.layout of the Ray cases, comma-separated: pool (2 ranks x 1 thread, every case; always run) "
        "and one_rank (1 x 2, the full-weight cases)",
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="model reference (tiny-random: a quick check that it runs)"
    )


def main(args) -> None:
    import os
    import tempfile

    from cluster.models import resolve_model
    from configs.schema import load_config
    from training.service import allocator_env
    from training.worker import native_bf16

    model = resolve_model(args.model)
    rows = examples(args.examples)
    stages = [int(s) for s in args.stages.split(",")]
    lora_stages = [int(s) for s in args.lora_stages.split(",") if s.strip()]
    precisions = [False, True] if native_bf16() and not args.no_bf16 else [False]
    cases = [(stage, bf16, False) for bf16 in precisions for stage in stages]
    default, default_pool, default_layout = default_case()
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    # pool always runs (the reference, LoRA and the ratios are measured in it), and the user's layout too
    layouts = ["pool"] + [name for name in dict.fromkeys([*layouts, default_layout]) if name != "pool"]
    if default_pool != BENCH_LAYOUT:  # measured in the bench's pool, not the user's: say so, never hide it
        print(f"note: {EMBEDDED_DEFAULT.name}'s train pool is {default_pool}, the bench runs {BENCH_LAYOUT}")
    if (*default, False) not in cases:
        cases.append((*default, False))
    cases += [(stage, False, False) for stage in lora_stages if (stage, False, False) not in cases]  # full beside each
    cases += [(stage, False, True) for stage in lora_stages]
    by_layout, startup_by_layout = {}, {}
    for layout in layouts:
        with tempfile.TemporaryDirectory() as tmp:
            # one_rank: the full-weight cases (LoRA's comparison with full weights stays in the pool layout)
            layout_cases = cases if layout == "pool" else [c for c in cases if not c[2]]
            by_layout[layout], startup_by_layout[layout] = ray_cases(model, rows, Path(tmp), layout_cases, layout)
    all_results, startup_s = by_layout["pool"], startup_by_layout["pool"]
    ray_results = {(s, b): (tok_s, n) for (s, b, lora), (tok_s, n, _) in all_results.items() if not lora}
    one_rank_results = {
        (s, b): (tok_s, n) for (s, b, lora), (tok_s, n, _) in by_layout.get("one_rank", {}).items() if not lora
    }
    lora_results = {
        stage: {"full": all_results[(stage, False, False)], "lora": all_results[(stage, False, True)]}
        for stage in lora_stages
    }
    # The plain process gets the same allocator the ranks get (training.allocator), so only Ray + DeepSpeed differ.
    os.environ.update(allocator_env(load_config(None, []).training.allocator))
    plain_precisions = sorted(set(precisions) | {default[1]})  # the default's precision has a plain loop beside it
    single = {bf16: in_subprocess(single_process, model, rows, bf16, "nearest", True) for bf16 in plain_precisions}
    plain_stochastic = in_subprocess(single_process, model, rows, True, "stochastic", True) if True in single else None
    # every position's logits, as a transformers loop computes them by default: what the loss window saves
    plain_full = in_subprocess(single_process, model, rows, default[1], "nearest", False)
    mean_length = single[False][2]
    per_token = flops_per_token(model, mean_length)
    peak = {bf16: in_subprocess(peak_gflops, "bfloat16" if bf16 else "float32") for bf16 in plain_precisions}

    def mfu(tok_s: float, bf16: bool) -> float:
        return tok_s * per_token / 1e9 / peak[bf16]

    table = [
        (
            f"Ray Train + ZeRO-{stage}, 2 workers x 1 thread, {'bf16' if bf16 else 'fp32'}",
            n,
            tok_s,
            mfu(tok_s, bf16),
            tok_s / single[bf16][0],
        )
        for (stage, bf16), (tok_s, n) in ray_results.items()
    ]
    table += [
        (
            f"Ray Train + ZeRO-{stage}, 1 worker x 2 threads (training.layout one_rank), {'bf16' if bf16 else 'fp32'}",
            n,
            tok_s,
            mfu(tok_s, bf16),
            tok_s / single[bf16][0],
        )
        for (stage, bf16), (tok_s, n) in one_rank_results.items()
    ]
    table += [
        (f"plain PyTorch, 1 process x 2 threads, {'bf16' if bf16 else 'fp32'}", n, tok_s, mfu(tok_s, bf16), 1.0)
        for bf16, (tok_s, n, _) in single.items()
    ]
    if plain_stochastic:
        tok_s, n, _ = plain_stochastic
        table.append(
            ("plain PyTorch, 1 x 2, bf16 stochastic rounding", n, tok_s, mfu(tok_s, True), tok_s / single[True][0])
        )
    # MFU of a LoRA row: no weight gradients of the frozen base, so 6 N overstates its work; shown as "-"
    table += [
        (f"Ray Train + ZeRO-{stage}, LoRA r 16 all-linear, fp32", steps, tok_s, "-", tok_s / single[False][0])
        for stage, pair in lora_results.items()
        for tok_s, steps, _ in [pair["lora"]]
    ]
    print_table(
        f"SFT on {Path(model).name}, {len(rows)} GSM8K examples, global batch 8, AdamW",
        table,
        ("case", "optimizer steps", "steady tok/s", "MFU", "vs plain PyTorch, same precision"),
    )
    print(
        f"model: {per_token / 1e9:.3f} GFLOP per trained token (mean length {mean_length:.0f}); "
        + ", ".join(f"peak {'bf16' if b else 'fp32'} {g:.1f} GFLOP/s" for b, g in peak.items())
    )
    print(
        "fixed start-up cost before the first step: "
        + ", ".join(f"{layout} {seconds:.1f} s" for layout, seconds in startup_by_layout.items())
    )
    for stage, pair in lora_results.items():
        (full_tok_s, _, full_rss), (lora_tok_s, _, lora_rss) = pair["full"], pair["lora"]
        print(
            f"ZeRO-{stage} fp32, LoRA vs full weights: {lora_tok_s:.0f} vs {full_tok_s:.0f} tok/s "
            f"({lora_tok_s / full_tok_s:.2f}x), rank 0 peak RSS {lora_rss:.0f} vs {full_rss:.0f} MiB"
        )
    reference = (3, False) if (3, False) in ray_results else next(iter(ray_results))
    zero3_tok_s, single_tok_s = ray_results[reference][0], single[False][0]
    best_stage, best_bf16 = max(ray_results, key=lambda case: ray_results[case][0])
    default_tok_s = (one_rank_results if default_layout == "one_rank" else ray_results)[default][0]
    # Which layout is faster in this run, case by case, and whether training.layout=auto picks it here
    layout_cases = sorted(ray_results.keys() & one_rank_results.keys())
    layout_ratio = {case_name(*c): round(one_rank_results[c][0] / ray_results[c][0], 3) for c in layout_cases}
    faster = "one_rank" if layout_ratio.get(case_name(*default), 0) > 1 else "pool"
    if layout_ratio:
        print(
            "one rank x 2 threads vs 2 ranks x 1 thread: "
            + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in layout_ratio.items())
            + f"; auto picks {default_layout} on an embedded Ray: "
            + ("the faster here" if faster == default_layout else f"NOT the faster here ({faster})")
        )
    best_plain_bf16 = max(single, key=lambda bf16: single[bf16][0])
    best_plain_tok_s = single[best_plain_bf16][0]
    print(
        f"embedded default ({EMBEDDED_DEFAULT.name}: {case_name(*default)}, {default_layout}): "
        f"{default_tok_s:.1f} tok/s, "
        f"MFU {mfu(default_tok_s, default[1]):.2f}, {default_tok_s / best_plain_tok_s:.2f}x the best plain loop "
        f"({'bf16' if best_plain_bf16 else 'fp32'}, {best_plain_tok_s:.1f} tok/s)"
    )
    if plain_stochastic:
        print(
            f"plain bf16 with the ranks' stochastic rounding: {plain_stochastic[0]:.1f} tok/s "
            f"({plain_stochastic[0] / single[True][0]:.2f}x plain autocast); the default is "
            f"{default_tok_s / plain_stochastic[0]:.2f}x it (the rest: Ray Train + DeepSpeed)"
        )
    best_in_precision = single[default[1]][0]
    print(
        f"plain {'bf16' if default[1] else 'fp32'} with every position's logits: {plain_full[0]:.1f} tok/s; "
        f"the loss window is {best_in_precision / plain_full[0]:.2f}x that (training.losses.loss_window)"
    )
    emit(
        {
            "ray_zero3_tok_s": round(zero3_tok_s, 1),
            "single_tok_s": round(single_tok_s, 1),
            "ratio": round(zero3_tok_s / single_tok_s, 3),
            "startup_s": round(startup_s, 1),
            "peak_gflops": {("bf16" if b else "fp32"): round(g, 1) for b, g in peak.items()},
            "mfu_ray": round(mfu(zero3_tok_s, False), 3),
            "mfu_single": round(mfu(single_tok_s, False), 3),
            "ray_tok_s": {case_name(stage, bf16): round(tok_s, 1) for (stage, bf16), (tok_s, _) in ray_results.items()},
            "mfu": {
                **{
                    case_name(stage, bf16): round(mfu(tok_s, bf16), 3)
                    for (stage, bf16), (tok_s, _) in ray_results.items()
                },
                **{
                    f"plain_{'bf16' if bf16 else 'fp32'}": round(mfu(tok_s, bf16), 3)
                    for bf16, (tok_s, *_) in single.items()
                },
            },
            "one_rank_tok_s": {case_name(*c): round(t, 1) for c, (t, _) in one_rank_results.items()},
            "startup_s_by_layout": {k: round(v, 1) for k, v in startup_by_layout.items()},
            "one_rank_vs_pool": layout_ratio,
            "default_layout": default_layout,
            "default_layout_is_faster": faster == default_layout if layout_ratio else None,
            "default_case": case_name(*default),
            "default_tok_s": round(default_tok_s, 1),
            "best_plain": f"plain_{'bf16' if best_plain_bf16 else 'fp32'}",
            "best_plain_tok_s": round(best_plain_tok_s, 1),
            "default_vs_best_plain": round(default_tok_s / best_plain_tok_s, 3),
            "single_bf16_tok_s": round(single[True][0], 1) if True in single else None,
            "plain_bf16_stochastic_tok_s": round(plain_stochastic[0], 1) if plain_stochastic else None,
            "plain_full_logits_tok_s": round(plain_full[0], 1),  # in the default's precision, no loss window
            "loss_window_speedup": round(best_in_precision / plain_full[0], 3),
            "default_vs_plain_stochastic": round(default_tok_s / plain_stochastic[0], 3) if plain_stochastic else None,
            "best": case_name(best_stage, best_bf16),
            "bf16_speedup": round(ray_results[(3, True)][0] / ray_results[(3, False)][0], 3)
            if {(3, True), (3, False)} <= ray_results.keys()
            else None,
            "ratio_best": round(max(t for t, _ in ray_results.values()) / max(s[0] for s in single.values()), 3),
            "lora": {
                f"zero{stage}_fp32": {
                    "lora_tok_s": round(pair["lora"][0], 1),
                    "full_tok_s": round(pair["full"][0], 1),
                    "speedup": round(pair["lora"][0] / pair["full"][0], 3),
                    "lora_peak_rss_mib": round(pair["lora"][2]),
                    "full_peak_rss_mib": round(pair["full"][2]),
                }
                for stage, pair in lora_results.items()
            },
        }
    )


if __name__ == "__main__":
    main(parse_cli(__doc__, options))
