"""GPU profiles (configs/gpu-*.yaml) load, and their pools fit on paper in the cluster each one declares in
configs/gpu-profiles.yaml (cluster/placement_check.py: first fit per node, label selectors, tensor parallelism)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.placement_check import (
    NodeGroup,
    check_config_fit,
    check_fit,
    label_matches,
    load_profiles,
    node_group,
    quantity,
)
from configs.schema import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
DECLARED = load_profiles(CONFIGS / "gpu-profiles.yaml")
PROFILES = sorted(DECLARED)


def test_every_gpu_profile_is_declared():
    files = {p.name for p in CONFIGS.glob("gpu-*.yaml")} - {"gpu-profiles.yaml"}
    assert files == set(DECLARED) == {"gpu-1node-8xh100.yaml", "gpu-multinode.yaml"}


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_loads_and_fits(profile):
    text = (CONFIGS / profile).read_text()
    assert text.startswith("# cluster:"), f"{profile}: first line describes the hardware"
    config = load_config(CONFIGS / profile)
    assert config.engine.backend == "vllm" and config.engine.dtype == "bfloat16"
    assert config.engine.enforce_eager is False and config.training.deepspeed.bf16 is True
    report = check_config_fit(config, DECLARED[profile])
    assert report.ok, f"{profile}: {report}"
    for name, hosts in report.placements.items():
        assert len(hosts) == getattr(config.pools, name).replicas
    for name in ("generator", "judge", "teacher", "train"):
        pool = getattr(config.pools, name)
        assert pool.num_gpus >= 1, f"{profile}: pools.{name} runs on GPUs"


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("method", ["spin", "s3ft", "llm2llm", "aft"])
def test_profile_serves_every_method(profile, method):
    config = load_config(CONFIGS / profile, [f"run.method={method}"])  # what jobs.<method> does
    assert config.run_dir.parts[-2] == method


def test_single_node_profile_matches_the_embedded_ray():
    config = load_config(CONFIGS / "gpu-1node-8xh100.yaml")
    (node,) = DECLARED["gpu-1node-8xh100.yaml"]
    assert node.count == 1 and node.gpus_per_node == 8
    assert config.cluster.num_cpus == node.cpus_per_node, "the embedded local Ray gets cluster.num_cpus CPUs"
    assert not any(getattr(config.pools, p).label_selector for p in ("generator", "judge", "teacher", "train"))


def test_multinode_profile_uses_label_selectors_and_zero3():
    config = load_config(CONFIGS / "gpu-multinode.yaml")
    groups = DECLARED["gpu-multinode.yaml"]
    assert sum(g.count * g.gpus_per_node for g in groups) == 32  # 4 machines x 8 H100
    assert config.training.deepspeed.zero_stage == 3
    assert config.run.dir.startswith("/mnt/shared/")  # Ray Train checkpoints must be on a shared path
    train_nodes = {h for h in check_config_fit(config, groups).placements["train"]}
    assert len(train_nodes) == 2, "ZeRO-3 ranks span the two train machines"
    for name in ("generator", "judge", "teacher", "train"):
        selector = getattr(config.pools, name).label_selector
        assert selector, f"pools.{name}: no label_selector"
        assert [g.name for g in groups if label_matches(selector, g.labels)] == [name]


@pytest.mark.parametrize(
    "profile, overrides, expect",
    [
        ("gpu-1node-8xh100.yaml", ["pools.generator.replicas=3"], "no matching node has room"),
        ("gpu-1node-8xh100.yaml", ["pools.train.replicas=8"], "no matching node has room"),
        ("gpu-multinode.yaml", ["pools.train.replicas=17"], "no matching node has room"),
        ("gpu-multinode.yaml", ["pools.generator.replicas=5"], "no matching node has room"),
        ("gpu-multinode.yaml", ["pools.judge.num_cpus=81"], "no matching node has room"),
        (
            "gpu-multinode.yaml",
            ["pools.teacher.replicas=1", "pools.teacher.num_gpus=8", "pools.teacher.tensor_parallel_size=8"],
            "tensor_parallel_size 8 exceeds",
        ),
        ("gpu-multinode.yaml", ["pools.judge.label_selector={selfimprove/pool: nowhere}"], "no node group has labels"),
        ("gpu-multinode.yaml", ["pools.generator.resources={nvme: 1}"], "no matching node has room"),
    ],
)
def test_too_big_a_profile_does_not_fit(profile, overrides, expect):
    config = load_config(CONFIGS / profile, overrides)
    report = check_config_fit(config, DECLARED[profile])
    assert not report.ok
    assert any(expect in e for e in report.errors), report.errors


# ---------------------------------------------------------------------------------------------------
# The helper itself
# ---------------------------------------------------------------------------------------------------


def test_first_fit_packs_nodes_in_order():
    from configs.schema import PoolConfig

    groups = [NodeGroup("a", 2, 4, 16, {"k": "v"}), NodeGroup("b", 1, 8, 32, {})]
    pools = {
        "big": PoolConfig(replicas=2, num_gpus=4, num_cpus=1, tensor_parallel_size=4, label_selector={"k": "v"}),
        "small": PoolConfig(replicas=6, num_gpus=1, num_cpus=4),
    }
    report = check_fit(pools, groups)
    assert report.ok, report
    assert report.placements["big"] == ["a[0]", "a[1]"]
    assert report.placements["small"] == ["b[0]"] * 6  # a[*] are full; b has 8 GPUs, 32 CPUs
    assert report.free["b[0]"] == {"CPU": 8.0, "GPU": 2.0}
    pools["small"] = PoolConfig(replicas=9, num_gpus=1, num_cpus=1)
    assert not check_fit(pools, groups).ok


def test_label_selector_operators():
    labels = {"pool": "gen", "zone": "a"}
    assert label_matches({}, labels)
    assert label_matches({"pool": "gen"}, labels) and not label_matches({"pool": "train"}, labels)
    assert label_matches({"pool": "!train"}, labels) and not label_matches({"pool": "!gen"}, labels)
    assert label_matches({"pool": "in(gen, train)"}, labels) and not label_matches({"zone": "in(b,c)"}, labels)
    assert label_matches({"zone": "!in(b,c)"}, labels) and label_matches({"missing": "!x"}, labels)


def test_quantities_and_bad_declarations():
    assert quantity("500m") == 0.5 and quantity("8") == 8 and quantity(4) == 4 and quantity("64Gi") == 64 * 2**30
    with pytest.raises(ValueError):
        quantity("lots")
    with pytest.raises(ValueError, match="unknown keys"):
        node_group({"name": "x", "count": 1, "gpus_per_node": 8, "cpus_per_node": 8, "gpu": 8})
    with pytest.raises(ValueError, match="missing keys"):
        node_group({"name": "x", "count": 1})
