"""Orchestration overhead of one SPIN iteration on SmolLM2-135M-Instruct.

Measured: the iteration through the real machinery (generator actor -> Parquet phase -> Ray Train ZeRO-3
SPIN phase -> weights back into the generator), timed from the first generation request to the reloaded
generator, with the generator pool already up (as in every iteration after the first). Bare: the same
generation in one process with the vLLM engine alone, and the same training phase alone (its Ray Train
start-up included, as the iteration pays it too). Prints each phase's wall time, each pool's idle time and
``overhead_ratio`` = iteration wall time / (bare generation + bare training). Last line: one JSON object.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.common import BARE_VLLM_ENV, emit, in_subprocess, print_table

N_PROMPTS = 64
OVERRIDES = [
    "model.name=smollm2-135m-instruct",
    f"data.n_train={N_PROMPTS}",
    "data.n_eval=1",
    "spin.iterations=1",
    "generation.max_tokens=64",
    # One request of all 64 prompts, as the bare engine gets: with the default 32-prompt batches the engine
    # runs two batches back to back, each ending in a low-occupancy tail (measured 41.8 s vs 34.2 s bare).
    f"engine.batch_size={N_PROMPTS}",
    "training.epochs=1",
    "tracking.mode=disabled",
]


def config(run_dir: str):
    from cluster.config import load_config

    return load_config(
        "configs/spin.yaml", ["run.method=bench", "run.id=overhead", f"run.dir={run_dir}", "run.fresh=true", *OVERRIDES]
    )


def bare_generation(run_dir: str, queue) -> None:
    os.environ.update(BARE_VLLM_ENV)
    from actors.engine import Sampling, VLLMEngine, render_prompt
    from cluster.data import load_dataset, split, take
    from cluster.models import resolve_model

    c = config(run_dir)
    rows, _ = load_dataset(c.data.train)
    train = take(split(rows, c.run.seed, c.data.eval_fraction)[0], c.data.n_train, c.run.seed)
    engine = VLLMEngine(resolve_model(c.model.name), max_model_len=c.engine.max_model_len)
    sampling = Sampling.from_config(c.generation, seed=0)
    prompts = [render_prompt(engine.tokenizer, r["messages"]) for r in train]
    start = time.perf_counter()
    engine.generate(prompts, sampling)
    queue.put(time.perf_counter() - start)


def main() -> None:
    import ray

    from jobs.common import Controller
    from methods.spin import beta_for, build_pairs

    tmp = tempfile.mkdtemp()
    ctl = Controller(config(tmp))
    train_rows, _ = ctl.datasets()
    generator = ctl.generator  # placed before timing: later iterations find it up
    c = ctl.config
    start = time.perf_counter()
    generated = ctl.generate("iter0/generate", train_rows, ctl.sampling(c.generation))
    pairs = build_pairs(train_rows, generated, 0)
    model = ctl.train(
        "iter0/spin", "spin", ctl.base_model, pairs, beta=beta_for(0, c.spin.beta), loss_type=c.spin.loss_type
    )
    load_start = time.perf_counter()
    ctl.use_generator_weights(model)
    weight_load_s = time.perf_counter() - load_start
    iteration_s = time.perf_counter() - start
    phases = {**{k: round(v, 1) for k, v in ctl.run.phase_times.items()}, "weight_load": round(weight_load_s, 1)}
    idle = {"generator": round(generator.stats.idle_s(1) - 0.0, 1)}
    idle["train"] = round(ctl.trainer.idle_s(c.pools.train.replicas), 1)
    ctl.close()
    ray.shutdown()

    bare_generate_s = in_subprocess(bare_generation, tmp)
    bare_train_s = bare_training(tmp, pairs, ctl.base_model)
    bare = bare_generate_s + bare_train_s
    print_table(
        "one SPIN iteration, SmolLM2-135M-Instruct, 64 SST-2 prompts",
        [(name, seconds) for name, seconds in phases.items()]
        + [("whole iteration", iteration_s), ("bare generation", bare_generate_s), ("bare training", bare_train_s)],
        ("phase", "seconds"),
    )
    print_table("pool idle during the iteration", list(idle.items()), ("pool", "idle s"))
    emit(
        {
            "phases": phases,
            "pool_idle_s": idle,
            "iteration_s": round(iteration_s, 1),
            "bare_s": round(bare, 1),
            "overhead_ratio": round(iteration_s / bare, 3),
        }
    )


def bare_training(tmp: str, pairs: list[dict], model: str) -> float:
    """The same SPIN phase alone: fresh Ray, TrainingService, one phase (its start-up included)."""
    import ray

    from cluster.connect import connect
    from cluster.tracking import write_parquet
    from training.service import TrainingService

    c = config(tmp)
    connect(c.cluster)
    data = Path(tmp) / "bare-pairs.parquet"
    write_parquet(data, pairs)
    start = time.perf_counter()
    service = TrainingService(c)
    from cluster.config import to_dict

    service.train(
        {
            "name": "bare",
            "kind": "spin",
            "init_model": model,
            "data": str(data),
            "phase_dir": str(Path(tmp) / "bare"),
            "output": str(Path(tmp) / "bare-model"),
            "training": to_dict(c)["training"],
            "seed": 0,
            "beta": c.spin.beta[0],
            "loss_type": "sigmoid",
        }
    )
    seconds = time.perf_counter() - start
    service.shutdown()
    ray.shutdown()
    return seconds


if __name__ == "__main__":
    main()
