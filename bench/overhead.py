"""Orchestration overhead of one SPIN iteration on SmolLM2-135M-Instruct.

Measured: one steady-state iteration through the real machinery (generator actor -> Parquet phase -> the
long-lived Ray Train ZeRO-3 pool -> weights back into the generator), with both pools already up, as they
are in every iteration of a job after the first (pool start-up is paid once per job and printed apart; with
cluster.start_pools_together, the default on a joined cluster, both pools start at once and the table reports
what the overlap saved). On the local multi-node cluster (``make cluster-up``), from the checkout:
``ray job submit --working-dir . -- python -m bench.overhead model.cache_dir=$PWD/.cache/models
'pools.generator.label_selector={selfimprove/pool: generator}' 'pools.train.label_selector={selfimprove/pool: train}'``.
Bare: the same phases with their one-time start-up outside the timing too: the same generation on a vLLM
engine alone in one process, and the same SPIN phase (``training.worker.PhaseRunner``: model load,
DeepSpeed ZeRO-3 init, reference log-probs, steps, consolidated save) on a plain two-process gloo group
without Ray. ``overhead_ratio`` = iteration wall time / (bare generation + bare training).
Last line: one JSON object.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as `python bench/x.py`: Python put bench/ on sys.path, not the checkout that holds it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BARE_VLLM_ENV, emit, in_subprocess, parse_cli, print_table  # noqa: E402

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


# Extra `key=value` overrides from the command line (pool pins and cluster.start_pools_together on a cluster).
EXTRA: list[str] = []


def config(run_dir: str):
    from configs.schema import load_config

    return load_config(
        "configs/spin.yaml",
        ["run.method=bench", "run.id=overhead", f"run.dir={run_dir}", "run.fresh=true", *OVERRIDES, *EXTRA],
    )


def bare_generation(run_dir: str, rows: list[dict], sampling, queue) -> None:
    """The iteration's prompts, sampling settings and per-row seeds on a vLLM engine alone (built before timing)."""
    os.environ.update(BARE_VLLM_ENV)
    from actors.engine import VLLMEngine, render_prompt, row_seeds
    from cluster.models import resolve_model

    c = config(run_dir)
    engine = VLLMEngine(resolve_model(c.model.name), max_model_len=c.engine.max_model_len)
    prompts = [render_prompt(engine.tokenizer, r["messages"]) for r in rows]
    start = time.perf_counter()
    outputs = engine.generate(prompts, sampling, row_seeds(sampling.seed, [r["id"] for r in rows]))
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "tokens": sum(len(c.token_ids) for out in outputs for c in out)})


