"""How the train pool's CPUs become ranks (``training.layout``): the pool as configured, or one rank with all of it.

Design note. On one box, ``pools.train: {replicas: 2, num_cpus: 1}`` runs two single-thread ranks: each multiplies
half of the global batch on one core, and every optimizer step all-reduces the gradients over gloo between two
processes of the same machine. One rank with both cores does the same arithmetic with neither the reduction nor
a second copy of the model, optimizer and DeepSpeed buffers. Measured (bench/training.py, SmolLM2 SFT, global batch
8, fp32 ZeRO-2, both layouts in one run alone on the machine; NOTES.md "The training layout"): on an AVX2-only
EPYC the two tie on speed (58.1 vs 58.8 tok/s) and one rank holds ~32% less memory in all and starts 7 s sooner,
so ``auto`` takes it on one box. The other machine kinds are not measured yet; the bench reports
``default_layout_is_faster`` wherever it runs.

``one_rank`` changes where the arithmetic runs, not what it computes: the micro-batches are still planned for the
pool's ``replicas`` ranks (``micro_batches(ranks=replicas)``, the zero-weight padding ``deal`` adds included); the
one rank runs the micro-batches of all of them, micro step by micro step, and accumulates ``grad_accum x replicas``
of them per optimizer step. Every optimizer step so averages the gradients of the same sequences with the same
weights as the pool's ranks would; only the order of the float additions differs. The learning-rate schedule,
the step count and the checkpoints' micro steps follow.

``auto`` is ``one_rank`` where the driver embeds its own Ray (one machine; cluster.address and RAY_ADDRESS unset)
and the train pool has CPUs only, no custom resources and no label selector; ``pool`` on a cluster the job joins
(ranks on other machines need the all-reduce anyway), on GPUs (one rank per GPU), and for a pool of one rank.

``auto``'s one rank also runs DeepSpeed's stage 0 (``zero_stage``): ZeRO partitions the optimizer state, gradients
and weights over the ranks, and one rank holds every partition, so a ZeRO stage saves no memory there and costs its
bucketing and partition copies. Measured (bench/training.py, one run alone on a 2-core AVX-512 + avx512_bf16 EPYC,
NOTES.md "Training layout and stage 0"): one rank at stage 0 trains 1.10x one rank at ZeRO-2 in fp32 (107.7 vs
98.2 tok/s) and 1.09x in bf16 (158.2 vs 145.2). The configured stage stays where it does something: an explicit
``one_rank`` (what the bench measures stage by stage), the ``pool`` layout, and optimizer offload (a ZeRO feature).
Pure: no Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    name: str  # "pool" or "one_rank": what runs
    ranks: int  # Ray Train workers
    cpus_per_rank: float  # the CPU resource each worker asks Ray for
    threads: int  # torch intra-op threads per rank
    data_parallel: int  # ranks the micro-batches are planned for (pools.train.replicas): sets the global batch
    reason: str  # why this layout, for the phase result and the log
    zero_stage: int | None = None  # the ZeRO stage the ranks run where it is not training.deepspeed.zero_stage

    @property
    def accumulation(self) -> int:
        """Planned ranks each rank stands for: its grad_accum is multiplied by this."""
        return self.data_parallel // self.ranks

    def spec(self) -> dict[str, Any]:
        """What each rank needs (and the phase result reports)."""
        return asdict(self)


def resolve_layout(
    setting: str, pool: Any, threads_per_worker: int, joined: bool, zero_stage: int = 0, offload: bool = False
) -> Layout:
    """The layout ``training.layout`` resolves to for ``pools.train`` (a PoolConfig) on a cluster the driver
    joins (``joined``) or embeds. ``threads_per_worker``: training.threads_per_worker (0: the worker's CPUs);
    ``zero_stage`` / ``offload``: training.deepspeed's zero_stage and offload_optimizer (auto's one rank runs
    stage 0 unless the optimizer is offloaded)."""
    per_rank_threads = threads_per_worker or max(1, int(pool.num_cpus))
    as_configured = Layout("pool", pool.replicas, pool.num_cpus, per_rank_threads, pool.replicas, "")
    if setting == "pool":
        return _with(as_configured, "training.layout=pool")
    if setting == "one_rank":
        if pool.num_gpus:
            raise LayoutError(
                f"training.layout=one_rank: the train pool has GPUs (pools.train.num_gpus={pool.num_gpus:g}); "
                "a GPU rank drives its own GPU, so keep one rank per replica (training.layout: pool or auto)"
            )
        return _one_rank(pool, threads_per_worker, "training.layout=one_rank")
    if setting != "auto":
        raise LayoutError(f"training.layout={setting!r}: expected auto, pool or one_rank")
    if pool.replicas == 1:
        return _with(as_configured, "auto: the pool has one rank")
    if joined:
        return _with(as_configured, "auto: a cluster the job joined (its ranks may be on other machines)")
    if pool.num_gpus:
        return _with(as_configured, "auto: GPU ranks (one per GPU)")
    if pool.resources or pool.label_selector:
        return _with(as_configured, "auto: the pool asks for custom resources or node labels")
    one = _one_rank(pool, threads_per_worker, "auto: one machine (embedded Ray), CPU ranks")
    if zero_stage and not offload:
        reason = f"{one.reason}, DeepSpeed stage 0 for ZeRO-{zero_stage} (one rank holds every partition)"
        return replace(one, zero_stage=0, reason=reason)
    return one


def _with(layout: Layout, reason: str) -> Layout:
    return replace(layout, reason=reason)


def _one_rank(pool: Any, threads_per_worker: int, reason: str) -> Layout:
    cpus = pool.replicas * pool.num_cpus
    threads = threads_per_worker * pool.replicas if threads_per_worker else max(1, int(cpus))
    return Layout(
        "one_rank",
        1,
        cpus,
        threads,
        pool.replicas,
        f"{reason}: 1 rank x {threads} threads for {pool.replicas} x {pool.num_cpus:g} CPUs",
    )


def rank_micro_batches(
    batches: list[list[int]], rank: int, world_size: int, data_parallel: int
) -> list[tuple[list[int], float]]:
    """This rank's weighted micro-batches, in order: those of the planned ranks it stands for (``rank``,
    ``rank + world_size``, ...), the micro step's ones together. ``data_parallel == world_size``: ``deal``'s."""
    from training.sequences import deal

    if data_parallel % world_size:
        raise LayoutError(f"{data_parallel} planned ranks cannot be split over {world_size} ranks")
    mine = [deal(batches, r, data_parallel) for r in range(rank, data_parallel, world_size)]
    return [per_rank[step] for step in range(len(mine[0])) for per_rank in mine]
