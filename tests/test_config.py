import subprocess
import sys
from pathlib import Path

import pytest

from configs.schema import ConfigError, load_config

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


@pytest.mark.parametrize(
    "override, key, reason",
    [
        ("training.lr=.inf", "training.lr", "finite"),
        ("training.lr=inf", "training.lr", "expected a number"),
        ("training.lr=.nan", "training.lr", "finite"),
        ("spin.sft_lr=-1", "spin.sft_lr", "must be > 0"),
        ("judge.max_tokens=0", "judge.max_tokens", "must be >= 1"),
        ("training.checkpoint_every=-1", "training.checkpoint_every", "must be >= 0"),
        ("aft.proposal_top_p=2", "aft.proposal_top_p", "(0, 1]"),
        ("spin.beta=[0.1,-5]", "spin.beta.1", "must be > 0"),
        ("cluster.resources={gen_pool: -1}", "cluster.resources.gen_pool", "must be >= 0"),
        ("run.max_failed_fraction=1.5", "run.max_failed_fraction", "[0, 1]"),
        ("training.min_examples=0", "training.min_examples", "must be >= 1"),
        ("engine.batch_timeout_s=-1", "engine.batch_timeout_s", "must be >= 0"),
        ("evaluation.max_tokens=4096", "evaluation.max_tokens", "engine.max_model_len"),
        ("run.id=..", "run.id", "must match"),
        ("run.id=a/b", "run.id", "must match"),
        ("run.id=.hidden", "run.id", "must match"),
    ],
)
def test_impossible_values_name_the_key(override, key, reason):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/spin.yaml", [override])
    assert str(err.value).startswith(key) and reason in str(err.value)


def test_tensor_parallel_larger_than_the_replicas_gpus():
    with pytest.raises(ConfigError, match=r"^pools.judge.tensor_parallel_size: 2 is more than the replica's 1 GPUs"):
        load_config(None, ["pools.judge.num_gpus=1", "pools.judge.tensor_parallel_size=2"])
    assert load_config(None, ["pools.judge.num_gpus=2", "pools.judge.tensor_parallel_size=2"])


def test_every_numeric_field_has_a_documented_range():
    import dataclasses
    import typing

    from configs.schema import JobConfig

    def numeric(hint) -> bool:
        args = typing.get_args(hint)
        return hint in (int, float) or any(numeric(a) for a in args)

    missing = []

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            elif numeric(hints[f.name]) and "bounds" not in f.metadata:
                missing.append(prefix + f.name)

    walk(JobConfig)
    assert missing == []
    from configs.schema import describe

    assert dict((k, d) for k, _, d in describe())["training.lr"].endswith("Range: > 0.")


def test_quoted_strings_stay_strings_and_unquoted_exponents_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('model: {name: "1.10"}\ntraining: {lr: 1e-6}\ndata: {train: "2e5"}\n')
    c = load_config(path, ['tracking.project="1.10"'])  # typed as tracking.project='"1.10"'
    assert c.model.name == "1.10" and c.data.train == "2e5" and c.tracking.project == "1.10"
    assert c.training.lr == 1e-6
    assert load_config(None, ["model.name='1.10'"]).model.name == "1.10"  # the shell's quotes gone, YAML's kept


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("training:\n  lr: 1.0e-5\n  epochs: 2\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"^lr: duplicate key \(line 4 of .*dup.yaml\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="duplicate key"):
        load_config(None, ["pools.generator={replicas: 1, replicas: 2}"])
