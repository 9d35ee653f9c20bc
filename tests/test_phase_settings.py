"""Per-phase training settings: training.sft / training.preference over training, SPIN's per-iteration lr and β,
and the recipes' numbers as the papers give them."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs.schema import ConfigError, load_config, phase_training, to_dict
from jobs.controller import TRAINING_PHASE
from methods.spin import beta_for, lr_for

ROOT = Path(__file__).resolve().parent.parent


def test_phase_sections_override_only_what_they_set():
    config = load_config(
        ROOT / "configs/spin.yaml",
        [
            "training.lr=1e-5",
            "training.optimizer=adamw",
            "training.sft.lr=2e-5",
            "training.sft.epochs=3",
            "training.sft.schedule=cosine",
            "training.preference.optimizer=rmsprop",
            "training.preference.micro_batch_size=1",
        ],
    )
    sft, preference = phase_training(config, "sft"), phase_training(config, "preference")
    assert (sft["lr"], sft["epochs"], sft["schedule"], sft["optimizer"]) == (2e-5, 3, "cosine", "adamw")
    assert (preference["lr"], preference["epochs"], preference["optimizer"]) == (1e-5, 1, "rmsprop")
    assert preference["micro_batch_size"] == 1 and sft["micro_batch_size"] == config.training.micro_batch_size
    assert "sft" not in sft and "preference" not in preference  # the ranks get resolved values only
    assert phase_training(config, "preference", lr=3e-7)["lr"] == 3e-7
    assert phase_training(config, "preference", lr=None)["lr"] == 1e-5  # no per-iteration value: the phase's


CONFIGS = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if p.name != "gpu-profiles.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_without_phase_sections_train_as_before(path):
    config = load_config(path)
    training = to_dict(config)["training"]
    plain = {k: v for k, v in training.items() if k not in ("sft", "preference")}
    for phase in ("sft", "preference"):
        own = {**training[phase].pop("peft"), **training[phase]}  # a phase's adapter fields count as its own
        if all(v is None for v in own.values()):  # the GPU profiles set preference settings for SPIN
            assert phase_training(config, phase) == plain


def test_a_phase_prompt_longer_than_its_sequences_is_a_config_error():
    with pytest.raises(ConfigError, match=r"training.preference.max_prompt_length: 300 must be in \(0, 256\)"):
        load_config(ROOT / "configs/spin.yaml", ["training.preference.max_prompt_length=300"])
    with pytest.raises(ConfigError, match=r"training.sft.lr: must be > 0"):
        load_config(ROOT / "configs/spin.yaml", ["training.sft.lr=0"])
    with pytest.raises(ConfigError, match=r"spin.lr.1: must be > 0"):
        load_config(ROOT / "configs/spin.yaml", ["spin.lr=[1e-6, -1]"])


def test_training_kinds_map_to_phase_groups():
    assert TRAINING_PHASE == {"sft": "sft", "spin": "preference"}


def test_spin_recipe_iterations_lr_and_beta_as_the_paper():
    c = load_config(ROOT / "configs/recipes/spin.yaml")
    assert c.spin.iterations == 4  # iterations 0, 1, 2, 3
    assert [beta_for(t, c.spin.beta) for t in range(4)] == [0.1, 0.1, 0.1, 5.0]  # 5.0 at iteration 3
    lrs = [phase_training(c, "preference", lr=lr_for(t, c.spin.lr))["lr"] for t in range(4)]
    assert lrs == [5e-7, 5e-7, 1e-7, 1e-7]
    p = phase_training(c, "preference")
    assert (p["optimizer"], p["schedule"], p["warmup_ratio"]) == ("rmsprop", "linear", 0.1)
    assert c.pools.train.replicas * p["micro_batch_size"] * p["grad_accum"] == 64  # global batch in pairs
    assert (p["max_length"], p["max_prompt_length"]) == (1024, 512)
    assert (c.generation.temperature, c.generation.top_p, c.generation.max_tokens) == (1.0, 1.0, 256)
    assert c.spin.mix_previous and c.data.n_train == 50000
    assert c.model.name == "alignment-handbook/zephyr-7b-sft-full"


@pytest.mark.parametrize("profile", ["gpu-1node-8xh100.yaml", "gpu-multinode.yaml"])
def test_gpu_profiles_put_beta_5_at_iteration_3(profile):
    c = load_config(ROOT / "configs" / profile)
    assert [beta_for(t, c.spin.beta) for t in range(c.spin.iterations)] == [0.1, 0.1, 0.1, 5.0]
    assert [lr_for(t, c.spin.lr) for t in range(c.spin.iterations)] == [5e-7, 5e-7, 1e-7, 1e-7]


def test_llm2llm_recipe_students_train_as_the_code():
    c = load_config(ROOT / "configs/recipes/llm2llm.yaml")
    s = phase_training(c, "sft")
    assert (s["lr"], s["schedule"], s["warmup_ratio"], s["epochs"], s["max_length"]) == (2e-5, "cosine", 0.03, 3, 1024)
    assert c.llm2llm.iterations == 10 and c.llm2llm.seed_size == 74  # 1% of GSM8K's 7473 training problems
    assert c.teacher.model != c.model.name and c.pools.teacher.tensor_parallel_size > 1
    assert c.teacher.architecture.parameters > 5 * c.model.architecture.parameters  # a much stronger teacher


def test_lr_for_repeats_the_last_value_and_is_none_without_a_list():
    assert [lr_for(t, [3e-4, 1e-4]) for t in range(4)] == [3e-4, 1e-4, 1e-4, 1e-4]
    assert lr_for(0, []) is None


def test_a_phase_section_sets_or_unsets_lora_adapters():
    c = load_config(
        None,
        [
            "training.peft.enabled=true",
            "training.peft.r=16",
            "training.sft.peft.enabled=false",  # SFT phases: full weights
            "training.preference.peft.r=4",
            "training.preference.peft.target_modules=[q_proj, v_proj]",
        ],
    )
    sft, preference = phase_training(c, "sft")["peft"], phase_training(c, "preference")["peft"]
    assert sft["enabled"] is False and sft["r"] == 16
    assert preference == {
        "enabled": True,
        "r": 4,
        "lora_alpha": 16.0,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": [],
    }
    only_preference = load_config(None, ["training.preference.peft.enabled=true"])  # off by default elsewhere
    assert not phase_training(only_preference, "sft")["peft"]["enabled"]
    assert phase_training(only_preference, "preference")["peft"]["target_modules"] == ["all-linear"]
    for override, message in [
        ("training.sft.peft.target_modules=[all-linear, q_proj]", "training.sft.peft.target_modules: 'all-linear' "),
        ("training.peft.lora_dropout=1", r"training.peft.lora_dropout: must be in \[0, 1\), got 1.0"),
        ("training.preference.peft.r=0", "training.preference.peft.r: must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
