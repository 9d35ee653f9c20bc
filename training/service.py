"""The driver's handle on training: one long-lived Ray Train ``TorchTrainer`` fed phase by phase.

``TrainingService.train(spec)`` puts a phase spec on the ``PhaseQueue`` actor and blocks until rank 0
reports the result, forwarding rank 0's step metrics to the tracker as they arrive. The ``fit()`` runs in
a background thread for the life of the job; if its workers die, Ray Train restarts the group
(``FailureConfig``) and the loop resumes the unfinished phase from its DeepSpeed checkpoint.

Every rank also beats into the queue (its optimizer step and where it is, each micro step). A rank silent for
``training.stall_timeout_s`` (a hung collective, a stuck filesystem) fails the phase with an error naming the
rank that went quiet first and its last step: without it a hung rank hung the driver forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray
from tqdm import tqdm

from cluster.connect import joined_cluster, joins_cluster, worker_env
from cluster.pools import check_pool_fits
from configs.schema import JobConfig
from training.layout import Layout, resolve_layout

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class PhaseQueue:
    def __init__(self):
        self.specs: dict[int, dict | None] = {}
        self.results: dict[int, dict] = {}
        self.logs: list[dict] = []
        self.waiting: set[int] = set()  # ranks blocked in get(): the pool is up and idle
        self.changed = asyncio.Event()
        self.put_at: dict[int, float] = {}
        self.beats: dict[int, dict[int, tuple[int, str, float]]] = {}  # phase -> rank -> (step, stage, time)
        self.ranks: dict[int, dict] = {}  # rank -> {node_id, pid, storage_error}: where the ranks run now

    def _notify(self):
        self.changed.set()
        self.changed = asyncio.Event()

    async def put(self, index: int, spec: dict | None) -> None:
        self.specs[index] = spec
        self.put_at[index] = time.monotonic()
        self._notify()

    async def beat(self, index: int, rank: int, step: int, stage: str) -> None:
        previous = self.beats.setdefault(index, {}).get(rank)
        self.beats[index][rank] = (step, stage, time.monotonic(), previous[3] + 1 if previous else 1)

    async def progress(self, index: int, world_size: int) -> dict[int, dict]:
        """Each rank's last step and stage in phase ``index``, seconds since it said so (since the phase was
        queued for a rank that has not beaten yet; one clock, this actor's, for all ranks) and how many times it
        reported (its progress: ranks move in lock-step, so the one with the fewest reports is the one behind)."""
        now, beats = time.monotonic(), self.beats.get(index, {})
        since_put = now - self.put_at.get(index, now)
        return {
            rank: {
                "step": beats[rank][0],
                "stage": beats[rank][1],
                "silent_s": now - beats[rank][2],
                "reports": beats[rank][3],
            }
            if rank in beats
            else {"step": None, "stage": "not started", "silent_s": since_put, "reports": 0}
            for rank in range(world_size)
        }

    async def get(self, index: int, rank: int = 0) -> dict | None:
        self.waiting.add(rank)
        try:
            while index not in self.specs:
                await self.changed.wait()
        finally:
            self.waiting.discard(rank)
        return self.specs[index]

    async def arrive(self, rank: int, info: dict) -> None:
        self.ranks[rank] = info

    async def placement(self) -> dict[int, dict]:
        return dict(self.ranks)

    async def waiting_ranks(self) -> int:
        return len(self.waiting)

    async def first_unfinished(self) -> int:
        return len(self.results)

    async def done(self, index: int, result: dict) -> None:
        self.results[index] = result
        self._notify()

    async def fail(self, index: int, error: str) -> None:
        self.results[index] = {"error": error}
        self._notify()

    async def result(self, index: int, timeout: float) -> dict | None:
        try:
            while index not in self.results:
                await asyncio.wait_for(self.changed.wait(), timeout)
        except TimeoutError:
            return None
        return self.results[index]

    async def log(self, metrics: dict) -> None:
        self.logs.append(metrics)

    async def drain_logs(self) -> list[dict]:
        logs, self.logs = self.logs, []
        return logs


class TrainingError(RuntimeError):
    pass


def allocator_env(allocator: str) -> dict[str, str]:
    """Process-start environment that swaps the ranks' malloc (``training.allocator``); read by the dynamic
    loader, so it must be in place when the process starts, not set from inside it."""
    if allocator == "system":
        return {}
    library = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    if not library.exists():
        raise TrainingError(f"training.allocator=jemalloc: {library} is missing from this ray install; use 'system'")
    preload = " ".join(p for p in (str(library), os.environ.get("LD_PRELOAD", "")) if p)
    # Above jemalloc's 8 MiB oversize threshold, freed memory goes back to the OS at once: logits and
    # activations are larger than that, so the default would keep most of glibc's page faults.
    return {"LD_PRELOAD": preload, "MALLOC_CONF": "oversize_threshold:0"}


def train_layout(config: JobConfig) -> Layout:
    """The ranks the train pool runs as (training.layout resolved for this driver's cluster; training/layout.py)."""
    training = config.training
    joins = joins_cluster(config.cluster) or joined_cluster()  # joined_cluster: a driver that connected already
    ds = training.deepspeed
    return resolve_layout(
        training.layout, config.pools.train, training.threads_per_worker, joins, ds.zero_stage, ds.offload_optimizer
    )


def native_precision(config: JobConfig) -> str | None:
    """What training.deepspeed.bf16 'native' trains in, where the driver can tell: on an embedded Ray with CPU ranks
    the ranks run on this machine, so this CPU and the ranks' environment (a oneDNN ISA cap in ``pools.train.env``)
    decide: 'bf16' or 'fp32'. None where the ranks' own nodes decide (GPU ranks, or a cluster the job joins); there
    the phase result's ``precision`` says what ran."""
    from training.worker import native_bf16

    if config.pools.train.num_gpus or joins_cluster(config.cluster) or joined_cluster():
        return None
    return "bf16" if native_bf16({**os.environ, **config.pools.train.env}) else "fp32"


def rank_env(config: JobConfig) -> dict[str, str]:
    """Environment of every training rank process, Ray Train's and the benchmarks' bare ones alike."""
    return {**worker_env(), **allocator_env(config.training.allocator), **config.pools.train.env}


class TrainingService:
    RUN_NAME = "train"

    def __init__(
        self,
        config: JobConfig,
        on_metrics: Callable[[dict], None] | None = None,
        shared_paths: dict[str, list[str]] | None = None,
    ):
        """``shared_paths``: {"read": [...], "write": [...]} every rank checks from its node when it starts."""
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from training.worker import train_loop_per_worker

        pool = config.pools.train
        check_pool_fits("train", pool)
        self.layout = train_layout(config)
        log.info("training layout: %s", self.layout.reason)
        self.stall_timeout_s = config.training.stall_timeout_s
        self.stalled = False
        self.on_metrics = on_metrics or (lambda m: None)
        self.queue = PhaseQueue.remote()
        # Ray Train's record of the job: each phase's metrics and HF checkpoint (``ray.train.Result.from_path``).
        self.storage = Path(config.run_dir).resolve() / "ray_train" / self.RUN_NAME
        self.next_index = 0
        self.replicas = self.layout.ranks
        resources = {"CPU": self.layout.cpus_per_rank, **pool.resources}
        if pool.num_gpus:
            resources["GPU"] = pool.num_gpus
        self.trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"queue": self.queue, "threads": self.layout.threads, "shared_paths": shared_paths or {}},
            scaling_config=ScalingConfig(
                num_workers=self.layout.ranks,
                use_gpu=pool.num_gpus > 0,
                resources_per_worker=resources,
                label_selector=dict(pool.label_selector) or None,
            ),
            run_config=RunConfig(
                name=self.RUN_NAME,
                storage_path=str(self.storage.parent),
                failure_config=FailureConfig(max_failures=pool.max_restarts),
                worker_runtime_env={"env_vars": rank_env(config)},
            ),
        )
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._fit, daemon=True, name="ray-train-fit")
        self.thread.start()
        self.busy_s = 0.0

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as err:  # surfaced to the caller of train()
            self.error = err

    def train(self, spec: dict) -> dict:
        index = self.next_index
        start = time.perf_counter()
        ray.get(self.queue.put.remote(index, {**spec, "layout": self.layout.spec()}))
        bar = tqdm(desc=f"train {spec['name']}", unit="step", leave=False)
        try:
            while True:
                result = ray.get(self.queue.result.remote(index, 2.0))
                for metrics in ray.get(self.queue.drain_logs.remote()):
                    bar.total = metrics["total_steps"]
                    bar.n = metrics["step"]
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                    self.on_metrics(metrics)
                if result is not None:
                    break
                if not self.thread.is_alive():
                    raise TrainingError(f"training workers stopped during phase {spec['name']}: {self.error!r}")
                self._check_storage()
                self._check_stall(index, spec["name"])
        finally:
            bar.close()
        if "error" in result:
            raise TrainingError(f"phase {spec['name']} failed on the train pool: {result['error']}")
        self.next_index += 1
        self.busy_s += time.perf_counter() - start
        return result

    def _check_stall(self, index: int, name: str) -> None:
        if not self.stall_timeout_s:
            return
        ranks = ray.get(self.queue.progress.remote(index, self.replicas))
        if max(p["silent_s"] for p in ranks.values()) < self.stall_timeout_s:
            return
        # Once one rank stops, the others block in their next collective and fall silent a moment later: name the
        # rank that is behind (fewest reports), not the one whose last report happened to arrive first.
        rank, quiet = min(ranks.items(), key=lambda item: (item[1]["reports"], -item[1]["silent_s"]))
        self.stalled = True
        self.next_index += 1  # the stalled phase's slot is spent: ranks that ever get past it find the stop spec next
        others = ", ".join(
            f"rank {r}: step {p['step']} ({p['stage']}, {p['silent_s']:.0f} s ago)"
            for r, p in ranks.items()
            if r != rank
        )
        raise TrainingError(
            f"phase {name} stalled: rank {rank} reported nothing for {quiet['silent_s']:.0f} s "
            f"(training.stall_timeout_s={self.stall_timeout_s:g}); its last step was {quiet['step']} "
            f"({quiet['stage']}). Other ranks: {others or 'none'}"
        )

    def _check_storage(self) -> None:
        """A rank that cannot use the shared paths from its node fails the pool at once, naming node and path
        (Ray Train would otherwise restart the group on the same node and fail again)."""
        errors = [r["storage_error"] for r in ray.get(self.queue.placement.remote()).values() if r.get("storage_error")]
        if errors:
            raise TrainingError(errors[0])

    def placement(self) -> list[dict]:
        """Node id per training rank (in rank order), as the ranks reported it when they started."""
        ranks = ray.get(self.queue.placement.remote())
        return [{"node_id": ranks[r]["node_id"]} for r in sorted(ranks)]

    def wait_ready(self, timeout_s: float) -> float:
        """Block until every rank waits for work (worker start-up and process group done); return seconds."""
        while ray.get(self.queue.waiting_ranks.remote()) < self.replicas:
            self._check_storage()
            if not self.thread.is_alive():
                raise TrainingError(f"training workers stopped during start-up: {self.error!r}")
            if time.perf_counter() - self.started > timeout_s:
                raise TrainingError(f"train pool not ready after {timeout_s:.0f} s (cluster.ready_timeout_s)")
            time.sleep(0.5)
        return time.perf_counter() - self.started

    def reported_phases(self) -> list[tuple[str, dict]]:
        """(checkpoint folder, metrics) of every phase Ray Train registered, read from its run storage."""
        from ray.train import Result

        if not (self.storage / "checkpoint_manager_snapshot.json").exists():
            return []
        return [(c.path, m) for c, m in Result.from_path(str(self.storage)).best_checkpoints]

    def idle_s(self) -> float:
        return max(0.0, (time.perf_counter() - self.started - self.busy_s) * self.replicas)

    def shutdown(self) -> None:
        if self.thread.is_alive():
            ray.get(self.queue.put.remote(self.next_index, None))
            # Hung ranks never read the stop spec; Ray ends them with the driver.
            self.thread.join(timeout=5 if self.stalled else 120)
