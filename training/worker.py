"""The function every Ray Train worker runs: a long-lived loop that trains one phase per spec it receives.

Design note: Ray Train's ``fit()`` costs 30-45 s of controller, worker and process-group start-up here,
so a method with many short training phases would spend most of its time starting. Instead one ``fit()``
lives for the whole job: each rank pulls phase specs from a ``PhaseQueue`` actor, loads the phase's
starting model (already partitioned, ``HfDeepSpeedConfig``), trains it with DeepSpeed ZeRO-3 on the
process group Ray Train made (gloo on CPU, NCCL on GPU), writes a consolidated HF folder, and waits for
the next spec. A phase interrupted mid-way resumes from its newest complete DeepSpeed checkpoint
(``training.checkpoints``: a tag counts once every rank's files are on disk). With ``training.peft.enabled`` the
rank trains a fresh LoRA adapter on the starting model instead and writes the merged model with its adapter folder
(``training.adapters``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from actors.chat import use_chat_template
from cluster.storage import StorageError, check_storage
from training import adapters, checkpoints
from training.layout import rank_micro_batches
from training.losses import loss_window, sequence_logps, sft_loss, spin_loss
from training.precision import Bf16Compute
from training.sequences import TruncationReport, build_sequence, collate, micro_batches, prompt_messages

# oneDNN's ISA cap names (ONEDNN_MAX_CPU_ISA, or the older DNNL_MAX_CPU_ISA) below avx512_core_bf16. Under such a cap
# torch still sends bf16 GEMMs to oneDNN, which then runs reference code: a 2048^3 bf16 matmul on 2 Xeon cores ran at
# 0.3 GFLOP/s capped at AVX2, against 2800 uncapped and 439 in fp32 (which MKL runs, whatever oneDNN's cap).
ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


def native_bf16(env: Mapping[str, str] | None = None) -> bool:
    """bf16 dot products in hardware: a GPU, or a CPU with avx512_bf16 or AMX (oneDNN then runs bf16 GEMMs) whose
    oneDNN is not capped below them in ``env`` (the rank's environment; default: this process's)."""
    if torch.cuda.is_available():
        return True
    env = os.environ if env is None else env
    cap = (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in ONEDNN_ISAS_WITHOUT_BF16:
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def uses_bf16(setting: bool | str) -> bool:
    """training.deepspeed.bf16 on this rank: True/False as given; 'native' (the default) is bf16 on a GPU with bf16 and
    on a CPU that runs bf16 dot products in hardware (training.precision's stochastic-rounding bf16 compute); 'auto'
    on such a GPU only."""
    gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if setting == "auto":
        return gpu
    if setting == "native":
        return gpu or (not torch.cuda.is_available() and native_bf16())
    return bool(setting)


def check_ranks_agree_on_precision(phase: str, mine: str) -> None:
    """'native' and 'auto' resolve on each rank's node: ranks on machines of different kinds (one CPU with bf16, one
    without) would each compute in their own precision, a mix no phase key names. Every rank raises the same error."""
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, mine)
    if len(set(ranks)) > 1:
        seen = "; ".join(f"rank {i}: {p}" for i, p in enumerate(ranks))
        raise ValueError(
            f"phase {phase}: the ranks resolved training.deepspeed.bf16 to different precisions ({seen}); "
            "set training.deepspeed.bf16 to true or false, or place the train pool on one kind of node"
        )


def deepspeed_bf16(setting: bool | str) -> bool:
    """DeepSpeed's own bf16 (bf16 weights, fp32 masters in the optimizer): GPU ranks. A CPU rank in bf16 keeps fp32
    weights and computes in bf16 (training.precision), so DeepSpeed runs it as fp32."""
    return uses_bf16(setting) and torch.cuda.is_available()


def cpu_bf16(setting: bool | str) -> bool:
    """bf16 compute over fp32 weights (training.precision): a CPU rank in bf16."""
    return uses_bf16(setting) and not torch.cuda.is_available()


def precision_name(ds: dict) -> str:
    if cpu_bf16(ds["bf16"]):
        return f"bf16 compute, {ds['bf16_rounding']} rounding, fp32 weights"
    return "bf16" if deepspeed_bf16(ds["bf16"]) else "fp32"


def deepspeed_config(t: dict) -> dict:
    ds = t["deepspeed"]
    zero: dict[str, Any] = {"stage": ds["zero_stage"], "overlap_comm": ds["overlap_comm"], "contiguous_gradients": True}
    if ds["zero_stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t["micro_batch_size"],
        "gradient_accumulation_steps": t["grad_accum"],
        "gradient_clipping": t["grad_clip"],
        "zero_optimization": zero,
        "bf16": {"enabled": deepspeed_bf16(ds["bf16"])},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# training.schedule -> transformers.get_scheduler's name: every schedule warms up linearly first.
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def restore_torch_linear() -> None:
    """Undo ZeRO-3's process-wide swap of ``torch.nn.functional.linear`` for its memory-efficient autograd Function
    (deepspeed.zero.Init makes it "persist unless manually reset"): in a long-lived rank, a ZeRO-2 or plain data
    parallel phase after a ZeRO-3 phase would otherwise run every linear layer through ZeRO-3's Python Function."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit

    original = getattr(ZeroInit, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def lr_scheduler(optimizer, total_steps: int, warmup_ratio: float, schedule: str):
    """The HF schedule the Trainer and TRL use (``transformers.get_scheduler``), stepped once per optimizer step."""
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULERS[schedule],
        optimizer,
        num_warmup_steps=int(total_steps * warmup_ratio),
        num_training_steps=total_steps,
    )


