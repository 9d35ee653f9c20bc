"""`ray job submit` for real: a local Ray head of our own, a method job submitted to it, and cleanup of
exactly the processes we started (never `ray stop`, which would kill every Ray on the machine)."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port(low: int = 20000) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= low:  # outside Ray's worker port range (10002-19999)
            return port


@pytest.fixture(scope="module")
def head():
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env = (free_port() for _ in range(7))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={gcs}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            "--num-cpus=8",
            # every port our own: another Ray on the machine (the test session's) holds the defaults
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=180,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ok = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True)
        if ok.returncode == 0:
            break
        time.sleep(2)
    yield address, env
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            pass


def submit(address: str, env: dict, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    runtime_env = {
        "excludes": [".venv", ".cache", "runs", ".git", "**/__pycache__"],
        "env_vars": {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"},
    }
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "-m",
        "jobs.spin",
        "--config",
        "configs/spin-tiny.yaml",
        f"run.dir={run_dir}",
        f"model.cache_dir={ROOT / '.cache/models'}",
        *overrides,
    ]
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        # A fresh head answers `ray job list` before its job agent is up: that refusal is not the job's result.
        if "No available agent to submit job" not in result.stderr + result.stdout or time.monotonic() > deadline:
            return result
        time.sleep(3)


def test_submitted_method_job_succeeds_and_writes_its_run(head, tmp_path):
    address, env = head
    result = submit(address, env, tmp_path, "spin.iterations=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    run = tmp_path / "spin" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert "joined" in (run / "driver.log").read_text()  # the driver joined the submitted-to cluster
    assert {"iter0/eval/accuracy", "iter1/eval/accuracy"} <= set(summary["metrics"])
    assert (run / "models/iter0/spin/config.json").exists()


def test_failed_job_exits_nonzero_with_the_driver_error(head, tmp_path):
    address, env = head
    result = submit(address, env, tmp_path, "training.lr=-1")
    assert result.returncode != 0
    assert "training.lr: must be > 0" in result.stdout + result.stderr
