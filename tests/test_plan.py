"""--plan: every recipe in configs/recipes/ places its pools and fits in GPU memory by the estimate, offline; one
that does not fit is refused with the reason (exit 2). The estimator's numbers against hand-computed ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.plan import (
    GIB,
    PlanError,
    architecture_from_hf,
    architecture_from_section,
    make_plan,
    model_architecture,
    training_estimate,
    vllm_estimate,
)
from configs.schema import ArchitectureConfig, load_config, phase_training

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "configs/recipes").glob("*.yaml") if "-" not in p.stem)  # one per method
LORA_RECIPE = ROOT / "configs/recipes/spin-lora.yaml"  # a variant: <method>-<variant>.yaml
# Mistral-7B (zephyr-7b-sft-full), as its config.json states it.
MISTRAL = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "vocab_size": 32000,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}


def recipe(path: Path, *overrides: str):
    return load_config(path, [f"run.method={path.stem}", *overrides])  # what jobs.<method> does


def test_there_is_one_recipe_per_method():
    assert [p.stem for p in RECIPES] == ["aft", "llm2llm", "s3ft", "spin"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_plans_and_fits(path):
    assert path.read_text().startswith("# cluster:"), "first line names the cluster shape the recipe needs"
    config = recipe(path)
    plan = make_plan(config)
    assert plan.fits, plan.text()
    text = plan.text()
    for group in config.cluster.node_groups:
        assert f"node group '{group.name}'" in text
    for role in ("generator", "train"):
        assert f"  {role}: " in text
    assert "ZeRO-3 over 8 ranks" in text and "KV cache holds" in text
    assert "from model.architecture" in text  # offline: the recipe's stated shape, no download


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_on_gpus_in_bf16(path):
    config = recipe(path)
    assert config.training.deepspeed.bf16 is True and config.training.deepspeed.zero_stage == 3
    assert config.engine.backend == "vllm" and config.engine.dtype == "bfloat16"
    assert all(getattr(config.pools, role).num_gpus >= 1 for role in ("generator", "train"))


def test_cli_plan_exits_0_when_it_fits_and_2_with_the_reason_when_not():
    cmd = [sys.executable, "-m", "jobs.spin", "--config", "configs/recipes/spin.yaml", "--plan"]
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "plan: fits" in ok.stdout and "preference phase" in ok.stdout
    # 64 pairs of 1024 tokens per rank without checkpointing: far more activations than an 80 GiB GPU holds.
    big = cmd + ["training.micro_batch_size=64", "training.gradient_checkpointing=false"]
    refused = subprocess.run(big, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "plan refused: pools.train on 'train': needs" in refused.stderr and "80 GiB" in refused.stderr


def test_a_pool_no_node_can_host_is_refused():
    config = recipe(
        ROOT / "configs/recipes/llm2llm.yaml", "pools.teacher.tensor_parallel_size=16", "pools.teacher.num_gpus=16"
    )
    plan = make_plan(config)
    assert not plan.fits and "tensor_parallel_size 16 exceeds the GPUs of every matching node" in plan.problems[0]


def test_a_teacher_too_big_for_its_gpus_is_refused():
    config = recipe(
        ROOT / "configs/recipes/llm2llm.yaml", "pools.teacher.tensor_parallel_size=1", "pools.teacher.num_gpus=1"
    )
    plan = make_plan(config)
    assert not plan.fits
    assert any("pools.teacher" in p and "KV cache" in p for p in plan.problems), plan.problems


def test_no_cluster_shape_or_unknown_model_is_a_plan_error():
    with pytest.raises(PlanError, match="cluster.node_groups"):
        make_plan(load_config(ROOT / "configs/spin.yaml"))
    stated_nothing = ["model.architecture.layers=0", "model.name=nobody/not-downloaded-7b"]
    with pytest.raises(PlanError, match="model.architecture"):
        make_plan(recipe(ROOT / "configs/recipes/spin.yaml", *stated_nothing))


def test_config_json_on_disk_wins_over_the_stated_numbers(tiny_model):
    stated = ArchitectureConfig(layers=99, hidden_size=1, intermediate_size=1, vocab_size=1, attention_heads=1)
    arch = model_architecture(tiny_model, ".cache/models", stated, "model.architecture")
    expected = json.loads((Path(tiny_model) / "config.json").read_text())
    assert arch.layers == expected["num_hidden_layers"] != 99 and "config.json" in arch.source
    assert arch.parameters == meta_count(Path(tiny_model))  # transformers' own count, not the stated numbers


def test_parameter_count_from_the_shapes_matches_the_published_ones():
    # Mistral-7B: 7.24B; Llama-3.1-8B: 8.03B (same layout, 128256-token vocabulary).
    assert architecture_from_hf(MISTRAL, "x").parameters == pytest.approx(7.24e9, rel=0.002)
    llama = {**MISTRAL, "vocab_size": 128256}
    assert architecture_from_hf(llama, "x").parameters == pytest.approx(8.03e9, rel=0.002)
    stated = ArchitectureConfig(
        parameters=7.0e9, layers=32, hidden_size=4096, intermediate_size=14336, vocab_size=32000, attention_heads=32
    )
    arch = architecture_from_section(stated, "model.architecture")
    assert arch.parameters == 7.0e9 and arch.kv_heads == 32  # kv heads default to the attention heads


def test_zero3_state_and_activations_by_hand():
    arch = architecture_from_hf(MISTRAL, "x")
    config = load_config(ROOT / "configs/recipes/spin.yaml")
    settings = phase_training(config, "preference")
    settings.update(micro_batch_size=1, gradient_checkpointing=False, max_tokens_per_batch=0)
    est = dict(training_estimate(arch, settings, 8, "preference", 80 * GIB).items)
    p = arch.parameters
    assert est["parameters"] == est["gradients"] == pytest.approx(2 * p / 8)
    assert est["fp32 master"] == pytest.approx(4 * p / 8) and est["rmsprop state"] == pytest.approx(4 * p / 8)
    assert est["gathered parameters"] == 2 * 1e9 and est["reduce bucket"] == 2 * 5e8  # DeepSpeed's defaults
    tokens = 2 * 1024  # one pair: chosen and rejected, each up to max_length
    per_layer = 2 * (5 * 4096 + 3 * 1024 + 4 * 14336) + 8 * 4096
    assert est["activations"] == pytest.approx(tokens * 32 * per_layer)
    assert est["logits"] == pytest.approx(tokens * 32000 * 10)
    adamw = dict(training_estimate(arch, {**settings, "optimizer": "adamw"}, 8, "preference", 80 * GIB).items)
    assert adamw["adamw state"] == pytest.approx(2 * est["rmsprop state"])  # two moments, not one
    checkpointed = dict(
        training_estimate(arch, {**settings, "gradient_checkpointing": True}, 8, "preference", 80 * GIB).items
    )
    assert checkpointed["activations"] == pytest.approx(tokens * (32 * 2 * 4096 + per_layer))
    sft = dict(training_estimate(arch, settings, 8, "sft", 80 * GIB).items)
    assert sft["activations"] == pytest.approx(est["activations"] / 2)  # a sequence, not a pair


def test_vllm_kv_cache_by_hand():
    arch = architecture_from_hf(MISTRAL, "x")
    config = load_config(ROOT / "configs/recipes/spin.yaml")
    est = vllm_estimate(arch, config, config.pools.generator, 80 * GIB)
    items = dict(est.items)
    assert items["weights"] == pytest.approx(2 * arch.parameters)
    assert est.total == pytest.approx(0.85 * 80 * GIB)  # vLLM takes gpu_memory_utilization of the GPU
    kv_per_token = 2 * 32 * 8 * 128 * 2  # K and V, layers, kv heads, head dim, bf16
    length = config.engine.max_model_len
    assert f"holds {int(items['KV cache'] // (kv_per_token * length))} sequences of {length} tokens" in est.notes[0]


@pytest.mark.parametrize("method", ["spin", "s3ft", "llm2llm", "aft"])
@pytest.mark.parametrize("profile", ["gpu-1node-8xh100.yaml", "gpu-multinode.yaml"])
def test_gpu_profiles_plan_and_fit_every_method(profile, method):
    config = load_config(ROOT / "configs" / profile, [f"run.method={method}"])
    plan = make_plan(config)
    assert plan.fits, plan.text()
    # The shape --plan reads is the one configs/gpu-profiles.yaml declares for the placement test.
    from cluster.placement_check import load_profiles

    declared = load_profiles(ROOT / "configs/gpu-profiles.yaml")[profile]
    shape = [(g.name, g.count, g.gpus_per_node, g.cpus_per_node, dict(g.labels)) for g in config.cluster.node_groups]
    assert shape == [(g.name, g.count, g.gpus_per_node, g.cpus_per_node, dict(g.labels)) for g in declared]


# Qwen3-0.6B's config.json: head_dim 128 while hidden / heads is 64; tied embeddings.
QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": True,
}
# Mixtral-8x7B's: 8 experts of Mistral-7B's MLP per layer, 2 per token.
MIXTRAL = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    **MISTRAL,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}


def meta_count(folder: Path) -> int:
    """transformers' own parameter count of the model a config.json describes, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    return model.num_parameters()