def peak_rss_mib() -> float | None:
    """This process's peak resident memory since the last ``reset_peak_rss`` (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # no procfs (macOS)
        pass
    return None


def reset_peak_rss() -> float | None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS); returns
    that starting RSS in MiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return peak_rss_mib()


def loaded_allocator() -> str:
    """Which malloc this process runs on (``training.allocator`` takes effect only at process start)."""
    try:
        return "jemalloc" if "libjemalloc" in Path("/proc/self/maps").read_text() else "system"
    except OSError:  # no procfs (macOS): cannot tell
        return "unknown"


def return_free_memory() -> str:
    """Hand the allocator's free pages back to the OS; returns how. glibc keeps freed heap in its arenas until
    ``malloc_trim``; jemalloc (``training.allocator``'s default) keeps dirty pages until they decay (10 s),
    which ``arena.<all>.purge`` (4096 = MALLCTL_ARENAS_ALL) does at once."""
    import ctypes

    allocator = loaded_allocator()
    try:
        process = ctypes.CDLL(None)  # the process's own symbols: a preloaded jemalloc's mallctl, glibc's malloc_trim
        if allocator == "jemalloc":
            process.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
            return "jemalloc purge"
        process.malloc_trim(ctypes.c_size_t(0))
        return "malloc_trim"
    except (AttributeError, OSError):  # another C library (musl, macOS): neither call exists
        return "none"


def _read_examples(data: str | list[str]) -> list[dict]:
    """One Parquet file, or the parts of streamed phases (runfolder.blocks): a rank holds its phase's examples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [data] if isinstance(data, str) else data
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").to_pylist()


class PhaseRunner:
    """Runs one training phase on this rank. ``beat_fn(step, stage)`` tells the driver this rank is alive and
    where it is (every micro step); the driver fails a phase in which some rank went silent (a hung collective)."""

    def __init__(self, spec: dict, rank: int, world_size: int, log_fn, beat_fn=None):
        self.spec, self.rank, self.world_size, self.log = spec, rank, world_size, log_fn
        self.beat = beat_fn or (lambda step, stage: None)
        # training.layout (training/layout.py): the micro-batches are planned for ``data_parallel`` ranks; a rank
        # standing for several of them accumulates their micro-batches too, so each optimizer step is the pool's.
        self.layout = spec.get("layout") or {
            "name": "pool",
            "data_parallel": world_size,
            "reason": "no layout in the spec",
        }
        self.data_parallel = self.layout["data_parallel"]
        accumulation = self.data_parallel // world_size
        self.t = {**spec["training"], "grad_accum": spec["training"]["grad_accum"] * accumulation}
        if self.layout.get("zero_stage") is not None:  # auto's one rank: stage 0, nothing to partition over
            self.t["deepspeed"] = {**self.t["deepspeed"], "zero_stage": self.layout["zero_stage"]}
        self.phase_dir = Path(spec["phase_dir"])
        self.ckpt_dir = self.phase_dir / "ckpt"

    def run(self) -> dict:
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        spec, t = self.spec, self.t
        peft = t.get("peft") or {}
        self.adapter = bool(peft.get("enabled"))
        started = time.perf_counter()
        torch.manual_seed(spec["seed"])
        tokenizer = AutoTokenizer.from_pretrained(spec["init_model"])
        use_chat_template(tokenizer, spec.get("chat_template"))  # the generator's format (actors/chat.py)
        examples = _read_examples(spec["data"])
        report = TruncationReport()
        kind = spec["kind"]
        min_proposal_tokens = spec.get("min_proposal_tokens", 1)  # AFT: a cut proposal keeps at least this
        build = lambda ex, text: build_sequence(  # noqa: E731
            tokenizer,
            ex["id"],
            prompt_messages(tokenizer, ex, t["max_prompt_length"], min_proposal_tokens, report),
            text,
            t["max_length"],
            t["max_prompt_length"],
            report,
        )
        if not examples:  # the driver refuses this first (training.min_examples); never save an untrained model
            raise ValueError(f"phase {spec['name']}: no training examples in {spec['data']}")
        if kind == "spin":
            items = [(build(ex, ex["chosen"]), build(ex, ex["rejected"])) for ex in examples]
            lengths = [max(len(a.input_ids), len(b.input_ids)) * 2 for a, b in items]
        else:
            items = [build(ex, ex["response"]) for ex in examples]
            lengths = [len(s.input_ids) for s in items]
        self.beat(0, "loading")

        deepspeed.init_distributed()  # adopts the process group Ray Train created (gloo / NCCL)
        check_ranks_agree_on_precision(spec["name"], precision_name(t["deepspeed"]))
        ds_config = deepspeed_config(t)
        ds_bf16 = deepspeed_bf16(t["deepspeed"]["bf16"])
        dtype = torch.bfloat16 if ds_bf16 else torch.float32
        keep_alive = HfDeepSpeedConfig(ds_config) if t["deepspeed"]["zero_stage"] == 3 else None  # noqa: F841
        if t["deepspeed"]["zero_stage"] != 3:
            restore_torch_linear()
        model = AutoModelForCausalLM.from_pretrained(
            spec["init_model"], dtype=dtype, trust_remote_code=spec.get("trust_remote_code", False)
        )
        model.config.use_cache = False
        # transformers' causal LMs take logits_to_keep; a remote-code model may not, and then computes every logit
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.beat(0, "model loaded")
        if t["gradient_checkpointing"]:
            # Non-reentrant: recomputes each layer in backward under ZeRO-3's parameter gathers (the reentrant
            # variant needs inputs that require grad and misses parameters gathered inside the layer).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.adapter:  # a fresh adapter: the wrapped model is the starting model until the first step
            model = adapters.wrap(model, peft, t["gradient_checkpointing"])
        self.compute = None
        if cpu_bf16(t["deepspeed"]["bf16"]):
            self.compute = Bf16Compute(spec["seed"], t["deepspeed"]["bf16_rounding"])
            self.compute.attach(model)

        epochs = [self._plan(lengths, e) for e in range(t["epochs"])]
        micro_per_epoch = len(epochs[0])
        total_steps = max(1, math.ceil(micro_per_epoch * t["epochs"] / t["grad_accum"]))
        params = [p for p in model.parameters() if p.requires_grad]
        if t["optimizer"] == "rmsprop":
            optimizer = torch.optim.RMSprop(params, lr=t["lr"], weight_decay=t["weight_decay"])
        else:
            optimizer = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
        scheduler = lr_scheduler(optimizer, total_steps, t["warmup_ratio"], t["schedule"])
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        trainable_parameters, total_parameters = adapters.parameter_counts(engine.module)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        self.beat(0, "reference" if kind == "spin" else "loaded")
        ref_logps = self._reference_logps(engine, items, lengths, pad_id) if kind == "spin" else None

        start_micro, resumed_from, discarded = self._resume(engine)
        startup_s = time.perf_counter() - started

        engine.train()
        rss_before_steps = reset_peak_rss()  # the steps' own peak: activations on top of the partitioned state
        micro_step, steps_done = 0, math.ceil(start_micro / t["grad_accum"])
        self._stall_hook(steps_done)
        step_tokens, step_start, train_tokens, train_time = 0, time.perf_counter(), 0, 0.0
        last: dict[str, float] = {}
        losses: list[float] = []
        for epoch, plan in enumerate(epochs):
            for indices, weight in plan:
                micro_step += 1
                if micro_step <= start_micro:
                    continue
                self.beat(steps_done, f"micro step {micro_step}")
                if self.compute is not None:  # the step this micro step adds to: its forwards share one rounding
                    self.compute.optimizer_step(math.ceil(micro_step / t["grad_accum"]))
                if kind == "spin":
                    loss, metrics, tokens = self._spin_step(engine, items, indices, ref_logps, pad_id)
                else:
                    loss, metrics, tokens = self._sft_step(engine, items, indices, pad_id)
                engine.backward(loss * weight)
                engine.step()
                step_tokens += tokens if weight else 0
                if micro_step % t["grad_accum"] == 0 or micro_step == micro_per_epoch * t["epochs"]:
                    elapsed = time.perf_counter() - step_start
                    all_tokens = self._sum(step_tokens)
                    optimizer_step = steps_done = math.ceil(micro_step / t["grad_accum"])
                    last = {
                        "loss": self._mean(loss.item()),
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": all_tokens / max(elapsed, 1e-9),
                        "step_time_s": elapsed,
                        "epoch": epoch,
                        "step": optimizer_step,
                        "total_steps": total_steps,
                        **{k: self._mean(v) for k, v in metrics.items()},
                    }
                    losses.append(last["loss"])
                    train_tokens += all_tokens
                    train_time += elapsed
                    if self.rank == 0:
                        self.log({"phase": spec["name"], **last})
                    if t["checkpoint_every"] and optimizer_step % t["checkpoint_every"] == 0:
                        self._save_checkpoint(engine, f"step{optimizer_step}", micro_step)
                        self._after_checkpoint(spec)
                    step_tokens, step_start = 0, time.perf_counter()
                    self.beat(steps_done, "stepped")
                    self._stall_hook(steps_done)

        train_peak_rss_mib = peak_rss_mib()
        rss_before_steps_by_rank = self._gather(rss_before_steps)
        self.beat(steps_done, "saving")
        out = self._save(engine, model, tokenizer, spec["output"])
        # DeepSpeed's ZeRO optimizers hook each parameter's grad accumulator (ZeRO-1/2) and every module (ZeRO-3)
        # with closures that hold the optimizer: a cycle through autograd's C++ nodes that gc.collect() cannot
        # break (DeepSpeed issues 4856, 5143), so a long-lived rank kept each phase's model, gradients and fp32
        # optimizer state. destroy() removes the hooks; the rank's loop collects the rest (release_memory).
        module = engine.module
        engine.destroy()
        forget_zero3_engine(module)
        if self.rank == 0:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)  # the HF folder is the phase's result
        return {
            "output": out,
            "steps": steps_done,  # optimizer steps this phase ran, across resumes (not the schedule's length)
            "resumed_from_micro_step": start_micro,
            "resumed_from_tag": resumed_from,  # the newest complete DeepSpeed tag, or None
            "discarded_tags": discarded,  # {tag: why} of the tags found unusable at the start (deleted)
            "train_tokens": train_tokens,
            "train_time_s": train_time,
            "train_tokens_per_s": train_tokens / max(train_time, 1e-9),
            "startup_s": startup_s,
            "wall_s": time.perf_counter() - started,
            "truncation": report.__dict__,
            "final": last,
            "losses": losses,  # the loss of each optimizer step this session ran
            "precision": precision_name(t["deepspeed"]),
            "zero_stage": t["deepspeed"]["zero_stage"],
            # whose function ran the linear layers: torch's, or ZeRO-3's memory-efficient replacement
            "linear_impl": getattr(torch.nn.functional.linear, "__module__", None) or "torch",
            "examples": len(items),
            "local_param_fraction": local / total,
            # what the optimizer updated (the adapter and modules_to_save with training.peft) out of the whole model
            "trainable_parameters": trainable_parameters,
            "total_parameters": total_parameters,
            "adapter": str(Path(out) / adapters.ADAPTER_DIR) if self.adapter else None,
            "allocator": loaded_allocator(),
            # where the arithmetic ran (training.layout) and the grad_accum each rank ran with to keep the pool's steps
            "layout": {
                **self.layout,
                "ranks": self.world_size,
                "grad_accum": t["grad_accum"],
                "zero_stage": t["deepspeed"]["zero_stage"],
            },
            # this rank's resident memory (rank 0's result reaches the driver): peak during the optimizer steps,
            # and what it held when they started (model, optimizer state, the process itself)
            "train_peak_rss_mib": train_peak_rss_mib,
            "rss_before_steps_mib": rss_before_steps,
            "rss_before_steps_mib_by_rank": rss_before_steps_by_rank,  # what a long-lived rank kept of earlier phases
        }

    def _plan(self, lengths: list[int], epoch: int) -> list[tuple[list[int], float]]:
        """This rank's weighted micro-batches of one epoch (the reference pass uses epoch 0's)."""
        t = self.t
        batches = micro_batches(
            len(lengths),
            lengths,
            t["micro_batch_size"],
            t["max_tokens_per_batch"],
            self.spec["seed"],
            epoch,
            t["group_by_length"],
            self.data_parallel,
        )
        return rank_micro_batches(batches, self.rank, self.world_size, self.data_parallel)

    # -- steps -----------------------------------------------------------------------------------------

    def _forward_precision(self):
        """A training forward's precision: bf16 autocast on a CPU rank in bf16 (training.precision), else as is. The
        reference pass runs under no_grad outside it: fp32, the reference exact."""
        if self.compute is None or not torch.is_grad_enabled():
            return contextlib.nullcontext()
        return self.compute.autocast()

    def _logits(self, engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits the loss reads, with their labels: where the model can keep fewer logits (``logits_to_keep``),
        only the batch's trailing loss window (training.losses.loss_window), so the LM head and the fp32
        log-softmax over the vocabulary skip the prompt positions every row of the batch has."""
        labels, keep = batch["labels"], {}
        if self.keeps_logits:
            window = loss_window(labels)
            labels, keep = labels[:, -window:], {"logits_to_keep": window}
        with self._forward_precision():
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **keep).logits
        return logits, labels

    def _sft_step(self, engine, items, indices, pad_id):
        batch = collate([items[i] for i in indices], pad_id)
        loss, _ = sft_loss(*self._logits(engine, batch))
        return loss, {}, int(batch["attention_mask"].sum())

    def _pair_logps(self, engine, items, indices, pad_id) -> tuple[torch.Tensor, torch.Tensor, int]:
        sequences = [items[i][0] for i in indices] + [items[i][1] for i in indices]
        batch = collate(sequences, pad_id)
        logps = sequence_logps(*self._logits(engine, batch))
        return logps[: len(indices)], logps[len(indices) :], int(batch["attention_mask"].sum())

    def _spin_step(self, engine, items, indices, ref_logps, pad_id):
        real, gen, tokens = self._pair_logps(engine, items, indices, pad_id)
        ref_real = torch.tensor([ref_logps[items[i][0].example_id][0] for i in indices])
        ref_gen = torch.tensor([ref_logps[items[i][0].example_id][1] for i in indices])
        losses, rewards = spin_loss(real, gen, ref_real, ref_gen, self.spec["beta"], self.spec["loss_type"])
        return losses.mean(), {k: v.mean().item() for k, v in rewards.items()}, tokens

    def _reference_logps(self, engine, items, lengths, pad_id) -> dict[str, tuple[float, float]]:
        """Frozen reference = the starting weights, evaluated once before training (and kept on disk for resume)."""
        path = self.phase_dir / "reference_logps.json"
        if path.exists():
            return json.loads(path.read_text())
        import torch.distributed as dist

        plan = self._plan(lengths, 0)
        mine: dict[str, tuple[float, float]] = {}
        engine.eval()
        with torch.no_grad():
            for indices, _ in plan:  # every rank runs every forward: ZeRO-3 gathers collectively
                real, gen, _ = self._pair_logps(engine, items, indices, pad_id)
                for i, r, g in zip(indices, real.tolist(), gen.tolist()):
                    mine[items[i][0].example_id] = (r, g)
        gathered: list[dict] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
        merged = {k: v for part in gathered for k, v in part.items()}
        if self.rank == 0:
            from runfolder.state import write_atomic  # fsynced: a power loss leaves the old file or the whole new one

            self.phase_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(merged))
        dist.barrier()
        return merged

    # -- DeepSpeed checkpoints (training.checkpoints) ------------------------------------------------------

    def _save_checkpoint(self, engine, tag: str, micro_step: int) -> None:
        """A tag that counts only when every rank's files are on disk: see ``training.checkpoints``."""
        import torch.distributed as dist

        tag_dir = self.ckpt_dir / tag
        if self.rank == 0:  # a tag of this name left by an earlier attempt is not complete until rewritten
            (tag_dir / checkpoints.COMPLETE).unlink(missing_ok=True)
        self._die_while_saving_hook(engine, tag)
        # DeepSpeed's own barrier (after its makedirs) keeps the unlink above ahead of every rank's writes.
        # An adapter phase leaves the frozen base out: it is the starting model, loaded again at a resume.
        engine.save_checkpoint(
            str(self.ckpt_dir),
            tag=tag,
            client_state={"micro_step": micro_step},
            save_latest=False,
            exclude_frozen_parameters=self.adapter,
        )
        if self.adapter:  # every tag is also a PEFT folder (<tag>/adapter), beside what a resume reads
            state = self._trainable_state(engine)
            if self.rank == 0:
                adapters.save_adapter(engine.module, state, tag_dir / adapters.ADAPTER_DIR)
        mine = checkpoints.sync_own_files(tag_dir, self.rank)
        every: list[dict] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(every, mine)  # returns on rank 0 only once every rank synced its files
        if self.rank == 0:
            files = {name: size for part in every for name, size in part.items()}
            checkpoints.mark_complete(self.ckpt_dir, tag, self.world_size, micro_step, files)
            checkpoints.prune(self.ckpt_dir, self.world_size, self.t["keep_checkpoints"])
        dist.barrier()

    def _resume(self, engine) -> tuple[int, str | None, dict[str, str]]:
        """(micro step, tag, {discarded tag: why}): the newest complete tag, loaded; 0 when there is none. Rank
        0's view of the folder decides for all (ranks must load the same tag); it deletes the unusable tags."""
        import torch.distributed as dist

        complete, unusable = checkpoints.scan(self.ckpt_dir, self.world_size)
        choice = [(complete[-1] if complete else None, unusable)]
        dist.broadcast_object_list(choice, src=0)
        newest, unusable = choice[0]
        if self.rank == 0:
            for name, why in unusable.items():
                print(f"phase {self.spec['name']}: checkpoint {name} discarded: {why}", flush=True)
                checkpoints.remove_tag(self.ckpt_dir, name)
        dist.barrier()
        if newest is None:
            return 0, None, unusable
        # strict only for full weights: an adapter phase's tags hold the trainable tensors alone
        _, client = engine.load_checkpoint(str(self.ckpt_dir), tag=newest.name, load_module_strict=not self.adapter)
        return int(client["micro_step"]), newest.name, unusable

    # -- helpers ---------------------------------------------------------------------------------------

    def _die_while_saving_hook(self, engine, tag: str) -> None:
        """Test hook: this rank dies after writing the first file of a tag (``<phase>:<rank>:<tag>``, once per
        phase folder), as a rank killed during ``save_checkpoint`` would: the tag is left with part of its files."""
        if os.environ.get("SELFIMPROVE_DIE_WHILE_SAVING") != f"{self.spec['name']}:{self.rank}:{tag}":
            return
        marker = self.phase_dir / f"died-while-saving-{self.rank}"
        if marker.exists():
            return
        save = engine.checkpoint_engine.save

        def save_then_die(state_dict, path):
            save(state_dict, path)
            marker.touch()
            os._exit(1)

        engine.checkpoint_engine.save = save_then_die

    def _stall_hook(self, step: int) -> None:
        """Test hook: this rank hangs for ``<seconds>`` after a given step (``<phase>:<rank>:<step>:<seconds>``), as
        a stuck collective would, then goes on (so a test's train pool can wind down afterwards)."""
        where, _, seconds = os.environ.get("SELFIMPROVE_STALL_AT", "").rpartition(":")
        if where == f"{self.spec['name']}:{self.rank}:{step}":
            time.sleep(float(seconds))

    def _after_checkpoint(self, spec: dict) -> None:
        """Test hook: die right after the first checkpoint of the named phases (comma-separated; simulates a crash
        mid-phase)."""
        crash = os.environ.get("SELFIMPROVE_CRASH_AFTER_CHECKPOINT", "")
        marker = self.phase_dir / "crashed-once"
        if spec["name"] in crash.split(",") and self.rank == 0 and not marker.exists():
            marker.touch()
            os._exit(1)

    def _mean(self, value: float) -> float:
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def _sum(self, value: float) -> float:
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item()

    def _gather(self, value):
        """Every rank's ``value``, in rank order (a collective: every rank calls it)."""
        import torch.distributed as dist

        every: list = [None] * self.world_size
        dist.all_gather_object(every, value)
        return every

    def _save(self, engine, model, tokenizer, output: str) -> str:
        """Consolidate the weights (ZeRO-3 shards, or a bf16 phase's fp32 master weights: every rank joins the
        gather); rank 0 writes an HF folder atomically."""
        import torch.distributed as dist

        if self.adapter:
            return self._save_adapter_and_merge(engine, model, tokenizer, output)
        if deepspeed_bf16(self.t["deepspeed"]["bf16"]):
            state = fp32_master_state_dict(engine)
        elif self.t["deepspeed"]["zero_stage"] == 3:
            state = engine._zero3_consolidated_16bit_state_dict()
        else:
            state = engine.module.state_dict()
        if self.rank == 0:
            out = Path(output)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        dist.barrier()
        return output

    def _trainable_state(self, engine) -> dict[str, torch.Tensor]:
        """The trainable tensors whole (a collective under ZeRO-3 and bf16: every rank calls it); a bf16 phase's
        are its fp32 master weights, as full fine-tuning saves them."""
        if deepspeed_bf16(self.t["deepspeed"]["bf16"]):
            return fp32_master_state_dict(engine, trainable_only=True)
        if self.t["deepspeed"]["zero_stage"] == 3:
            return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        return {n: p.detach() for n, p in engine.module.named_parameters() if p.requires_grad}

    def _save_adapter_and_merge(self, engine, model, tokenizer, output: str) -> str:
        """Rank 0 writes the adapter folder and the merged model next to it, into a temp folder renamed whole."""
        import torch.distributed as dist
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        state = self._trainable_state(engine)
        if self.rank == 0:
            out = Path(output)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            adapters.save_adapter(model, state, tmp / adapters.ADAPTER_DIR)
            unset_hf_deepspeed_config()  # the merge loads the base whole, not partitioned across the ranks
            trust = self.spec.get("trust_remote_code", False)
            adapters.merge(self.spec["init_model"], tmp / adapters.ADAPTER_DIR, tmp, tokenizer, trust)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        dist.barrier()
        return output


def fp32_master_state_dict(engine, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 master weights of a bf16 phase, gathered whole (a collective: every rank calls it).
    Saving the bf16 module weights instead would round away every update smaller than bf16's resolution (~0.4%
    of a weight): at SPIN's lr of 1e-7..1e-6 most of a phase's change, lost before the next phase starts from it.
    ``trainable_only``: the trainable parameters alone (an adapter phase: the frozen base has no master)."""
    from deepspeed.utils import safe_get_full_fp32_param
    from torch._utils import _unflatten_dense_tensors

    masters: dict[int, torch.Tensor] = {}
    optimizer = engine.optimizer
    # stage 0 wraps the optimizer in DeepSpeed's FP16 optimizers (bf16 as the low precision), whose masters are
    # replicated: per parameter (unfused, any torch optimizer) or one flat tensor per group (fused)
    for group, fp32_group in zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", [])):
        masters.update({id(p): m for p, m in zip(group, fp32_group)})
    for group, flat in zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups_flat", [])):
        masters.update({id(p): m for p, m in zip(group, _unflatten_dense_tensors(flat.detach(), group))})
    # the keys save_pretrained expects (tied weights under each name, persistent buffers only, as state_dict());
    # keep_vars gives the Parameter objects, so a tied weight's names share one master
    state, gathered = {}, {}
    for name, value in engine.module.state_dict(keep_vars=True).items():
        if trainable_only and not (isinstance(value, torch.nn.Parameter) and value.requires_grad):
            continue
        if not isinstance(value, torch.nn.Parameter):
            state[name] = value.detach().float() if value.is_floating_point() else value.detach()
            continue
        if id(value) not in gathered:
            master = masters[id(value)] if id(value) in masters else safe_get_full_fp32_param(value)
            if master is None:
                raise RuntimeError(f"no fp32 master weight for {name} under {type(optimizer).__name__}")
            gathered[id(value)] = master.detach().float().cpu()
        state[name] = gathered[id(value)]
    return state


def checkpoint_dir_name(phase: str) -> str:
    """The phase's checkpoint folder under Ray Train's run storage (phase names hold '/': ``iter0/spin``)."""
    return "checkpoint_" + phase.replace("/", "-")


def phase_metrics(spec: dict, result: dict) -> dict:
    """What Ray Train records with the phase's checkpoint: its name, size, speed and last step's metrics."""
    final = {k: v for k, v in result["final"].items() if isinstance(v, (int, float))}
    return {
        "phase": spec["name"],
        "kind": spec["kind"],
        **final,
        "steps": result["steps"],
        "examples": result["examples"],
        "train_tokens": result["train_tokens"],
        "train_tokens_per_s": result["train_tokens_per_s"],
        "wall_s": result["wall_s"],
        "trainable_parameters": result["trainable_parameters"],
        "total_parameters": result["total_parameters"],
    }


def link_tree(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source`` made of hard links where the filesystem allows (no second copy
    of the weights), real copies elsewhere."""
    shutil.rmtree(target, ignore_errors=True)  # a phase reported again after a crash between report and done
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:  # another device, or a filesystem without hard links
            shutil.copy2(path, dest)


def register_checkpoint(checkpoint, dir_name: str):
    """``checkpoint_upload_fn`` of the phase's report: on a local storage path the HF folder is linked into the
    run storage, not copied (Ray's default upload would write every weight file a second time)."""
    import pyarrow.fs
    import ray.train

    storage = ray.train.get_context().get_storage()
    if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        return storage.persist_current_checkpoint(checkpoint, dir_name)  # Ray's own upload (cloud storage)
    target = Path(storage.experiment_fs_path) / dir_name
    link_tree(Path(checkpoint.path), target)
    return ray.train.Checkpoint(str(target), filesystem=storage.storage_filesystem)


def report_phase(spec: dict, result: dict, rank: int) -> str:
    """Every rank reports the finished phase to Ray Train (``ray.train.report`` is a barrier); rank 0 attaches
    the HF folder, which Ray Train then registers as the run's checkpoint with these metrics. Returns the
    registered folder. One report per phase: Train V2 keeps only metrics that come with a checkpoint, and its
    controller takes one report per worker per poll (2 s), which per-step reports of short steps would queue
    behind; the per-step curves go to W&B on the optimizer step."""
    import ray.train

    name = checkpoint_dir_name(spec["name"])
    checkpoint = ray.train.Checkpoint.from_directory(result["output"]) if rank == 0 else None
    ray.train.report(
        phase_metrics(spec, result),
        checkpoint=checkpoint,
        checkpoint_dir_name=name,
        checkpoint_upload_fn=register_checkpoint,
    )
    if rank != 0:
        return ""
    # Wait until the controller has registered it, so the driver never sees a finished phase that Ray Train's
    # record (``ray.train.Result.from_path`` on the run storage) does not list yet.
    reported = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    return next(r.checkpoint.path for r in reversed(reported) if r.checkpoint.path.endswith(name))


# What gloo raises (a plain RuntimeError) in a collective whose peer process went away.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer")


def peer_lost(err: BaseException) -> bool:
    """Whether a rank's error is the process group's (another rank died, its connection broke), not its own."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):  # NCCL errors, store and network timeouts
        return True
    return isinstance(err, RuntimeError) and "gloo" in str(err) and any(text in str(err) for text in PEER_LOST)


def forget_zero3_engine(module: torch.nn.Module) -> None:
    """Drop the two process-wide references through which DeepSpeed ZeRO-3 keeps a destroyed engine alive, with its
    model, partitioned parameters and fp32 optimizer state (found with gc referrer chains from a finished phase's
    Linear, deepspeed 0.18 on the CPU; each kept the tiny model of every earlier phase alive, 3 of 3):
    ``parameter_offload.FWD_MODULE_STACK``, a module-level list to which every ZeRO-3 engine's setup appends its top
    module and which nothing pops, and the ``functools.lru_cache`` on ``PartitionedParameterCoordinator.
    __params_to_release``, a method cache keyed by (coordinator, submodule, step). Clearing the cache costs other live
    engines a recompute of their release sets; a rank runs one engine at a time. Harmless under ZeRO-1/2."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not module]
    method = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    # deepspeed's instrument_w_nvtx wraps the cached function without functools.wraps: reach it through the closure
    for candidate in [method, *(cell.cell_contents for cell in getattr(method, "__closure__", None) or ())]:
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()


def release_memory() -> str:
    """After a phase (its engine destroyed, its frame gone): collect its cycles and hand the freed pages to the OS,
    so a long-lived rank holds no more than a fresh one while it waits (the generator may need that memory).
    Rank 0's RSS at the start of steps over five tiny ZeRO-2 phases: 763, 959, 1014, 1098, 1176 MiB without this
    and ``engine.destroy()``, 767, 819, 839, 849, 857 MiB with them (no engine, model or parameter of a finished
    phase left; the ~10 MiB a phase that remains is not DeepSpeed's). tests/test_training.py bounds the growth."""
    import gc

    gc.collect()
    return return_free_memory()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: serve phase specs from the queue until it says stop."""
    import ray
    import ray.train

    threads = config.get("threads") or 1
    torch.set_num_threads(threads)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    queue = config["queue"]
    # Where this rank runs, and whether its node sees the shared model and run folders: told to the driver
    # first, so a node without the mount fails the pool at once, by name, instead of a phase failing later.
    node_id = ray.get_runtime_context().get_node_id()
    try:
        check_storage(f"pool train rank {rank}", node_id, **config.get("shared_paths", {}))
        storage_error = None
    except StorageError as err:
        storage_error = str(err)
    ray.get(queue.arrive.remote(rank, {"node_id": node_id, "pid": os.getpid(), "storage_error": storage_error}))
    if storage_error:
        raise StorageError(storage_error)
    index = ray.get(queue.first_unfinished.remote())
    while True:
        spec = ray.get(queue.get.remote(index, rank))
        if spec is None:
            break
        runner = PhaseRunner(
            spec,
            rank,
            world_size,
            lambda m: queue.log.remote(m),
            lambda step, stage, index=index: queue.beat.remote(index, rank, step, stage),
        )
        try:
            result = runner.run()
        except Exception as err:
            # Rank 0 fails the phase for an error of its own. A collective broken by another rank's death is the
            # group's failure: Ray Train restarts the group (FailureConfig) and the phase resumes from its newest
            # complete checkpoint; failing the phase here would make the restarted group skip it.
            if rank == 0 and not peer_lost(err):
                ray.get(queue.fail.remote(index, f"{type(err).__name__}: {err}"))
            raise
        result["ray_checkpoint"] = report_phase(spec, result, rank)
        del runner
        release_memory()
        if rank == 0:
            ray.get(queue.done.remote(index, result))
        index += 1
