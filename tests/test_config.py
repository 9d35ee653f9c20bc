import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_yaml_and_dotted_overrides():
    c = load_config(ROOT / "configs/spin.yaml", ["training.lr=1e-6", "pools.generator.replicas=2", "spin.beta=[0.1,5]"])
    assert c.training.lr == 1e-6 and isinstance(c.training.lr, float)
    assert c.pools.generator.replicas == 2
    assert c.spin.beta == [0.1, 5.0]
    assert c.model.name == "smollm2-135m-instruct"  # from the file
    assert c.run_dir == Path("runs/spin/demo")


def test_partial_section_keeps_section_defaults():
    c = load_config(None, ["evaluation.n=1"])
    assert c.evaluation.temperature == 0.0  # the section's own default (greedy), not SamplingConfig's 1.0


@pytest.mark.parametrize(
    "override, key, reason",
    [
        ("no_such_section.lr=1", "no_such_section", "unknown key"),
        ("training.no_such_key=1", "training.no_such_key", "unknown key"),
        ("training.lr=fast", "training.lr", "expected a number"),
        ("training.epochs=1.5", "training.epochs", "expected an integer"),
        ("training.lr=-1", "training.lr", "must be > 0"),
        ("generation.top_p=1.5", "generation.top_p", "(0, 1]"),
        ("pools.train.replicas=0", "pools.train.replicas", ">= 1"),
        ("engine.backend=tgi", "engine.backend", "not one of"),
        ("training.allocator=tcmalloc", "training.allocator", "not one of"),
        ("training.max_prompt_length=9999", "training.max_prompt_length", "training.max_length"),
    ],
)
def test_bad_values_name_the_key(override, key, reason):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/spin.yaml", [override])
    assert str(err.value).startswith(key) and reason in str(err.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_cli_fails_fast_before_any_work(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.smoke",
            "--config",
            "configs/smoke.yaml",
            "no_such_section.lr=1",
            f"run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no_such_section" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name == "gpu-profiles.yaml":
            continue
        load_config(path)
