"""On-paper placement check: do a config's pools fit on a declared cluster? Pure Python, no Ray.

A declared cluster is a list of node groups (``count`` identical Ray nodes with ``gpus_per_node``,
``cpus_per_node``, optional custom ``resources`` and Ray node ``labels``), as in ``configs/gpu-profiles.yaml``
or as read from a KubeRay RayCluster spec. Every replica of every pool is placed whole on one node, first fit
(largest replicas first), on a node whose labels satisfy the pool's ``label_selector`` (Ray's syntax: ``v``,
``!v``, ``in(a,b)``, ``!in(a,b)``); a tensor-parallel replica also needs ``tensor_parallel_size`` GPUs on that
node. All pools are counted as alive at once, which is what a method driver may do (the generator stays up
while the judge, teacher and trainer run). ``cluster/pools.py`` does the same check against a live cluster.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from configs.schema import JobConfig, PoolConfig

POOL_NAMES = ("generator", "judge", "teacher", "train")


@dataclass(frozen=True)
class NodeGroup:
    name: str
    count: int
    gpus_per_node: float
    cpus_per_node: float
    labels: Mapping[str, str] = field(default_factory=dict)
    resources: Mapping[str, float] = field(default_factory=dict)


@dataclass
class Node:
    group: NodeGroup
    index: int
    free: dict[str, float]

    @property
    def name(self) -> str:
        return f"{self.group.name}[{self.index}]"


@dataclass
class FitReport:
    placements: dict[str, list[str]] = field(default_factory=dict)  # pool -> node name per replica
    errors: list[str] = field(default_factory=list)
    free: dict[str, dict[str, float]] = field(default_factory=dict)  # node name -> what is left

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        if self.ok:
            return "fits: " + "; ".join(f"{p} -> {', '.join(n)}" for p, n in self.placements.items())
        return "does not fit: " + "; ".join(self.errors)


# ---------------------------------------------------------------------------------------------------
# Declared clusters
# ---------------------------------------------------------------------------------------------------


def node_group(entry: Mapping[str, Any], where: str = "node group") -> NodeGroup:
    known = {"name", "count", "gpus_per_node", "cpus_per_node", "labels", "resources"}
    unknown = set(entry) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (valid: {sorted(known)})")
    missing = {"name", "count", "gpus_per_node", "cpus_per_node"} - set(entry)
    if missing:
        raise ValueError(f"{where}: missing keys {sorted(missing)}")
    group = NodeGroup(
        name=str(entry["name"]),
        count=int(entry["count"]),
        gpus_per_node=float(entry["gpus_per_node"]),
        cpus_per_node=float(entry["cpus_per_node"]),
        labels={str(k): str(v) for k, v in (entry.get("labels") or {}).items()},
        resources={str(k): float(v) for k, v in (entry.get("resources") or {}).items()},
    )
    if group.count < 1 or group.gpus_per_node < 0 or group.cpus_per_node < 0:
        raise ValueError(f"{where}: count must be >= 1 and gpus/cpus >= 0")
    return group


def load_profiles(path: str | Path) -> dict[str, list[NodeGroup]]:
    """``configs/gpu-profiles.yaml``: profile file name -> its declared node groups."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must map profile file names to lists of node groups")
    return {
        str(name): [node_group(g, f"{path}: {name}[{i}]") for i, g in enumerate(groups)]
        for name, groups in data.items()
    }


_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ('500m', '8', '64Gi') as a number."""
    if isinstance(value, (int, float)):
        return float(value)
    match = _QUANTITY.match(value.strip())
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def ray_group_resources(group_spec: Mapping[str, Any]) -> tuple[float, float]:
    """(GPUs, CPUs) Ray sees on one pod of a KubeRay head/worker group, as KubeRay derives them: rayStartParams
    num-gpus/num-cpus if set, else the Ray container's limits (requests if no limit); CPUs are rounded up."""
    params = group_spec.get("rayStartParams") or {}
    container = group_spec["template"]["spec"]["containers"][0]  # KubeRay: the Ray container comes first
    res = container.get("resources") or {}
    amounts = {**(res.get("requests") or {}), **(res.get("limits") or {})}
    gpus = float(params["num-gpus"]) if "num-gpus" in params else quantity(amounts.get("nvidia.com/gpu", 0))
    cpus = float(params["num-cpus"]) if "num-cpus" in params else math.ceil(quantity(amounts.get("cpu", 0)))
    return gpus, float(cpus)


