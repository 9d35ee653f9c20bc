"""``--plan``: where a config's pools go on the cluster it declares, and what each GPU must hold. Pure, offline.

``python -m jobs.<method> --config <recipe> --plan`` places every pool the method uses on ``cluster.node_groups``
(``cluster.placement_check``: first fit, label selectors, tensor parallelism), estimates each GPU's memory, prints
both per node group and exits: 0 when everything fits, 2 with the reasons when something does not. Nothing is
started, downloaded or loaded: a model's shape comes from its ``config.json`` when that is on disk (a local folder
or the hub cache under ``model.cache_dir``), its parameter count from transformers building that config on the
meta device (exact for any architecture it has: head_dim as stated, tied embeddings, every expert of a mixture of
experts), else from the config's ``<role>.architecture`` numbers.

Memory model, per GPU (B = bytes of a bf16/fp16 value, 2; fp32 runs use 4):

- Training, DeepSpeed ZeRO-3 over W ranks (ZeRO paper, Rajbhandari et al. 2020): parameters B·P/W, gradients
  B·P/W, fp32 master weights 4·P/W (mixed precision only), optimizer state 8·P/W for AdamW (two moments) or
  4·P/W for RMSprop (one), moved to CPU memory by ``deepspeed.offload_optimizer``. Stages 2/1/0 keep parameters
  (and gradients, stage 1/0) whole on every rank. DeepSpeed's communication buffers at its defaults, which
  ``training/worker.deepspeed_config`` leaves alone: ZeRO-3 keeps up to ``stage3_max_live_parameters`` (1e9)
  gathered parameters, and gradients wait in a ``reduce_bucket_size`` (5e8) bucket (stages 1-2 also gather
  parameters through an ``allgather_bucket_size`` (5e8) bucket); each at most P values of B bytes.
- Activations kept for backward, per token per layer, with SDPA / flash attention (no seq x seq scores kept):
  B·(2h + 3q + 3·kv + 4·I) for the norm inputs/outputs, q/k/v and rotated q/k, attention output, and the SwiGLU
  gate, up, activation and product, plus 2 x 4·h for the RMSNorms' fp32 copies (h hidden, q = heads x head_dim,
  kv = kv heads x head_dim, I the MLP width a token passes through: intermediate size x experts per token in a
  mixture of experts, whose weights count every expert). With ``training.gradient_checkpointing`` only each
  layer's input (B·h) is kept, plus one layer's activations while it is recomputed. Tokens per micro step =
  micro_batch_size x max_length, doubled for preference phases (a pair is two sequences), capped by
  ``max_tokens_per_batch``: the worst case, every sequence padded to max_length.
- Logits of the micro step: tokens x vocab x (B + 4 + 4): the logits, their fp32 copy and the log-softmax.
- LoRA (``training.peft``): the base parameters are frozen, B·P/W under ZeRO-3 and B·P whole below it, with no
  gradient, master weight or optimizer state; the adapter's A parameters (r x (in + out) per adapted linear layer,
  ``adapter_parameters``; a modules_to_save entry adds its module in full) carry all of those, as above. The
  gradient buckets hold at most A values. Activations as for full weights (backward still runs through every
  frozen layer to reach the adapters below it), plus, with lora_dropout, the dropped copy of each adapted layer's
  input per token (B x its input width; one layer's worth under gradient checkpointing).
- Plus 1.5 GiB for the CUDA context and NCCL, and 10% for allocator fragmentation.
- vLLM, per GPU of a replica with tensor parallelism T: weights B·P/T; a forward pass over the batched tokens
  (max(8192, max_model_len)) of B·(2·I + 4·h)/T per token (I as above), sampler logits max_num_seqs x vocab x 4,
  and 1.5 GiB of CUDA context and graphs. vLLM takes ``gpu_memory_utilization`` of the GPU and gives the rest of
  that to the KV cache: 2 (K and V) x layers x max(1, kv_heads / T) x head_dim x B per token. A replica whose KV
  cache cannot hold one ``engine.max_model_len`` sequence does not start, and the plan refuses it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cluster.placement_check import NodeGroup, check_fit
from configs.schema import ArchitectureConfig, JobConfig, PoolConfig, phase_training

GIB = 2**30
CUDA_CONTEXT = 1.5 * GIB
FRAGMENTATION = 0.10
VLLM_MIN_BATCHED_TOKENS = 8192
MAX_LIVE_PARAMETERS = 1e9  # DeepSpeed's stage3_max_live_parameters default
BUCKET_SIZE = 5e8  # DeepSpeed's reduce_bucket_size and allgather_bucket_size defaults

# The pools each job places (the judge counted where evaluation may need the LLM judge).
METHOD_POOLS = {
    "spin": ("generator", "judge", "train"),
    "s3ft": ("generator", "judge", "train"),
    "llm2llm": ("generator", "judge", "teacher", "train"),
    "aft": ("generator", "judge", "train"),
    "smoke": ("generator", "judge", "teacher", "train"),
    "bench": ("generator", "judge", "teacher", "train"),
}


class PlanError(ValueError):
    """The plan cannot be made: no cluster shape, or a model whose shape is unknown."""


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden_size: int
    intermediate_size: int  # one MLP's (one expert's, in a mixture of experts)
    vocab_size: int
    attention_heads: int
    kv_heads: int
    tie_word_embeddings: bool
    stated_parameters: float
    source: str
    stated_head_dim: int = 0  # config.json's head_dim (Qwen3, Gemma 2: not hidden / heads); 0: hidden / heads
    experts: int = 0  # mixture of experts: MLPs per layer (0: dense)
    experts_per_token: int = 0  # of which each token passes through
    shared_intermediate_size: int = 0  # an always-on shared expert's MLP (Qwen2-MoE), 0: none

    @property
    def head_dim(self) -> int:
        return self.stated_head_dim or self.hidden_size // self.attention_heads

    @property
    def q_dim(self) -> int:
        return self.attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def mlp_width(self) -> int:
        """MLP width one token passes through: its experts' (and a shared expert's) in a mixture of experts."""
        return self.intermediate_size * max(self.experts_per_token, 1) + self.shared_intermediate_size

    @property
    def layer_parameters(self) -> int:
        h, q = self.hidden_size, self.q_dim
        attention = h * q + 2 * h * self.kv_dim + q * h
        mlps = max(self.experts, 1) * 3 * h * self.intermediate_size + 3 * h * self.shared_intermediate_size
        router = h * self.experts
        return attention + mlps + router + 2 * h

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def parameters(self) -> float:
        """The stated count (exact: transformers' own on the meta device, when config.json is on disk), else
        counted from the shapes (Llama / Mistral / Qwen / Mixtral layout, biases and extra norms left out)."""
        if self.stated_parameters:
            return self.stated_parameters
        heads = 1 if self.tie_word_embeddings else 2
        return self.layers * self.layer_parameters + heads * self.embedding_parameters + self.hidden_size


def _first(config: dict, *names: str) -> int:
    return next((int(config[n]) for n in names if config.get(n)), 0)


def architecture_from_hf(config: dict, source: str) -> Architecture:
    """The numbers the estimate needs from a transformers ``config.json``: head_dim as the config states it, and a
    mixture of experts' expert count, experts per token and expert MLP width (Mixtral, Qwen-MoE, DeepSeek names)."""
    text = config.get("text_config") or config  # multimodal wrappers keep the language model's numbers inside
    heads = int(text["num_attention_heads"])
    experts = _first(text, "num_local_experts", "num_experts", "n_routed_experts")
    expert_width = _first(text, "moe_intermediate_size") if experts else 0
    return Architecture(
        layers=int(text["num_hidden_layers"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=expert_width or int(text["intermediate_size"]),
        vocab_size=int(text["vocab_size"]),
        attention_heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        stated_parameters=0.0,
        source=source,
        stated_head_dim=_first(text, "head_dim"),
        experts=experts,
        experts_per_token=_first(text, "num_experts_per_tok") if experts else 0,
        shared_intermediate_size=_first(text, "shared_expert_intermediate_size") if experts else 0,
    )


def counted_parameters(folder: Path) -> int | None:
    """The parameter count transformers gives the model of ``folder``'s config.json, built on the meta device (no
    memory, no download, no weights read): exact for any architecture transformers knows, tied embeddings counted
    once, every expert of a mixture of experts counted. None when transformers cannot build it (an architecture it
    does not have, or one that needs the repo's own code)."""
    import logging

    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        logging.getLogger("transformers").setLevel(logging.ERROR)
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - any failure means: count from the numbers instead
        return None


def architecture_from_section(section: ArchitectureConfig, key: str) -> Architecture | None:
    needed = ("layers", "hidden_size", "intermediate_size", "vocab_size", "attention_heads")
    if not all(getattr(section, name) for name in needed):
        return None
    return Architecture(
        layers=section.layers,
        hidden_size=section.hidden_size,
        intermediate_size=section.intermediate_size,
        vocab_size=section.vocab_size,
        attention_heads=section.attention_heads,
        kv_heads=section.kv_heads or section.attention_heads,
        tie_word_embeddings=section.tie_word_embeddings,
        stated_parameters=section.parameters,
        source=key,
        stated_head_dim=section.head_dim,
        experts=section.experts,
        experts_per_token=section.experts_per_token,
    )


def find_config_json(ref: str, cache_dir: str | None) -> Path | None:
    """``config.json`` of a model reference without building or downloading anything: a local folder, a built-in
    model already built (cluster.models.built_models), or a hub id already in the hub cache (model.cache_dir, else
    Hugging Face's own: cluster.models.hub_cache)."""
    from cluster.models import built_models, hub_cache

    local = Path(ref).expanduser()
    for folder in (local, built_models(cache_dir) / ref):
        if (folder / "config.json").is_file():
            return folder / "config.json"
    repo, _, revision = ref.partition("@")
    cached = hub_cache(cache_dir) / f"models--{repo.replace('/', '--')}"
    if revision and (cached / "snapshots" / revision / "config.json").is_file():
        return cached / "snapshots" / revision / "config.json"
    ref_file = cached / "refs" / (revision or "main")
    if ref_file.is_file() and (cached / "snapshots" / ref_file.read_text().strip() / "config.json").is_file():
        return cached / "snapshots" / ref_file.read_text().strip() / "config.json"
    found = sorted((cached / "snapshots").glob("*/config.json")) if cached.is_dir() else []
    return found[0] if found else None


def model_architecture(ref: str, cache_dir: str | None, stated: ArchitectureConfig, key: str) -> Architecture:
    """config.json when it is on disk (its numbers, and the exact parameter count transformers gives it on the meta
    device), else the config's stated ``<key>``; neither: PlanError."""
    path = find_config_json(ref, cache_dir)
    if path is not None:
        arch = architecture_from_hf(json.loads(path.read_text()), str(path))
        count = counted_parameters(path.parent)
        if count is None:
            return replace(arch, source=f"{path}, parameters counted from its numbers")
        return replace(arch, stated_parameters=float(count), source=f"{path}, parameters by transformers on meta")
    found = architecture_from_section(stated, key)
    if found is None:
        raise PlanError(
            f"{key}: the config.json of {ref!r} is not on disk (a local folder or the hub cache), so state the model's "
            f"shape in {key} (layers, hidden_size, intermediate_size, vocab_size, attention_heads, kv_heads)"
        )
    return found


# ---------------------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------------------


@dataclass
class GpuEstimate:
    """What one GPU of a pool's replica holds, item by item (bytes), against what it has."""

    title: str
    items: list[tuple[str, float]]
    capacity: float
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(v for _, v in self.items)

    def lines(self) -> list[str]:
        parts = " + ".join(f"{label} {value / GIB:.1f}" for label, value in self.items)
        status = "ok" if not self.problems else "DOES NOT FIT"
        out = [f"{self.title}: {parts} = {self.total / GIB:.1f} GiB of {self.capacity / GIB:.0f} GiB [{status}]"]
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  problem: {p}" for p in self.problems]
        return out


def _value_bytes(bf16: bool | str) -> int:
    return 2 if bf16 not in (False, "false", "off", None) else 4


# The linear layers of one transformer layer (Llama / Mistral / Qwen / Mixtral names): (input, output width, copies)
def _linear_layers(arch: Architecture) -> dict[str, tuple[int, int, int]]:
    h, q, kv, inter, experts = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size, max(arch.experts, 1)
    layers = {"q_proj": (h, q, 1), "k_proj": (h, kv, 1), "v_proj": (h, kv, 1), "o_proj": (q, h, 1)}
    layers |= {"gate_proj": (h, inter, experts), "up_proj": (h, inter, experts), "down_proj": (inter, h, experts)}
    return layers


def adapter_parameters(arch: Architecture, peft: dict) -> tuple[float, float, list[str]]:
    """(adapter parameters, input width summed over the adapted layers of one transformer layer, target names the
    estimate does not know): r x (in + out) per adapted linear layer, every layer of the model; modules_to_save
    lm_head / embed_tokens add vocab x hidden each."""
    layers = _linear_layers(arch)
    targets = list(layers) if peft["target_modules"] == ["all-linear"] else peft["target_modules"]
    known = [t for t in targets if t in layers]
    per_layer = sum(peft["r"] * (layers[t][0] + layers[t][1]) * layers[t][2] for t in known)
    inputs = sum(layers[t][0] * layers[t][2] for t in known)
    saved = sum(arch.embedding_parameters for m in peft["modules_to_save"] if m in ("lm_head", "embed_tokens"))
    unknown = [t for t in targets if t not in layers] + [
        m for m in peft["modules_to_save"] if m not in ("lm_head", "embed_tokens")
    ]
    return arch.layers * per_layer + saved, float(arch.layers * inputs), unknown


def training_estimate(arch: Architecture, settings: dict, world_size: int, phase: str, gpu_bytes: float) -> GpuEstimate:
    """One rank's GPU in a training phase with the resolved ``settings`` (``phase_training``)."""
    ds = settings["deepspeed"]
    b = _value_bytes(ds["bf16"])
    stage = int(ds["zero_stage"])
    p = arch.parameters
    peft = settings.get("peft") or {}
    lora = bool(peft.get("enabled"))
    notes = []
    if lora:  # frozen base: only its weights; the adapter (trainable) carries gradients and optimizer state
        trained, adapted_inputs, unknown = adapter_parameters(arch, peft)
        notes.append(f"LoRA r={peft['r']}: {trained / 1e6:.1f}M trainable parameters of {(p + trained) / 1e9:.2f}B")
        if unknown:
            notes.append(f"not counted (names the estimate does not know): {', '.join(unknown)}")
    else:
        trained = p
    state_split = world_size if stage >= 1 else 1
    optimizer_per_param = 8 if settings["optimizer"] == "adamw" else 4
    items = [("frozen base" if lora else "parameters", b * p / (world_size if stage == 3 else 1))]
    if lora:
        items.append(("adapter", b * trained / (world_size if stage == 3 else 1)))
    items.append(("gradients", b * trained / (world_size if stage >= 2 else 1)))
    offloaded = bool(ds.get("offload_optimizer"))
    states = ([("fp32 master", 4 * trained / state_split)] if b == 2 else []) + [
        (f"{settings['optimizer']} state", optimizer_per_param * trained / state_split)
    ]
    if offloaded:
        notes.append(f"optimizer on CPU: {sum(v for _, v in states) / GIB:.1f} GiB of host memory per rank")
    else:
        items += states
    if stage == 3:
        items.append(("gathered parameters", b * min(p, MAX_LIVE_PARAMETERS)))
    elif stage >= 1:
        items.append(("allgather bucket", b * min(trained, BUCKET_SIZE)))
    items.append(("reduce bucket", b * min(trained, BUCKET_SIZE)))
    per_item = settings["max_length"] * (2 if phase == "preference" else 1)
    tokens = settings["micro_batch_size"] * per_item
    if settings.get("max_tokens_per_batch"):
        tokens = max(per_item, min(tokens, settings["max_tokens_per_batch"]))
    h, inter = arch.hidden_size, arch.mlp_width
    full_layer = b * (2 * h + 3 * arch.q_dim + 3 * arch.kv_dim + 4 * inter) + 2 * 4 * h
    if settings.get("gradient_checkpointing"):
        activations = tokens * (arch.layers * b * h + full_layer)
    else:
        activations = tokens * arch.layers * full_layer
    if lora and peft.get("lora_dropout"):  # kept for every layer, or for the one being recomputed
        activations += tokens * b * adapted_inputs / (arch.layers if settings.get("gradient_checkpointing") else 1)
    items.append(("activations", activations))
    items.append(("logits", tokens * arch.vocab_size * (b + 4 + 4)))
    items.append(("CUDA context", CUDA_CONTEXT))
    items.append(("fragmentation", FRAGMENTATION * sum(v for _, v in items)))
    unit = "pairs" if phase == "preference" else "sequences"
    title = (
        f"{phase} phase, ZeRO-{stage} over {world_size} ranks, micro-batch {settings['micro_batch_size']} {unit} x "
        f"{settings['max_length']} tokens{', gradient checkpointing' if settings.get('gradient_checkpointing') else ''}"
        f"{', LoRA' if lora else ''}"
    )
    estimate = GpuEstimate(title, items, gpu_bytes, notes)
    if estimate.total > gpu_bytes:
        estimate.problems.append(
            f"needs {estimate.total / GIB:.1f} GiB per GPU, more than the {gpu_bytes / GIB:.0f} GiB there are "
            "(lower training.micro_batch_size and raise grad_accum, turn on training.gradient_checkpointing, "
            "add ranks, or offload the optimizer)"
        )
    return estimate


def vllm_estimate(arch: Architecture, config: JobConfig, pool: PoolConfig, gpu_bytes: float) -> GpuEstimate:
    """One GPU of a vLLM replica of ``pool`` (tensor parallelism T = pool.tensor_parallel_size)."""
    e = config.engine
    b = 4 if e.dtype == "float32" else 2
    tp = pool.tensor_parallel_size
    weights = b * arch.parameters / tp
    batched = max(VLLM_MIN_BATCHED_TOKENS, e.max_model_len)
    forward = batched * b * (2 * arch.mlp_width + 4 * arch.hidden_size) / tp
    sampler = e.max_num_seqs * arch.vocab_size * 4
    kv_per_token = 2 * arch.layers * max(1.0, arch.kv_heads / tp) * arch.head_dim * b
    usable = e.gpu_memory_utilization * gpu_bytes
    kv_cache = usable - weights - forward - sampler - CUDA_CONTEXT
    items = [("weights", weights), ("forward pass", forward + sampler), ("CUDA context", CUDA_CONTEXT)]
    items.append(("KV cache", max(kv_cache, 0.0)))
    title = f"vLLM TP {tp}, max_model_len {e.max_model_len}, gpu_memory_utilization {e.gpu_memory_utilization:g}"
    estimate = GpuEstimate(title, items, gpu_bytes)
    share = pool.num_gpus / tp  # a replica with less than a GPU per shard shares it with another replica
    full_length = kv_per_token * e.max_model_len
    if share < 1 and e.gpu_memory_utilization > share:
        estimate.problems.append(
            f"{pool.num_gpus:g} GPUs per replica for TP {tp}: replicas share a GPU, but each takes "
            f"engine.gpu_memory_utilization={e.gpu_memory_utilization:g} of it"
        )
    if kv_cache < full_length:
        estimate.problems.append(
            f"weights and forward pass leave {max(kv_cache, 0) / GIB:.1f} GiB for the KV cache, less than one "
            f"{e.max_model_len}-token sequence needs ({full_length / GIB:.2f} GiB): raise tensor_parallel_size or "
            "gpu_memory_utilization, or lower engine.max_model_len"
        )
    else:
        sequences = int(kv_cache // full_length)
        estimate.notes.append(
            f"KV cache holds {sequences} sequences of {e.max_model_len} tokens "
            f"({kv_cache / kv_per_token / 1e3:.0f}k tokens; engine.max_num_seqs {e.max_num_seqs})"
        )
    return estimate


# ---------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------


def role_model(config: JobConfig, role: str) -> tuple[str, ArchitectureConfig, str]:
    """(model reference, stated architecture, its key) of the model a pool serves or trains."""
    own = {"judge": config.judge, "teacher": config.teacher}.get(role)
    if own is not None and own.model is not None:
        return own.model, own.architecture, f"{role}.architecture"
    return config.model.name, config.model.architecture, "model.architecture"


def training_phases(config: JobConfig) -> list[str]:
    """The phase groups a method trains with (SPIN: its SFT start, if any, and its preference iterations)."""
    if config.run.method == "spin":
        return (["sft"] if config.spin.sft_first else []) + ["preference"]
    return ["sft"]


def method_pools(config: JobConfig) -> dict[str, PoolConfig]:
    """The pools the job places: its own, less the judge when judge.kind is 'rule' (never placed then, unless
    evaluation.mt_bench needs it for its pairwise verdicts)."""
    names = list(METHOD_POOLS.get(config.run.method, METHOD_POOLS["smoke"]))
    if config.run.method == "s3ft" and config.s3ft.paraphrase_by == "teacher":
        names.insert(2, "teacher")
    pairwise = config.evaluation.mt_bench.enabled
    if config.judge.kind == "rule" and config.run.method not in ("smoke", "bench") and not pairwise:
        names.remove("judge")
    return {name: getattr(config.pools, name) for name in names}


def node_groups(config: JobConfig) -> list[NodeGroup]:
    return [
        NodeGroup(g.name, g.count, g.gpus_per_node, g.cpus_per_node, dict(g.labels), dict(g.resources))
        for g in config.cluster.node_groups
    ]


@dataclass
class Plan:
    method: str
    lines: list[str]
    problems: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems

    def text(self) -> str:
        verdict = "fits" if self.fits else "REFUSED:\n" + "\n".join(f"  - {p}" for p in self.problems)
        return "\n".join([*self.lines, "", f"plan: {verdict}"])


def make_plan(config: JobConfig) -> Plan:
    """Place the method's pools on ``cluster.node_groups`` and estimate every GPU's memory; never raises for a
    recipe that does not fit (the reasons are in ``Plan.problems``), only PlanError when no plan can be made."""
    if not config.cluster.node_groups:
        raise PlanError("cluster.node_groups: empty; a config run with --plan names the cluster shape it needs")
    groups = {g.name: g for g in config.cluster.node_groups}
    pools = method_pools(config)
    fit = check_fit(pools, node_groups(config))
    problems = list(fit.errors)
    by_group: dict[str, list[str]] = {name: [] for name in groups}
    gpus = sum(g.count * g.gpus_per_node for g in groups.values())
    lines = [f"plan for {config.run.method}: {len(groups)} node groups, {gpus:g} GPUs; pools {', '.join(pools)}"]
    for role, pool in pools.items():
        hosts = fit.placements.get(role, [])
        placed_on = _groups_of(hosts)
        if not placed_on:
            continue
        ref, stated, key = role_model(config, role)
        arch = model_architecture(ref, config.model.cache_dir, stated, key)
        for group_name in placed_on:
            group = groups[group_name]
            count = sum(1 for h in hosts if h.rsplit("[", 1)[0] == group_name)
            kind = ("rank" if role == "train" else "replica") + ("s" if count != 1 else "")
            head = (
                f"  {role}: {count} {kind} x {pool.num_gpus:g} GPU, {pool.num_cpus:g} CPU; {ref} "
                f"({arch.parameters / 1e9:.2f}B parameters, from {arch.source})"
            )
            by_group[group_name].append(head)
            if pool.num_gpus <= 0:
                by_group[group_name].append("    on CPU: no GPU estimate")
                continue
            if group.gpu_memory_gib <= 0:
                problems.append(f"cluster.node_groups '{group_name}': gpu_memory_gib is not stated")
                continue
            gpu_bytes = group.gpu_memory_gib * GIB
            estimates = (
                [
                    training_estimate(arch, phase_training(config, phase), pool.replicas, phase, gpu_bytes)
                    for phase in training_phases(config)
                ]
                if role == "train"
                else [vllm_estimate(arch, config, pool, gpu_bytes)]
            )
            for estimate in estimates:
                by_group[group_name].extend("    " + line for line in estimate.lines())
                problems.extend(f"pools.{role} on '{group_name}': {p}" for p in estimate.problems)
    for name, group in groups.items():
        lines.append(
            f"node group '{name}': {group.count} x ({group.gpus_per_node:g} GPU x {group.gpu_memory_gib:g} GiB, "
            f"{group.cpus_per_node:g} CPU), labels {dict(group.labels) or '{}'}"
        )
        lines.extend(by_group[name] or ["  (nothing placed)"])
    return Plan(config.run.method, lines, problems)


def _groups_of(hosts: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for host in hosts:
        name = host.rsplit("[", 1)[0]
        if name not in seen:
            seen.append(name)
    return seen


def print_plan(config: JobConfig) -> int:
    """What ``--plan`` does: print the plan; 0 when it fits, 2 (reasons on stderr) when not or when no plan can
    be made."""
    try:
        plan = make_plan(config)
    except PlanError as err:
        print(f"plan error: {err}", file=sys.stderr)
        return 2
    print(plan.text())
    if not plan.fits:
        print("plan refused: " + "; ".join(plan.problems), file=sys.stderr)
        return 2
    return 0
