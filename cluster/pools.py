"""Resource pools: roles are data, placement is config (verl's resource-pool idea, minus the ceremony).

A pool is ``PoolConfig`` (replicas x resources per replica, optional label selector). ``actor_options``
turns it into Ray actor options; ``wait_ready`` waits for a pool's actors with a timeout and, when they
cannot be placed, fails naming the pool and what the cluster lacks instead of hanging (Ray would wait
forever with only autoscaler warnings).
"""

from __future__ import annotations

from typing import Any

import ray

from cluster.connect import worker_env
from configs.schema import PoolConfig


class PoolPlacementError(RuntimeError):
    pass


def replica_resources(pool: PoolConfig) -> dict[str, float]:
    """What one replica asks of the cluster, in Ray resource names."""
    need = {"CPU": pool.num_cpus}
    if pool.num_gpus:
        need["GPU"] = pool.num_gpus
    need.update(pool.resources)
    return {k: v for k, v in need.items() if v}


def actor_options(pool: PoolConfig, name: str | None = None, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "num_cpus": pool.num_cpus,
        "num_gpus": pool.num_gpus,
        "resources": dict(pool.resources),
        "max_restarts": pool.max_restarts,
        "max_task_retries": 0,  # retries are ours: we know which rows a lost request carried
        "runtime_env": {"env_vars": {**worker_env(), **pool.env, **(extra_env or {})}},
    }
    if pool.label_selector:
        options["label_selector"] = dict(pool.label_selector)
    if name:
        options["name"] = name
    return options


def missing_resources(pool: PoolConfig) -> dict[str, str]:
    """Resources one replica needs that no alive node offers (in total); empty if some node could host it."""
    need = replica_resources(pool)
    best: dict[str, str] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        labels = node.get("Labels", {}) or {}
        lacking = {k: f"need {v:g}, node has {have.get(k, 0):g}" for k, v in need.items() if have.get(k, 0) < v}
        for key, value in pool.label_selector.items():
            if labels.get(key) != value:
                lacking[f"label {key}"] = f"need {value!r}, node has {labels.get(key)!r}"
        if not lacking:
            return {}
        if not best or len(lacking) < len(best):
            best = lacking
    return best or {"node": "no alive node"}


def check_pool_fits(pool_name: str, pool: PoolConfig) -> None:
    """Fail at once when no node could ever host one replica of the pool."""
    lacking = missing_resources(pool)
    if lacking:
        details = "; ".join(f"{k}: {v}" for k, v in lacking.items())
        raise PoolPlacementError(f"pool '{pool_name}' cannot be placed on any node: {details}")


def node_labels() -> dict[str, dict[str, str]]:
    """Every node's Ray labels by node id (dead nodes too: a replica's record outlives its node)."""
    return {node["NodeID"]: dict(node.get("Labels") or {}) for node in ray.nodes()}


def start_failure(err: BaseException) -> str:
    """The line of a failed actor start that says why (a StorageError names the node, path and mount)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "StorageError:" in line), lines[-1] if lines else type(err).__name__)


def wait_ready(pool_name: str, refs: list, timeout_s: float, pool: PoolConfig) -> list:
    """Wait for the readiness refs of a pool's actors; raise PoolPlacementError on timeout or a failed start."""
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for i, ref in enumerate(refs):
        if ref in ready:
            try:
                ray.get(ref)
            except Exception as err:  # the replica could not start on the node it was placed on
                raise PoolPlacementError(
                    f"pool '{pool_name}' replica {i} failed to start: {start_failure(err)}"
                ) from err
    if pending:
        available = ray.available_resources()
        need = replica_resources(pool)
        raise PoolPlacementError(
            f"pool '{pool_name}': {len(pending)} of {len(refs)} replicas not ready after {timeout_s:g} s; "
            f"each needs {need}, cluster has available "
            f"{ {k: v for k, v in available.items() if k in need or k in ('CPU', 'GPU')} }"
        )
    return ray.get(ready)