@pytest.mark.parametrize(
    ("name", "config", "published"),
    [("qwen3", QWEN3, 0.596e9), ("mixtral", MIXTRAL, 46.7e9)],
    ids=["qwen3", "mixtral"],
)
def test_plan_takes_exact_counts_and_shapes_from_config_json(tmp_path, name, config, published):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    arch = model_architecture(str(folder), str(tmp_path / "cache"), ArchitectureConfig(), "model.architecture")
    assert arch.parameters == meta_count(folder) == pytest.approx(published, rel=0.003)
    assert "transformers on meta" in arch.source
    if name == "qwen3":
        assert arch.head_dim == 128 != 1024 // 16 and arch.kv_dim == 8 * 128  # the KV cache follows head_dim
        plan = make_plan(recipe(ROOT / "configs/recipes/s3ft.yaml", f"model.name={folder}"))
        assert plan.fits and f"{folder} (0.60B parameters, from {folder}/config.json" in plan.text()
    else:
        # weights: every expert; activations and the vLLM forward pass: the 2 experts a token goes through
        assert arch.experts == 8 and arch.mlp_width == 2 * 14336
        dense = architecture_from_hf(MISTRAL, "x")
        assert arch.parameters > 6 * dense.parameters  # the count that ignored experts gave about a sixth
    # the numbers alone (no transformers class for the architecture) count the same layout within 0.1%
    assert architecture_from_hf(config, "x").parameters == pytest.approx(arch.parameters, rel=0.001)


