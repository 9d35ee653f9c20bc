"""The jobs' command line: --help lists every config key with type, default and doc; --print-config."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import yaml

from cluster.cli import config_reference, type_name
from cluster.config import JobConfig, describe

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_training_lr_with_its_type_default_and_doc():
    done = subprocess.run(
        [sys.executable, "-m", "jobs.spin", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    at = lines.index("  training.lr  (float, default 2.0e-05)")
    assert lines[at + 1].strip() == "Peak learning rate. Range: > 0."
    assert "training: Fine-tuning." in lines and "  run.method  (str, default 'spin')" in lines
    assert "  data.columns  (dict[str, str], default {})" in lines
    assert "  spin.loss_type  ('sigmoid' | 'hinge', default 'sigmoid')" in lines


def test_help_has_every_key_and_factory_defaults():
    text = "\n".join(config_reference())
    for key, _, _ in describe():
        assert f"\n  {key}  (" in text or text.startswith(f"  {key}  ("), key
    # Section factories differ from the class defaults: greedy evaluation, two training ranks.
    assert "  evaluation.temperature  (float, default 0.0)" in text
    assert "  pools.train.replicas  (int, default 2)" in text
    assert type_name(dataclasses.fields(JobConfig)[0].type) == "RunConfig"


def test_print_config_prints_the_resolved_config_and_exits():
    done = subprocess.run(
        [sys.executable, "-m", "jobs.spin", "--config", "configs/spin-tiny.yaml", "--print-config", "training.lr=3e-6"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["training"]["lr"] == 3e-6 and printed["data"]["train"] == "sst2"  # override + file
    assert printed["data"]["allow_overlap"] is False and printed["run"]["method"] == "spin"  # defaults
    bad = subprocess.run(
        [sys.executable, "-m", "jobs.spin", "--print-config", "training.lr=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "config error: training.lr" in bad.stderr