def node_groups_from_raycluster(spec: Mapping[str, Any]) -> list[NodeGroup]:
    """The declared cluster of a RayCluster spec (``spec`` of a RayCluster, ``spec.rayClusterSpec`` of a RayJob)."""
    head = spec["headGroupSpec"]
    gpus, cpus = ray_group_resources(head)
    groups = [NodeGroup("head", 1, gpus, cpus, dict(head.get("labels") or {}))]
    for worker in spec.get("workerGroupSpecs") or []:
        gpus, cpus = ray_group_resources(worker)
        count = int(worker.get("replicas", worker.get("minReplicas", 0)))
        if count:
            groups.append(NodeGroup(worker["groupName"], count, gpus, cpus, dict(worker.get("labels") or {})))
    return groups


# ---------------------------------------------------------------------------------------------------
# Label selectors and the fit
# ---------------------------------------------------------------------------------------------------


def label_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Ray label-selector semantics: 'v' equals, '!v' differs (or is absent), 'in(a,b)' / '!in(a,b)' sets."""
    for key, want in selector.items():
        have = labels.get(key)
        negate = want.startswith("!")
        body = want[1:] if negate else want
        if body.startswith("in(") and body.endswith(")"):
            hit = have in {v.strip() for v in body[3:-1].split(",")}
        else:
            hit = have == body
        if hit == negate:
            return False
    return True


def replica_needs(pool: PoolConfig) -> dict[str, float]:
    need = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources}
    return {k: float(v) for k, v in need.items() if v}


def _nodes(groups: Iterable[NodeGroup]) -> list[Node]:
    nodes = []
    for group in groups:
        for i in range(group.count):
            free = {"CPU": group.cpus_per_node, "GPU": group.gpus_per_node, **group.resources}
            nodes.append(Node(group, i, {k: float(v) for k, v in free.items()}))
    return nodes


def check_fit(pools: Mapping[str, PoolConfig], groups: Iterable[NodeGroup]) -> FitReport:
    """First-fit (largest replicas first) of every replica of ``pools`` on the nodes of ``groups``."""
    nodes = _nodes(groups)
    report = FitReport(placements={name: [] for name in pools})
    eps = 1e-9
    replicas = [(name, i, pool) for name, pool in pools.items() for i in range(pool.replicas)]
    replicas.sort(key=lambda r: (-r[2].num_gpus, -r[2].num_cpus, r[0], r[1]))
    for name, i, pool in replicas:
        need = replica_needs(pool)
        matching = [n for n in nodes if label_matches(pool.label_selector, n.group.labels)]
        where = f"pool '{name}' replica {i + 1}/{pool.replicas} ({_fmt(need)}, labels {dict(pool.label_selector)})"
        if not matching:
            report.errors.append(f"{where}: no node group has labels matching the selector")
            continue
        tp = pool.tensor_parallel_size if name != "train" else 1
        if tp > 1 and not any(n.group.gpus_per_node >= tp for n in matching):
            report.errors.append(
                f"{where}: tensor_parallel_size {tp} exceeds the GPUs of every matching node "
                f"(max {max(n.group.gpus_per_node for n in matching):g})"
            )
            continue
        host = next(
            (
                n
                for n in matching
                if n.group.gpus_per_node >= tp and all(n.free.get(k, 0.0) + eps >= v for k, v in need.items())
            ),
            None,
        )
        if host is None:
            left = ", ".join(f"{n.name}: {_fmt(n.free)}" for n in matching)
            report.errors.append(f"{where}: no matching node has room left ({left})")
            continue
        for k, v in need.items():
            host.free[k] -= v
        report.placements[name].append(host.name)
    report.free = {n.name: dict(n.free) for n in nodes}
    return report


def check_config_fit(
    config: JobConfig, groups: Iterable[NodeGroup], pool_names: Iterable[str] = POOL_NAMES
) -> FitReport:
    return check_fit({name: getattr(config.pools, name) for name in pool_names}, groups)


def _fmt(amounts: Mapping[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in amounts.items()) or "nothing"
