"""Connect the driver to Ray: join the cluster we were submitted to, or start an embedded local one.

Design note: this is the only place that calls ``ray.init``. Under ``ray job submit`` / KubeRay the
``RAY_ADDRESS`` variable is set and we join that cluster unchanged; otherwise we start a private local
Ray (``address="local"``) bound to loopback, with its own temp dir and an explicit auth mode, so it never
attaches to, or is killed with, anybody else's Ray on the machine.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import ray

from cluster.config import ClusterConfig

log = logging.getLogger(__name__)

# Environment every Ray worker process of ours gets (actors, train workers): offline hubs, quiet vLLM,
# caches under the project so nothing is rebuilt per process.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


EMBEDDED_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}


def worker_env() -> dict[str, str]:
    cache = PROJECT_ROOT / ".cache"
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions")),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu") if not _has_cuda() else "cuda",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    return env


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing on a bare client: CPU defaults are harmless
        return False


def connect(config: ClusterConfig) -> str:
    """Connect to Ray once per process; return a description of where we are."""
    if ray.is_initialized():
        return "already connected"
    os.environ.update({k: v for k, v in worker_env().items() if k not in os.environ or k == "PYTHONPATH"})
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        # The job's own runtime_env (working_dir, pip) stays in charge; actors add worker_env() themselves.
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return f"joined {address}"
    os.environ.setdefault("RAY_AUTH_MODE", config.auth_mode)
    # Every idle Ray process costs ~1% of a core in periodic work; on a box whose cores the pools share with
    # Ray's own processes that time comes out of engine and training ranks. Metrics have no reader without
    # the dashboard, and a local box has no preemption notices to watch for. Set these to override.
    for name, value in EMBEDDED_RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)
    temp_dir = Path(tempfile.gettempdir()) / f"selfimprove-ray-{os.getpid()}"
    ray.init(
        address="local",
        num_cpus=config.num_cpus,
        resources=dict(config.resources) or None,
        include_dashboard=config.dashboard,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(temp_dir),
        object_store_memory=int(config.object_store_gib * 1024**3),
        runtime_env={"env_vars": worker_env()},
        log_to_driver=True,
        _system_config={"worker_niceness": config.worker_niceness, "enable_metrics_collection": config.dashboard},
    )
    return f"embedded local Ray ({config.num_cpus:g} logical CPUs, temp {temp_dir})"