def test_an_architecture_transformers_lacks_is_counted_from_its_numbers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3, "model_type": "not-in-transformers"}))
    arch = model_architecture(str(tmp_path), str(tmp_path / "cache"), ArchitectureConfig(), "model.architecture")
    assert "counted from its numbers" in arch.source and arch.head_dim == 128
    assert arch.parameters == pytest.approx(0.596e9, rel=0.003)


def test_recipe_numbers_carry_head_dim_and_experts():
    stated = ArchitectureConfig(
        layers=32,
        hidden_size=4096,
        intermediate_size=14336,
        vocab_size=32000,
        attention_heads=32,
        kv_heads=8,
        experts=8,
        experts_per_token=2,
    )
    arch = architecture_from_section(stated, "model.architecture")
    assert arch.parameters == pytest.approx(46.7e9, rel=0.003) and arch.mlp_width == 2 * 14336
    gemma2 = ArchitectureConfig(
        layers=26,
        hidden_size=2304,
        intermediate_size=9216,
        vocab_size=256000,
        attention_heads=8,
        kv_heads=4,
        head_dim=256,
        tie_word_embeddings=True,
    )
    assert architecture_from_section(gemma2, "model.architecture").kv_dim == 4 * 256  # not 2304 / 8 = 288


def test_a_7b_lora_recipe_plans_onto_one_gpu_node_where_full_weights_do_not_fit():
    config = load_config(LORA_RECIPE)
    assert LORA_RECIPE.read_text().startswith("# cluster:") and config.training.peft.enabled
    plan = make_plan(config)
    assert plan.fits, plan.text()
    (gpu_group,) = [g for g in config.cluster.node_groups if g.gpus_per_node]  # one GPU node hosts every pool
    text = plan.text()
    assert f"node group '{gpu_group.name}': 1 x (8 GPU" in text and "LoRA r=16: 41.9M trainable parameters" in text
    full = make_plan(load_config(LORA_RECIPE, ["training.peft.enabled=false"]))
    assert not full.fits and "pools.train on 'gpu': needs" in full.problems[0]


def test_lora_adapter_memory_by_hand_and_its_parameters_as_peft_counts_them():
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, MistralConfig

    from cluster.plan import adapter_parameters
    from training.adapters import lora_config

    arch = architecture_from_hf(MISTRAL, "x")
    settings = phase_training(load_config(LORA_RECIPE), "preference")
    peft = settings["peft"]
    adapter, _, unknown = adapter_parameters(arch, peft)
    config = MistralConfig(**{k: v for k, v in MISTRAL.items() if k != "tie_word_embeddings"})
    with torch.device("meta"):  # Mistral-7B's modules, no memory: peft's own count of the same adapter
        model = get_peft_model(AutoModelForCausalLM.from_config(config), lora_config(peft))
    assert adapter == model.get_nb_trainable_parameters()[0] == 32 * 16 * 81920 and not unknown
    two_modules = adapter_parameters(arch, {**peft, "target_modules": ["q_proj", "v_proj"]})[0]
    assert two_modules == 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    settings.update(micro_batch_size=1, gradient_checkpointing=False, max_tokens_per_batch=0)
    for stage, world in ((3, 4), (2, 2)):
        ds = {**settings["deepspeed"], "zero_stage": stage}
        est = dict(training_estimate(arch, {**settings, "deepspeed": ds}, world, "preference", 80 * GIB).items)
        p = arch.parameters
        assert est["frozen base"] == pytest.approx(2 * p / (world if stage == 3 else 1))
        assert est["adapter"] == pytest.approx(2 * adapter / (world if stage == 3 else 1))
        assert est["gradients"] == pytest.approx(2 * adapter / world)  # only the adapter's
        assert est["fp32 master"] == est["rmsprop state"] == pytest.approx(4 * adapter / world)
        assert est["reduce bucket"] == pytest.approx(2 * adapter)  # at most the adapter's gradients
        full_layer = 2 * (5 * 4096 + 3 * 1024 + 4 * 14336) + 8 * 4096
        dropout_copies = 32 * (6 * 4096 + 14336)  # lora_dropout: every adapted layer's input, per token
        assert est["activations"] == pytest.approx(2 * 1024 * (32 * full_layer + 2 * dropout_copies))
