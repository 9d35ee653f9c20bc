"""training.layout resolved (pure: no Ray), and the one-rank plan holding exactly the pool's optimizer steps.
The Ray Train run of both layouts on the same phase: tests/test_training.py."""

import random

import pytest

from configs.schema import ConfigError, PoolConfig, load_config
from training.layout import LayoutError, rank_micro_batches, resolve_layout
from training.sequences import deal, micro_batches

CPU_POOL = PoolConfig(replicas=2, num_cpus=1)


def test_auto_takes_one_rank_on_an_embedded_cpu_pool_and_the_pool_elsewhere():
    one = resolve_layout("auto", CPU_POOL, 0, joined=False)
    assert (one.name, one.ranks, one.cpus_per_rank, one.threads, one.data_parallel, one.accumulation) == (
        "one_rank",
        1,
        2,
        2,
        2,
        2,
    )
    assert one.reason == "auto: one machine (embedded Ray), CPU ranks: 1 rank x 2 threads for 2 x 1 CPUs"
    cases = {
        "joined": (CPU_POOL, True, "auto: a cluster the job joined"),
        "gpus": (PoolConfig(replicas=2, num_cpus=1, num_gpus=1), False, "auto: GPU ranks"),
        "labels": (PoolConfig(replicas=2, label_selector={"k": "v"}), False, "auto: the pool asks for custom"),
        "resources": (PoolConfig(replicas=2, resources={"big": 1}), False, "auto: the pool asks for custom"),
        "one replica": (PoolConfig(replicas=1, num_cpus=2), False, "auto: the pool has one rank"),
    }
    for what, (pool, joined, reason) in cases.items():
        layout = resolve_layout("auto", pool, 0, joined)
        assert (layout.name, layout.ranks, layout.accumulation) == ("pool", pool.replicas, 1), what
        assert layout.reason.startswith(reason), (what, layout.reason)


def test_autos_one_rank_runs_stage_0_and_the_configured_stage_stays_where_it_partitions_something():
    # One rank holds every ZeRO partition: stage 0 is the same update without ZeRO's buckets and copies.
    one = resolve_layout("auto", CPU_POOL, 0, False, zero_stage=2)
    assert (one.name, one.zero_stage) == ("one_rank", 0)
    assert one.reason.endswith("DeepSpeed stage 0 for ZeRO-2 (one rank holds every partition)")
    assert resolve_layout("auto", CPU_POOL, 0, False, zero_stage=0).zero_stage is None  # already stage 0
    # the configured stage stays: optimizer offload is a ZeRO feature; an explicit one_rank (what the bench measures
    # stage by stage); the pool layout and every layout auto keeps as the pool
    assert resolve_layout("auto", CPU_POOL, 0, False, zero_stage=3, offload=True).zero_stage is None
    assert resolve_layout("one_rank", CPU_POOL, 0, False, zero_stage=2).zero_stage is None
    assert resolve_layout("pool", CPU_POOL, 0, False, zero_stage=2).zero_stage is None
    assert resolve_layout("auto", CPU_POOL, 0, True, zero_stage=3).zero_stage is None
    # in the phase key, so a folder trained at ZeRO-2 on one rank trains again once
    from jobs.controller import Controller

    config = load_config(None, ["pools.train.replicas=2", "training.deepspeed.zero_stage=2"])
    assert Controller._ranks_key(type("C", (), {"config": config})()) == {"ranks": 1, "layout_zero_stage": 0}


def test_explicit_layouts_and_threads():
    pool = resolve_layout("pool", CPU_POOL, 0, joined=False)
    assert (pool.name, pool.ranks, pool.threads, pool.reason) == ("pool", 2, 1, "training.layout=pool")
    # training.threads_per_worker pins threads per pool worker: one rank standing for two gets both workers' worth
    assert resolve_layout("one_rank", PoolConfig(replicas=4, num_cpus=0.5), 1, joined=True).threads == 4
    assert resolve_layout("one_rank", PoolConfig(replicas=3, num_cpus=0.5), 0, joined=True).threads == 1
    with pytest.raises(LayoutError, match="GPUs"):
        resolve_layout("one_rank", PoolConfig(replicas=2, num_gpus=1), 0, joined=False)
    with pytest.raises(ConfigError, match=r"^training.layout: one_rank .* 1 GPUs"):
        load_config(None, ["training.layout=one_rank", "pools.train.num_gpus=1"])
    with pytest.raises(ConfigError, match="training.layout"):
        load_config(None, ["training.layout=two_ranks"])


@pytest.mark.parametrize("n_items,grad_accum", [(12, 1), (13, 1), (40, 3), (7, 2)])
def test_one_rank_steps_hold_the_same_weighted_micro_batches_as_the_pools(n_items, grad_accum):
    # The pool's optimizer step s: micro steps [s*A, (s+1)*A) on every rank. The one rank's: [s*A*W, (s+1)*A*W).
    # Each must average the same (batch, weight) pairs, zero-weight padding included (it counts in DeepSpeed's mean).
    rng = random.Random(n_items)
    lengths = [rng.randint(5, 60) for _ in range(n_items)]
    world = 2
    batches = micro_batches(n_items, lengths, 2, 0, seed=0, epoch=1, group_by_length=True, ranks=world)
    per_rank = [deal(batches, r, world) for r in range(world)]
    one = rank_micro_batches(batches, 0, 1, world)
    assert len(one) == world * len(per_rank[0])
    pool_steps = [
        sorted((tuple(b), w) for r in range(world) for b, w in per_rank[r][s : s + grad_accum])
        for s in range(0, len(per_rank[0]), grad_accum)
    ]
    one_steps = [
        sorted((tuple(b), w) for b, w in one[s : s + grad_accum * world])
        for s in range(0, len(one), grad_accum * world)
    ]
    assert one_steps == pool_steps
    assert rank_micro_batches(batches, 1, world, world) == per_rank[1]  # the pool layout is deal's own
    with pytest.raises(LayoutError):
        rank_micro_batches(batches, 0, 2, 3)