def main() -> None:
    import ray

    from cluster.connect import joined_cluster
    from jobs.controller import Controller
    from methods.spin import beta_for, build_pairs

    tmp = tempfile.mkdtemp()
    ctl = Controller(config(tmp))
    train_rows, _ = ctl.datasets()
    c = ctl.config
    together = joined_cluster() if c.cluster.start_pools_together is None else c.cluster.start_pools_together
    started = time.perf_counter()
    if together:  # as a job starts them (cluster.start_pools_together): the ranks start while the generator builds
        ctl.start_pools(("generator", "train"))
    generator = ctl.generator
    startup = {"generator": time.perf_counter() - started}
    startup["train"] = ctl.trainer.wait_ready(c.cluster.ready_timeout_s)  # from the train pool's own start
    startup["both pools ready"] = time.perf_counter() - started
    # One after the other, both ready = generator + train; together, the saving is what overlapped.
    startup["saved by starting together"] = startup["generator"] + startup["train"] - startup["both pools ready"]
    generator_busy, train_busy = generator.stats.busy_s, ctl.trainer.busy_s

    sampling = ctl.sampling(c.generation)
    start = time.perf_counter()
    generated = ctl.generate("iter0/generate", train_rows, sampling)
    pairs = build_pairs(train_rows, generated, 0)
    model = ctl.train(
        "iter0/spin", "spin", ctl.base_model, pairs, beta=beta_for(0, c.spin.beta), loss_type=c.spin.loss_type
    )
    load_start = time.perf_counter()
    ctl.use_generator_weights(model)
    ctl.generator  # noqa: B018 (the weights load on the pool's next use: this is it)
    weight_load_s = time.perf_counter() - load_start
    iteration_s = time.perf_counter() - start

    phases = {**{k: round(v, 1) for k, v in ctl.run.phase_times.items()}, "weight_load": round(weight_load_s, 1)}
    generated_tokens = sum(g["response_tokens"] for g in generated.values())
    trained = ctl.run.result("iter0/spin")
    iteration_generate_s = ctl.run.phase_times["iter0/generate"]
    idle = {
        "generator": round(iteration_s * len(generator.actors) - (generator.stats.busy_s - generator_busy), 1),
        "train": round((iteration_s - (ctl.trainer.busy_s - train_busy)) * c.pools.train.replicas, 1),
    }
    ctl.close()
    ray.shutdown()

    bare_generated = in_subprocess(bare_generation, tmp, train_rows, sampling)
    bare_trained = in_subprocess(bare_training, tmp, pairs, ctl.base_model)
    bare_generate_s, bare_train_s = bare_generated["seconds"], bare_trained["wall_s"]
    bare = bare_generate_s + bare_train_s
    print_table(
        "where the time goes (iteration vs bare)",
        [
            ("generated tokens", generated_tokens, bare_generated["tokens"]),
            ("generation tok/s", generated_tokens / iteration_generate_s, bare_generated["tokens"] / bare_generate_s),
            ("training start-up s (load, ZeRO-3 init, reference)", trained["startup_s"], bare_trained["startup_s"]),
            ("training steps s", trained["train_time_s"], bare_trained["train_time_s"]),
            ("training tok/s", trained["train_tokens_per_s"], bare_trained["train_tokens_per_s"]),
            ("training phase wall s (worker side)", trained["wall_s"], bare_trained["wall_s"]),
            ("training ranks' malloc", trained["allocator"], bare_trained["allocator"]),
        ],
        ("", "iteration", "bare"),
    )
    print_table(
        "one SPIN iteration, SmolLM2-135M-Instruct, 64 SST-2 prompts (pools up; start-up is once per job)",
        [(name, seconds) for name, seconds in phases.items()]
        + [("whole iteration", iteration_s), ("bare generation", bare_generate_s), ("bare training", bare_train_s)]
        + [(f"start-up, once per job: {name}", seconds) for name, seconds in startup.items()],
        ("phase", "seconds"),
    )
    print_table("pool idle during the iteration (replica-seconds)", list(idle.items()), ("pool", "idle s"))
    emit(
        {
            "phases": phases,
            "pool_idle_s": idle,
            "pool_startup_s": {k: round(v, 1) for k, v in startup.items()},
            "pools_started_together": together,
            "iteration_s": round(iteration_s, 1),
            "bare_s": round(bare, 1),
            "bare_generate_s": round(bare_generate_s, 1),
            "bare_train_s": round(bare_train_s, 1),
            "overhead_ratio": round(iteration_s / bare, 3),
        }
    )


def bare_training(tmp: str, pairs: list[dict], model: str, queue) -> None:
    """The same SPIN phase on two plain gloo processes (no Ray): ``PhaseRunner`` timed on rank 0."""
    import multiprocessing as mp
    import socket

    from configs.schema import to_dict
    from runfolder.run import write_parquet
    from training.service import rank_env

    c = config(tmp)
    data = Path(tmp) / "bare-pairs.parquet"
    write_parquet(data, pairs)
    spec = {
        "name": "bare",
        "kind": "spin",
        "init_model": model,
        "data": str(data),
        "phase_dir": str(Path(tmp) / "bare"),
        "output": str(Path(tmp) / "bare-model"),
        "training": to_dict(c)["training"],
        "seed": c.run.seed,
        "beta": c.spin.beta[0],
        "loss_type": c.spin.loss_type,
    }
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(rank_env(c))  # the ranks' allocator and env, as Ray Train's ranks get them at start
    threads = c.training.threads_per_worker or max(1, int(c.pools.train.num_cpus))
    world = c.pools.train.replicas
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_bare_rank, args=(r, world, port, spec, threads, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise RuntimeError(f"bare training rank exited with {proc.exitcode}")


def _bare_rank(rank: int, world: int, port: int, spec: dict, threads: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from training.worker import PhaseRunner

    torch.set_num_threads(threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dist.barrier()
    start = time.perf_counter()
    result = PhaseRunner(spec, rank, world, lambda metrics: None).run()
    if rank == 0:
        queue.put({**result, "wall_s": time.perf_counter() - start})
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    # `key=value` arguments are config overrides (e.g. pool label selectors when submitted to a cluster).
    EXTRA.extend(a for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
    sys.argv[1:] = [a for a in sys.argv[1:] if a not in EXTRA]
    parse_cli(__doc__)
    main()
