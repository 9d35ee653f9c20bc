"""Connect the driver to Ray: join the cluster we were submitted to, or start an embedded local one.

Design note: this is the only place that calls ``ray.init``. Under ``ray job submit`` / KubeRay the
``RAY_ADDRESS`` variable is set and we join that cluster unchanged; otherwise we start a private local
Ray (``address="local"``) bound to loopback, with its own temp dir and an explicit auth mode, so it never
attaches to, or is killed with, anybody else's Ray on the machine.

The embedded Ray is private, on two counts. (1) Loopback only: Ray 2.60 binds each server (GCS, raylet, object
manager, core workers, agents) to the node's IP address, and ``ray.init`` turns ``_node_ip_address="127.0.0.1"``
into the machine's external address (``services.resolve_ip_for_localhost``) unless Ray's multi-node switch is
off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, ``ray_constants.ENABLE_RAY_CLUSTER``): that switch is set for
``ray.init`` and the processes it starts, so the node's address stays 127.0.0.1 and nothing of it listens on
another interface (``tests/test_cluster.py`` checks every listening socket of the processes it started). A
cluster we join (``RAY_ADDRESS``, ``ray job submit``, KubeRay) is unchanged. (2) Token auth, on by default
(``cluster.auth_mode: token``), against other users of the same machine: each driver session writes a fresh
random token to a file only its user can read (0600 in a 0700 folder) and points ``RAY_AUTH_TOKEN_PATH`` at it;
the GCS, raylets and workers inherit the variable from the driver, and a client without the token is refused.
Only the config key turns it off: RAY_AUTH_MODE=disabled inherited from a shell or a container image, without
``cluster.auth_mode: disabled``, stops the job before Ray starts (``config.embedded_auth_mode``).
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import ray

from cluster.environment import PROJECT_ROOT
from configs.schema import ClusterConfig, embedded_auth_mode

log = logging.getLogger(__name__)

# Environment every Ray worker process of ours gets (actors, train workers): quiet vLLM, caches under the
# project so nothing is rebuilt per process, and the user's own Hugging Face settings.
# A checkout keeps its caches (built models, vLLM and inductor caches, DeepSpeed ops) in .cache beside the code,
# where `make venv` fills them. An installed package's PROJECT_ROOT is site-packages: no place to write data, and
# maybe read-only. It uses the user's cache folder instead.
IN_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file()
CACHE_ROOT = (
    PROJECT_ROOT / ".cache"
    if IN_CHECKOUT
    else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfimprove"
)


# Ray's multi-node switch: "0" makes Ray's own address lookup answer loopback (ray._private.services).
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

EMBEDDED_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}

# Hugging Face variables passed on to workers only when the user set them: offline mode is the user's
# choice (the Makefile exports HF_HUB_OFFLINE=1 for this box), never forced. Tokens stay on the driver: it
# alone downloads (cluster.models), workers load local folders, and a runtime_env is visible to anyone who
# can list the cluster's jobs.
HF_SECRETS = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}


def user_hf_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if (k.startswith("HF_") or k == "TRANSFORMERS_OFFLINE") and k not in HF_SECRETS
    }


# Set by connect(): True when the driver joined a cluster (RAY_ADDRESS / cluster.address) instead of embedding one.
_joined_cluster = False


def joined_cluster() -> bool:
    """Whether connect() joined a cluster (RAY_ADDRESS / cluster.address) rather than embedding a local Ray."""
    return _joined_cluster


def worker_env(joined: bool | None = None) -> dict[str, str]:
    """Environment of our actors and training ranks. On an embedded Ray, workers share this machine: code and
    caches come from this checkout. On a cluster we joined, nothing points into the driver's checkout (another
    node has no such path; under ``ray job submit`` it is the head's private copy of the working dir): the
    job's ``working_dir`` brings the code to every node and each node keeps its own caches."""
    joined = _joined_cluster if joined is None else joined
    env = {
        **user_hf_env(),
        "VLLM_NO_USAGE_STATS": "1",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu") if not _has_cuda() else "cuda",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if joined:
        return env
    cache = CACHE_ROOT
    env.update(
        {
            "VLLM_CACHE_ROOT": str(cache / "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions")),
            "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
    )
    return env


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing on a bare client: CPU defaults are harmless
        return False


def private_token_file() -> Path:
    """A fresh random Ray auth token in a file only this user can read, removed when the driver exits."""
    folder = Path(tempfile.mkdtemp(prefix="selfimprove-ray-auth-"))  # mkdtemp: mode 0700
    path = folder / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate`
    # Registered before ray.init, so it runs after Ray's own shutdown hook (atexit is last-in, first-out).
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return path


class _LogFilesOnly(logging.Handler):
    """Hands a record to the root logger's file handlers only (driver.log): Ray already printed the line."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)


WORKER_OUTPUT = logging.getLogger("selfimprove.worker_output")
WORKER_OUTPUT.propagate = False
WORKER_OUTPUT.addHandler(_LogFilesOnly())


def tee_worker_output() -> None:
    """Write every line Ray forwards from our workers to the driver's log files (driver.log), the lines its
    console leaves out (cluster.environment.HARMLESS_OUTPUT) included: the console is the readable view, the file
    the full one.
    Ray 2.60 has no public hook for this: its driver-side dispatcher of worker output takes extra handlers."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    def write(batch: dict) -> None:
        who = f"({batch.get('actor_name') or batch.get('task_name') or 'worker'} pid={batch.get('pid')})"
        for line in batch.get("lines", []):
            WORKER_OUTPUT.info("%s %s", who, line)

    global_worker_stdstream_dispatcher.remove_handler("selfimprove_driver_log")
    global_worker_stdstream_dispatcher.add_handler("selfimprove_driver_log", write)


@contextmanager
def loopback_only():
    """While the embedded Ray starts: its node address stays 127.0.0.1 (``ray.init`` would turn it into the external
    address), here and in the processes it starts (they inherit the variable and resolve their own address
    through it). Restored afterwards: this process's later clients (``ray job submit`` of a test) are unchanged."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_SWITCH, None)
        else:
            os.environ[LOOPBACK_SWITCH] = saved_env


def joins_cluster(config: ClusterConfig) -> bool:
    """Whether connect() joins a cluster (cluster.address or RAY_ADDRESS) rather than embedding a local Ray."""
    return bool(config.address or os.environ.get("RAY_ADDRESS"))


def connect(config: ClusterConfig) -> str:
    """Connect to Ray once per process; return a description of where we are."""
    global _joined_cluster
    if ray.is_initialized():
        return "already connected"
    address = config.address or os.environ.get("RAY_ADDRESS")
    _joined_cluster = bool(address)
    os.environ.update({k: v for k, v in worker_env().items() if k not in os.environ or k == "PYTHONPATH"})
    if address:
        # The job's own runtime_env (working_dir, pip) stays in charge; actors add worker_env() themselves.
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        tee_worker_output()
        return f"joined {address}"
    # Before anything starts: only cluster.auth_mode may turn auth off (ConfigError when the environment would).
    mode = embedded_auth_mode(config, os.environ)
    if mode != config.auth_mode:
        log.warning("RAY_AUTH_MODE=token in the environment keeps token auth on despite cluster.auth_mode=disabled")
    os.environ["RAY_AUTH_MODE"] = mode
    if mode == "token" and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        # Not Ray's default ~/.ray/auth_token: that file is shared by every Ray of the user, lives on, and is
        # written with the umask's permissions.
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(private_token_file())
    # Ray read RAY_AUTH_MODE and the token when it was imported: make this process see the values above too
    # (what ray.init itself does when it turns token auth on), or the driver is refused by its own GCS.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    # Every idle Ray process costs ~1% of a core in periodic work; on a box whose cores the pools share with
    # Ray's own processes that time comes out of engine and training ranks. Metrics have no reader without
    # the dashboard, and a local box has no preemption notices to watch for. Set these to override.
    for name, value in EMBEDDED_RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)
    if config.dashboard:  # the dashboard's Train page lists runs only when the train controller records them
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    temp_dir = Path(tempfile.gettempdir()) / f"selfimprove-ray-{os.getpid()}"
    with loopback_only():
        ray.init(
            address="local",
            num_cpus=config.num_cpus,
            resources=dict(config.resources) or None,
            include_dashboard=config.dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            _temp_dir=str(temp_dir),
            object_store_memory=int(config.object_store_gib * 1024**3),
            runtime_env={"env_vars": worker_env()},
            log_to_driver=True,
            _system_config={"worker_niceness": config.worker_niceness, "enable_metrics_collection": config.dashboard},
        )
    tee_worker_output()
    return f"embedded local Ray ({config.num_cpus:g} logical CPUs, temp {temp_dir})"
