"""Training throughput: Ray Train + DeepSpeed ZeRO-3 (2 workers, gloo) vs one plain PyTorch process.

The same SFT steps on SmolLM2-135M-Instruct (GSM8K gold solutions, global batch 8 sequences, fp32, AdamW),
both using the machine's 2 cores: (a) 2 ZeRO-3 ranks x 1 thread, (b) 1 process x 2 threads.
``ratio`` compares steady-state tokens/s (the first 2 optimizer steps excluded); ``startup_s`` is the fixed
cost of (a) before its first step: Ray Train's worker group, process group, model load, DeepSpeed init.
Last line: one JSON object.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

if not __package__:  # run as `python bench/x.py`: Python put bench/ on sys.path, not the checkout that holds it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit, in_subprocess, parse_cli, print_table  # noqa: E402

N_EXAMPLES, GLOBAL_BATCH, WARMUP_STEPS = 96, 8, 2


def examples() -> list[dict]:
    from cluster.data import load_dataset, take

    rows, _ = load_dataset("gsm8k")
    return [{"id": r["id"], "messages": r["messages"], "response": r["reference"]} for r in take(rows, N_EXAMPLES, 0)]


def steady(steps: list[tuple[float, float]]) -> float:
    """tokens/s over (tokens, seconds) steps after warm-up."""
    kept = steps[WARMUP_STEPS:] or steps
    return sum(t for t, _ in kept) / sum(s for _, s in kept)


def ray_zero3(model: str, rows: list[dict], root: Path) -> tuple[float, float, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from cluster.config import load_config
    from cluster.connect import connect
    from training.service import TrainingService

    config = load_config(
        None,
        [f"run.dir={root}", "run.id=bench", "pools.train.replicas=2", "pools.train.num_cpus=1", "cluster.num_cpus=4"],
    )
    connect(config.cluster)
    steps: list[tuple[float, float]] = []
    data = root / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    start = time.perf_counter()
    service = TrainingService(
        config, on_metrics=lambda m: steps.append((m["tokens_per_s"] * m["step_time_s"], m["step_time_s"]))
    )
    training = {**asdict(config.training), "micro_batch_size": GLOBAL_BATCH // 2, "lr": 1e-5, "max_length": 512}
    result = service.train(
        {
            "name": "bench",
            "kind": "sft",
            "init_model": model,
            "data": str(data),
            "phase_dir": str(root / "phase"),
            "output": str(root / "out"),
            "training": training,
            "seed": 0,
        }
    )
    wall = time.perf_counter() - start
    service.shutdown()
    ray.shutdown()
    startup = wall - sum(s for _, s in steps)
    return steady(steps), startup, result["steps"]


def single_process(model: str, rows: list[dict], queue) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.losses import sft_loss
    from training.sequences import TruncationReport, build_sequence, collate, micro_batches

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    report = TruncationReport()
    sequences = [build_sequence(tokenizer, r["id"], r["messages"], r["response"], 512, 256, report) for r in rows]
    batches = micro_batches(len(sequences), [len(s.input_ids) for s in sequences], GLOBAL_BATCH // 2, 0, 0, 0)
    steps = []
    for i in range(0, len(batches) - 1, 2):  # two micro-batches of 4 = one global batch of 8, as (a)
        start = time.perf_counter()
        tokens = 0
        for indices in batches[i : i + 2]:
            batch = collate([sequences[j] for j in indices], tokenizer.pad_token_id)
            loss, _ = sft_loss(
                net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
            )
            (loss / 2).backward()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        steps.append((tokens, time.perf_counter() - start))
    queue.put((steady(steps), len(steps)))


def main() -> None:
    import os
    import tempfile

    from cluster.config import load_config
    from cluster.models import resolve_model
    from training.service import allocator_env

    model = resolve_model("smollm2-135m-instruct")
    rows = examples()
    with tempfile.TemporaryDirectory() as tmp:
        zero3_tok_s, startup_s, zero3_steps = ray_zero3(model, rows, Path(tmp))
    # The plain process gets the same allocator the ranks get (training.allocator), so only Ray + ZeRO-3 differ.
    os.environ.update(allocator_env(load_config(None, []).training.allocator))
    single_tok_s, single_steps = in_subprocess(single_process, model, rows)
    print_table(
        "SFT on SmolLM2-135M-Instruct, 96 GSM8K examples, global batch 8, fp32 AdamW",
        [
            ("Ray Train + ZeRO-3, 2 workers x 1 thread", zero3_steps, zero3_tok_s),
            ("plain PyTorch, 1 process x 2 threads", single_steps, single_tok_s),
        ],
        ("case", "optimizer steps", "steady tok/s"),
    )
    print(f"fixed start-up cost of (a) before its first step: {startup_s:.1f} s")
    emit(
        {
            "ray_zero3_tok_s": round(zero3_tok_s, 1),
            "single_tok_s": round(single_tok_s, 1),
            "ratio": round(zero3_tok_s / single_tok_s, 3),
            "startup_s": round(startup_s, 1),
        }
    )


if __name__ == "__main__":
    parse_cli(__doc__)
    main()
