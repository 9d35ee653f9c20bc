"""Auth off only by config (issue 28, item 8): RAY_AUTH_MODE=disabled in the environment without
cluster.auth_mode=disabled stops the job before Ray starts, with an error naming both."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs.schema import ClusterConfig, ConfigError, embedded_auth_mode

ROOT = Path(__file__).resolve().parent.parent


def test_the_environment_cannot_turn_auth_off_without_the_config_key():
    with pytest.raises(ConfigError) as err:
        embedded_auth_mode(ClusterConfig(), {"RAY_AUTH_MODE": "disabled"})
    message = str(err.value)
    assert message.startswith("cluster.auth_mode: RAY_AUTH_MODE='disabled' in the environment")
    assert "set cluster.auth_mode=disabled" in message.lower()
    # Ray switches auth off for any value but 'token': a typo is refused too, and says so
    with pytest.raises(ConfigError, match=r"RAY_AUTH_MODE='tokens'.*only for 'token'"):
        embedded_auth_mode(ClusterConfig(), {"RAY_AUTH_MODE": "tokens"})


def test_auth_modes_that_agree_or_are_stricter_than_the_config_run():
    assert embedded_auth_mode(ClusterConfig(), {}) == "token"
    assert embedded_auth_mode(ClusterConfig(auth_mode="disabled"), {}) == "disabled"
    assert embedded_auth_mode(ClusterConfig(auth_mode="disabled"), {"RAY_AUTH_MODE": "disabled"}) == "disabled"
    assert embedded_auth_mode(ClusterConfig(), {"RAY_AUTH_MODE": "token"}) == "token"
    # the opposite mismatch keeps auth on: the environment may only make the embedded Ray stricter
    assert embedded_auth_mode(ClusterConfig(auth_mode="disabled"), {"RAY_AUTH_MODE": "TOKEN"}) == "token"
    # a cluster the job joins has its own auth: its RAY_AUTH_MODE is not ours to judge
    joined = {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "127.0.0.1:6379"}
    assert embedded_auth_mode(ClusterConfig(), joined) is None
    assert embedded_auth_mode(ClusterConfig(address="ray://x:10001"), {"RAY_AUTH_MODE": "disabled"}) is None


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def test_connect_refuses_before_ray_starts():
    code = (
        "import os, tempfile, ray\n"
        "from configs.schema import ClusterConfig, ConfigError\n"
        "from cluster.connect import connect\n"
        "try:\n"
        "    connect(ClusterConfig(num_cpus=1))\n"
        "except ConfigError as err:\n"
        "    started = os.path.exists(os.path.join(tempfile.gettempdir(), f'selfimprove-ray-{os.getpid()}'))\n"
        "    print('REFUSED', ray.is_initialized(), started, err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env(RAY_AUTH_MODE="disabled"), capture_output=True, text=True, timeout=120
    )
    assert "REFUSED False False cluster.auth_mode: RAY_AUTH_MODE='disabled'" in result.stdout, result.stderr[-2000:]


def test_a_job_with_ray_auth_disabled_by_the_environment_stops_with_a_config_error(tmp_path):
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "jobs.smoke", f"run.dir={tmp_path}"],
        cwd=ROOT,
        env=_env(RAY_AUTH_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: cluster.auth_mode: RAY_AUTH_MODE='disabled' in the environment"), last
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # no run folder: nothing was started
    print(f"refused in {time.perf_counter() - start:.1f} s")
