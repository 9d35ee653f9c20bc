"""The jobs' command line: --help lists every config key with type, default and doc; --print-config."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import yaml

from configs.schema import JobConfig, describe
from jobs.cli import config_reference, type_name

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


def test_check_data_shows_what_a_job_would_get_and_exits(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
        for i in range(4)
    ]
    rows.append({"messages": [{"role": "human", "content": "hi"}]})
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": "no answer"}) + "\n")

    def check(data: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "jobs.spin", "--check-data", f"data.train={data}", "run.dir=" + str(tmp_path)]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    done = check(tmp_path / "chat.jsonl")
    assert done.returncode == 0, done.stderr
    assert "4 rows kept, 1 malformed (first: line 5: unknown role 'human'" in done.stdout
    assert '"reference": "A' in done.stdout and "overlap: none" in done.stdout
    empty = check(tmp_path / "empty.jsonl")
    assert empty.returncode == 2 and "data error: data.train: 0 usable rows" in empty.stderr
    assert not (tmp_path / "spin").exists()  # nothing was started or written


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
