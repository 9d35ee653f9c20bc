"""LoRA adapters (peft) for a training phase: which modules get one, how a rank wraps its model, what it saves.

Design note. A phase with ``training.peft.enabled`` loads its starting model (a plain HF folder, as every phase
does), wraps it with a *fresh* adapter (``get_peft_model``: lora_B starts at zero, so the wrapped model computes
exactly the starting model until the first step), trains only the adapter (and ``modules_to_save``) under
DeepSpeed, and writes two things:

- ``<output>/adapter/``: the adapter as peft saves it (``adapter_config.json`` naming the folder it was trained
  on as ``base_model_name_or_path``, ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained``;
- ``<output>/``: the merged model (``merge_and_unload`` in float32, the precision full fine-tuning saves), a plain
  HF folder: what the generator reloads in place (``actors.engine.VLLMEngine.load_weights``), what evaluation,
  ``serving.app`` and the next phase load. Nothing downstream of a training phase knows adapters exist.

Why a fresh adapter on the merged model, for SPIN too: SPIN's reference is model t, the model the iteration starts
from. Iteration t starts from model t's merged folder with B = 0, so the reference log-probs the rank precomputes
before its first step (``PhaseRunner._reference_logps``, unchanged) are model t's own, adapter included, with no
code that switches adapters on and off; each iteration's update is its own rank-r step away from model t, as a
full-weight iteration is a step away from it. Continuing the previous adapter instead would bound the whole run's
change to one rank-r subspace and make the reference "base + adapter t", a second model to keep apart from the
policy. The cost is a merged folder per phase, which full fine-tuning writes anyway. (The generator could also
serve the adapter itself, vLLM's LoRA path; NOTES.md "LoRA adapters" has why it reloads the merged weights.)

Target modules are matched as peft matches a list: a module whose name is the entry or ends with ``.<entry>``;
``all-linear`` is every linear layer but the output head. ``check_targets`` finds a name no module has before any
Ray work, on a model built from config.json on the meta device (no weights read).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runfolder.lineage import ADAPTER_DIR  # noqa: F401  (<phase model>/adapter: the PEFT folder beside the merged model)


def lora_config(peft: dict[str, Any]):
    """peft's ``LoraConfig`` of a phase's resolved ``training.peft`` settings."""
    from peft import LoraConfig

    targets = peft["target_modules"]
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=peft["r"],
        lora_alpha=peft["lora_alpha"],
        lora_dropout=peft["lora_dropout"],
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        modules_to_save=list(peft["modules_to_save"]) or None,
        bias="none",
    )


def layer_names(model) -> list[str]:
    """The distinct last names of the modules that hold parameters of their own (q_proj, embed_tokens, norm, ...):
    what a target_modules or modules_to_save entry can name."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and list(module.parameters(False))}
    )


def _matches(module_names: list[str], entry: str) -> bool:
    return any(name == entry or name.endswith("." + entry) for name in module_names)


def missing_modules(model, peft: dict[str, Any]) -> dict[str, list[str]]:
    """{field: [entries no module of ``model`` matches]} for target_modules and modules_to_save."""
    names = [name for name, _ in model.named_modules() if name]
    out = {}
    for field in ("target_modules", "modules_to_save"):
        lacking = [e for e in peft[field] if e != "all-linear" and not _matches(names, e)]
        if lacking:
            out[field] = lacking
    return out


def meta_model(model_path: str, trust_remote_code: bool = False):
    """The model of ``model_path``'s config.json on the meta device: its modules, no weights read or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_targets(model_path: str, phases: dict[str, tuple[dict[str, Any], dict[str, str]]], trust: bool) -> None:
    """Raise ValueError naming the config key when a phase's adapter names a module the model lacks, listing the
    model's layer names. ``phases``: {phase: (resolved peft settings, {field: the dotted key it came from})}, only
    phases with adapters on. Also builds each adapter on the meta model, so whatever else peft refuses (a module
    type it cannot wrap) is found here too."""
    if not phases:
        return
    from peft import get_peft_model

    model = meta_model(model_path, trust)
    for phase, (peft, keys) in phases.items():
        for field, lacking in missing_modules(model, peft).items():
            quoted = ", ".join(repr(e) for e in lacking)
            raise ValueError(
                f"{keys[field]}: the model {model_path} has no module {quoted}; its layer names: "
                f"{', '.join(layer_names(model))} (or 'all-linear')"
            )
        try:
            get_peft_model(meta_model(model_path, trust), lora_config(peft))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{keys['target_modules']}: peft cannot build the {phase} adapter: {err}") from None


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of a (possibly ZeRO-3 partitioned) model: each parameter's full size."""
    trainable = total = 0
    for p in model.parameters():
        numel = getattr(p, "ds_numel", p.numel())
        total += numel
        trainable += numel if p.requires_grad else 0
    return trainable, total


def wrap(model, peft: dict[str, Any], gradient_checkpointing: bool):
    """``model`` with a fresh adapter, only the adapter (and modules_to_save) trainable. With gradient
    checkpointing the embedding's output requires grad (``enable_input_require_grads``): with the embedding frozen,
    a checkpointed layer's input would otherwise carry no grad and the adapters inside it would get none."""
    from peft import get_peft_model

    if gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(peft))


def save_adapter(peft_model, state: dict, folder: Path) -> None:
    """Rank 0: the adapter folder from a full state dict of the wrapped model (peft keeps only the adapter's
    tensors), its base the folder the phase started from."""
    peft_model.save_pretrained(str(folder), state_dict=state, safe_serialization=True)


def merge(base_path: str, adapter_dir: Path, out: Path, tokenizer, trust_remote_code: bool = False) -> None:
    """The merged model as a plain HF folder: base weights in float32 plus (lora_alpha / r) * B @ A, then every
    adapter layer unwrapped (``merge_and_unload``). Loaded fresh from the two folders, so each phase's merge also
    proves its adapter loads with ``PeftModel.from_pretrained``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
