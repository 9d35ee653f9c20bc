"""Ray Train + DeepSpeed ZeRO-3 on 2 CPU workers (gloo) with the tiny random model; full weights and LoRA adapters."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from actors.engine import render_prompt, response_ids
from configs.schema import load_config
from training.service import TrainingService

ROWS = [
    {
        "id": f"r{i}",
        "messages": [{"role": "user", "content": f"What is {i} plus one?"}],
        "response": f"{i} plus one is {i + 1}.",
        "chosen": f"{i} plus one is {i + 1}.",
        "rejected": "I do not know.",
    }
    for i in range(12)
]


def mean_nll(model_path: str, rows: list[dict], field: str = "response") -> float:
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for row in rows:
        prompt, answer = render_prompt(tok, row["messages"]), response_ids(tok, row[field])
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logps = model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
        total -= logps.gather(-1, ids[0, len(prompt) :, None]).sum().item()
        count += len(answer)
    return total / count


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    config = load_config(
        None,
        [
            f"run.dir={root}",
            "run.id=t",
            "pools.train.replicas=2",
            "pools.train.num_cpus=1",
            "training.layout=pool",  # two real ranks (auto would run one on this embedded Ray)
            "pools.train.max_restarts=2",  # two phases of this module crash a rank on purpose (one fit() for all)
            "pools.train.env={SELFIMPROVE_CRASH_AFTER_CHECKPOINT: 'crashing,lora-crashing'}",
        ],
    )
    # Ray Train's state tracking (what the dashboard's Train page reads; on with cluster.dashboard=true).
    tracking = os.environ.get("RAY_TRAIN_ENABLE_STATE_TRACKING")
    os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"] = "1"
    svc = TrainingService(config)
    svc.root = root
    svc.training = asdict(config.training)
    yield svc
    svc.shutdown()
    if tracking is None:
        os.environ.pop("RAY_TRAIN_ENABLE_STATE_TRACKING")
    else:
        os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"] = tracking


def spec(svc, name, kind, model, **extra):
    data = svc.root / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), data)
    training = {**svc.training, "lr": 2e-3, "epochs": 2, "micro_batch_size": 2, **extra.pop("training", {})}
    return {
        "name": name,
        "kind": kind,
        "init_model": model,
        "data": str(data),
        "phase_dir": str(svc.root / name),
        "output": str(svc.root / f"{name}-model"),
        "training": training,
        "seed": 0,
        **extra,
    }


def test_pool_reports_ready_once_every_rank_waits_for_work(service):
    seconds = service.wait_ready(timeout_s=300)
    assert seconds > 0
    assert ray.get(service.queue.waiting_ranks.remote()) == 2  # both ranks are blocked on the next phase


def test_zero3_sft_lowers_loss_and_saves_a_loadable_hf_folder(service, tiny_model):
    before = mean_nll(tiny_model, ROWS)
    result = service.train(spec(service, "sft", "sft", tiny_model))
    after = mean_nll(result["output"], ROWS)
    assert after < before - 0.5, (before, after)
    assert result["steps"] == 6 and result["truncation"]["sequences"] == 12  # 12 rows / (2 ranks x 2) x 2 epochs
    assert result["allocator"] == "jemalloc"  # training.allocator's default reached the rank at process start
    tok = AutoTokenizer.from_pretrained(result["output"])
    model = AutoModelForCausalLM.from_pretrained(result["output"])
    ids = torch.tensor([render_prompt(tok, ROWS[0]["messages"])])
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5 or tok.eos_token_id in generated[0].tolist()
    assert tok.chat_template  # the folder keeps the chat template for the generator


def test_zero3_actually_partitions_and_spin_trains(service, tiny_model):
    result = service.train(spec(service, "spin", "spin", tiny_model, beta=0.5, loss_type="sigmoid"))
    assert result["local_param_fraction"] < 0.6  # each of 2 ranks holds about half the parameters
    final = result["final"]
    assert final["reward_margin"] > 0 and final["reward_accuracy"] > 0.5
    assert final["loss"] < 0.6931  # below log 2, the loss when policy == reference
    # The gold answers gained likelihood relative to the rejected ones.
    gap_before = mean_nll(tiny_model, ROWS, "rejected") - mean_nll(tiny_model, ROWS, "chosen")
    gap_after = mean_nll(result["output"], ROWS, "rejected") - mean_nll(result["output"], ROWS, "chosen")
    assert gap_after > gap_before


def test_interrupted_phase_resumes_to_the_same_step_count(service, tiny_model):
    uninterrupted = service.train(spec(service, "straight", "sft", tiny_model, training={"checkpoint_every": 2}))
    # Rank 0 dies right after its first checkpoint; Ray Train restarts the worker group (max_failures=2)
    # and the phase resumes from that checkpoint.
    resumed = service.train(spec(service, "crashing", "sft", tiny_model, training={"checkpoint_every": 2}))
    assert resumed["resumed_from_micro_step"] > 0
    assert resumed["steps"] == uninterrupted["steps"]
    assert abs(resumed["final"]["loss"] - uninterrupted["final"]["loss"]) < 0.05


def test_phase_reports_metrics_and_registers_its_hf_folder_with_ray_train(service, tiny_model):
    result = service.train(spec(service, "reported", "sft", tiny_model, training={"epochs": 1}))
    # Ray Train's own record of the run, read back from its storage as a Ray user would.
    registered = {Path(path).name: (path, metrics) for path, metrics in service.reported_phases()}
    path, metrics = registered["checkpoint_reported"]
    assert path == result["ray_checkpoint"] and Path(path).parent == service.storage
    assert metrics["phase"] == "reported" and metrics["kind"] == "sft"
    assert metrics["steps"] == result["steps"] == 3 and metrics["loss"] == result["final"]["loss"]
    assert metrics["examples"] == 12 and metrics["train_tokens"] == result["train_tokens"] > 0
    # The checkpoint is the phase's HF folder: same files (linked, not copied), loadable as a model.
    weights = next(Path(result["output"]).glob("*.safetensors"))
    assert (Path(path) / weights.name).stat().st_ino == weights.stat().st_ino
    assert AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers > 0
    # Ray's Train state API (the state actor the dashboard serves /api/train/v2/runs from) shows the one
    # long-lived run and its two workers; user metrics are not part of its schema in Ray 2.60, only of the
    # checkpoints above.
    from ray.train.v2._internal.state.state_actor import get_state_actor

    state = get_state_actor()
    runs = [r for r in ray.get(state.get_train_runs.remote()).values() if r.name == "train" and r.status == "RUNNING"]
    (run,) = [r for r in runs if Path(r.run_settings.run_config.storage_path) == service.storage.parent]
    attempt = list(ray.get(state.get_train_run_attempts.remote())[run.id].values())[-1]
    assert len(attempt.workers) == 2


def test_gradient_checkpointing_lowers_a_ranks_peak_memory(service, tiny_model, tmp_path):
    # A deeper, wider model than tiny-random and long answers, so that activations, not the vocabulary-sized
    # logits (which checkpointing keeps), decide a rank's peak.
    config = AutoConfig.from_pretrained(tiny_model)
    config.update({"num_hidden_layers": 24, "hidden_size": 256, "intermediate_size": 1536})
    config.update({"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64})
    torch.manual_seed(0)
    deep = tmp_path / "deep"
    AutoModelForCausalLM.from_config(config).save_pretrained(deep)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(deep)
    rows = [{**r, "response": "The quick brown fox jumps over the lazy dog. " * 40} for r in ROWS]
    runs = {}
    for checkpointing in (False, True):
        name = f"memory-{checkpointing}"
        phase = spec(service, name, "sft", str(deep), training={"epochs": 1, "gradient_checkpointing": checkpointing})
        pq.write_table(pa.Table.from_pylist(rows), phase["data"])
        runs[checkpointing] = service.train(phase)
    plain, checkpointed = runs[False], runs[True]
    growth = {k: r["train_peak_rss_mib"] - r["rss_before_steps_mib"] for k, r in runs.items()}
    print(f"rank 0 memory growth during the steps: plain {growth[False]:.0f} MiB, checkpointed {growth[True]:.0f} MiB")
    # ~24 layers x ~9k floats per token x ~900 tokens per micro step are not kept: ~700 MiB by estimate (at 12
    # layers, 345 MiB less in one plain process's forward pass). 24, not 12: a rank's peak RSS moved by up to
    # ~250 MiB run to run (12 layers: plain 1267 vs checkpointed 1161 MiB in the suite, 1361 vs 988 in a rerun of it).
    assert growth[True] < growth[False] - 150
    # Same numerics: the recomputed activations are the ones it did not keep.
    assert checkpointed["steps"] == plain["steps"] == 3
    assert abs(checkpointed["final"]["loss"] - plain["final"]["loss"]) < 1e-4


def test_bf16_mixed_precision_follows_the_fp32_loss_curve(service, tiny_model):
    # A CPU rank's bf16 (bf16 compute over fp32 weights, stochastically rounded casts: training/precision.py; on a
    # GPU it is DeepSpeed's bf16) must train the same run as fp32: each optimizer step's loss within 2% (bf16 keeps
    # 8 bits of mantissa), and the same number of steps. SmolLM2 at a fine-tuning lr: tests/test_bf16_learns.py.
    def run(name, bf16):
        deepspeed = {**service.training["deepspeed"], "bf16": bf16}
        return service.train(spec(service, name, "sft", tiny_model, training={"deepspeed": deepspeed}))

    fp32, bf16 = run("curve-fp32", False), run("curve-bf16", True)
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16 compute, stochastic rounding, fp32 weights")
    assert len(fp32["losses"]) == len(bf16["losses"]) == 6
    assert fp32["losses"][-1] < fp32["losses"][0] - 0.5  # the curve really moves
    for step, (a, b) in enumerate(zip(fp32["losses"], bf16["losses"])):
        assert abs(a - b) <= 0.02 * a, (step, fp32["losses"], bf16["losses"])
    assert AutoConfig.from_pretrained(bf16["output"]).vocab_size  # the bf16 run saves a loadable folder too
    # It saves the fp32 master weights, not their bf16 rounding: updates below bf16's resolution survive the save.
    with safe_open(str(Path(bf16["output"]) / "model.safetensors"), "pt") as f:
        weight, saved = f.get_tensor("model.layers.0.mlp.down_proj.weight"), set(f.keys())
    with safe_open(str(Path(fp32["output"]) / "model.safetensors"), "pt") as f:
        assert saved == set(f.keys())  # the same tensors as any save (no non-persistent buffer vLLM cannot load)
    assert weight.dtype == torch.float32
    assert (weight != weight.to(torch.bfloat16).float()).float().mean() > 0.5


def test_zero2_and_plain_data_parallel_phases_after_zero3_run_unpartitioned_with_torchs_linear(service, tiny_model):
    # The ranks live across phases: a ZeRO-3 phase ran before (module order), and it swaps torch's linear for its
    # own Function process-wide. Stage 2 and stage 0 must neither partition parameters nor keep that swap.
    service.train(spec(service, "before-z3", "sft", tiny_model, training={"epochs": 1}))
    for stage in (2, 0):
        # bf16 on a CPU rank: bf16 compute over fp32 weights (training/precision.py) under each stage. DeepSpeed's own
        # bf16 (and its fp32-master paths: ZeRO-2's partitions, stage 0's optimizer groups) runs on GPU ranks only.
        deepspeed = {**service.training["deepspeed"], "zero_stage": stage, "bf16": True}
        before = mean_nll(tiny_model, ROWS)
        result = service.train(spec(service, f"zero{stage}", "sft", tiny_model, training={"deepspeed": deepspeed}))
        assert result["zero_stage"] == stage and result["local_param_fraction"] == 1.0
        assert result["linear_impl"].startswith("torch"), result["linear_impl"]
        assert mean_nll(result["output"], ROWS) < before - 0.5  # trains and saves a full HF folder
        with safe_open(str(Path(result["output"]) / "model.safetensors"), "pt") as f:
            weight = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        assert result["precision"] == "bf16 compute, stochastic rounding, fp32 weights"
        assert weight.dtype == torch.float32
        assert (weight != weight.to(torch.bfloat16).float()).float().mean() > 0.5  # the fp32 weights, not a bf16 copy


@pytest.mark.parametrize("stage", [2, 3])
def test_a_long_lived_ranks_memory_stays_flat_across_phases(service, tiny_model, stage):
    # One fit() serves every phase of a job: what a rank keeps of a finished phase (its engine's model, gradients
    # and fp32 optimizer state) piles up phase after phase. Each rank's RSS when the steps start, over 5 phases;
    # the first may still grow (allocator arenas, DeepSpeed's one-time buffers), the later ones must not.
    # Measured, rank 0, ZeRO-2: 763, 959, 1014, 1098, 1176 MiB when each phase's engine stayed alive; 767, 819,
    # 839, 849, 857 MiB with it destroyed and collected (training.worker.release_memory). ZeRO-3 kept every phase
    # past that through two process-wide references (training.worker.forget_zero3_engine): 886, 988, 1067, 1138,
    # 1219 MiB before they were dropped.
    deepspeed = {**service.training["deepspeed"], "zero_stage": stage}
    rss = []
    for i in range(5):
        phase = spec(
            service, f"flat-zero{stage}-{i}", "sft", tiny_model, training={"epochs": 1, "deepspeed": deepspeed}
        )
        rss.append(service.train(phase)["rss_before_steps_mib_by_rank"])
    by_rank = list(zip(*rss))
    print(
        f"ZeRO-{stage} RSS at the start of steps per phase, MiB: "
        + "; ".join(f"rank {rank} " + ", ".join(f"{v:.0f}" for v in values) for rank, values in enumerate(by_rank))
    )
    for rank, values in enumerate(by_rank):
        assert max(values[1:]) - values[1] < 80, (rank, values)


def test_one_rank_layout_takes_the_pools_optimizer_steps(service, tiny_model, tmp_path):
    # training.layout=one_rank: one rank with both CPUs runs the micro-batches planned for the pool's 2 ranks and
    # accumulates twice as many per optimizer step, at DeepSpeed stage 0 (auto: ZeRO partitions nothing over one
    # rank) where the 2 ranks run ZeRO-2. Same data, seed and settings as a 2-rank phase: the same step
    # count and the same weights, up to the order of the float sums (an update is ~lr = 2e-3 per step; a step that
    # averaged other sequences, or half as many, moves weights by about that much).
    config = load_config(
        None, [f"run.dir={tmp_path}", "run.id=one", "pools.train.replicas=2", "pools.train.num_cpus=1"]
    )
    assert config.training.layout == "auto"
    one = TrainingService(config)
    try:
        assert (one.layout.name, one.layout.ranks, one.layout.threads) == ("one_rank", 1, 2)
        assert one.layout.reason.startswith("auto: one machine (embedded Ray)")
        # fp32: there the order of the float sums is the only difference. In bf16 (the default where the CPU has
        # it) the GEMMs over other batch splits round otherwise: measured 7.0e-4 apart of 7.0e-3 moved.
        zero2 = {"deepspeed": {**service.training["deepspeed"], "zero_stage": 2, "bf16": False}}
        pooled = service.train(spec(service, "layout-pool", "sft", tiny_model, training=zero2))
        single = one.train({**spec(service, "layout-one", "sft", tiny_model, training=zero2)})
    finally:
        one.shutdown()
    assert (
        single["layout"]["ranks"] == 1
        and single["layout"]["grad_accum"] == 2
        and single["layout"]["name"] == "one_rank"
        and single["layout"]["zero_stage"] == 0  # auto's one rank: DeepSpeed stage 0 for the spec's ZeRO-2
    )
    assert pooled["layout"]["ranks"] == 2 and pooled["layout"]["grad_accum"] == 1
    assert pooled["layout"]["zero_stage"] == 2
    assert single["steps"] == pooled["steps"] == 6 and single["train_tokens"] == pooled["train_tokens"]
    weights = {}
    for name, result in (("pool", pooled), ("one", single)):
        with safe_open(str(Path(result["output"]) / "model.safetensors"), "pt") as f:
            weights[name] = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(Path(tiny_model) / "model.safetensors"), "pt") as f:
        start = {k: f.get_tensor(k) for k in f.keys()}
    moved = max((weights["pool"][k] - start[k]).abs().max().item() for k in start)
    apart = max((weights["pool"][k] - weights["one"][k]).abs().max().item() for k in start)
    print(f"one rank vs 2 ranks, same phase: weights moved up to {moved:.2e}, apart up to {apart:.2e}")
    assert moved > 5e-3, moved
    assert apart < 1e-4, (apart, moved)


def test_lr_schedule_is_transformers_get_scheduler():
    from transformers import get_scheduler

    from training.worker import lr_scheduler

    def lrs(schedule):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = lr_scheduler(optimizer, total_steps=10, warmup_ratio=0.2, schedule=schedule)
        out = []
        for _ in range(10):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    linear = lrs("linear")
    assert linear[:3] == [0.0, 0.5, 1.0] and linear[-1] == pytest.approx(0.125)  # 2 warmup steps, then to 0
    assert lrs("constant") == [0.0, 0.5] + [1.0] * 8
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    assert lrs("cosine")[3] == pytest.approx(reference.lr_lambdas[0](3))


# -- LoRA adapters (training.peft, training/adapters.py) ----------------------------------------------------------

LORA = {"enabled": True, "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "target_modules": ["all-linear"]}
LORA["modules_to_save"] = []


def logits(model, rows: list[dict], tok) -> torch.Tensor:
    ids = torch.tensor([render_prompt(tok, rows[0]["messages"]) + response_ids(tok, rows[0]["response"])])
    with torch.no_grad():
        return model(ids).logits.float()


def expected_parameter_counts(model_path: str) -> tuple[int, int]:
    """What peft itself counts for the tiny model with LORA: (trainable, all parameters)."""
    from peft import get_peft_model

    from training.adapters import lora_config

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return get_peft_model(base, lora_config(LORA)).get_nb_trainable_parameters()


@pytest.fixture(scope="module")
def lora_phases(service, tiny_model):
    """A LoRA SFT phase under ZeRO-3 and one under ZeRO-2, both with gradient checkpointing."""
    out = {}
    for stage in (3, 2):
        deepspeed = {**service.training["deepspeed"], "zero_stage": stage}
        training = {"peft": LORA, "gradient_checkpointing": True, "deepspeed": deepspeed, "lr": 1e-2}
        out[stage] = service.train(spec(service, f"lora-zero{stage}", "sft", tiny_model, training=training))
    return out


@pytest.mark.parametrize("stage", [3, 2])
def test_lora_trains_only_the_adapter_and_saves_it_beside_the_merged_model(lora_phases, tiny_model, stage):
    from peft import PeftModel

    result = lora_phases[stage]
    assert result["zero_stage"] == stage
    assert (result["trainable_parameters"], result["total_parameters"]) == expected_parameter_counts(tiny_model)
    assert result["trainable_parameters"] < 0.01 * result["total_parameters"]
    assert mean_nll(result["output"], ROWS) < mean_nll(tiny_model, ROWS) - 0.3  # the merged model learnt
    # The adapter folder loads with PeftModel.from_pretrained on its base, and computes what the merged folder does.
    assert result["adapter"] == str(Path(result["output"]) / "adapter")
    tok = AutoTokenizer.from_pretrained(result["output"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    untouched = logits(base, ROWS, tok)
    with_adapter = PeftModel.from_pretrained(base, result["adapter"]).eval()
    assert with_adapter.peft_config["default"].base_model_name_or_path == tiny_model
    merged = AutoModelForCausalLM.from_pretrained(result["output"], dtype=torch.float32).eval()
    assert (logits(with_adapter, ROWS, tok) - untouched).abs().max() > 0.1  # the adapter changes the model
    assert (logits(with_adapter, ROWS, tok) - logits(merged, ROWS, tok)).abs().max() < 1e-4
    with safe_open(str(Path(result["output"]) / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert not [n for n in names if "lora" in n or "base_layer" in n]  # a plain HF folder (vLLM, serving.app)
    assert torch.equal(embedding, base.get_input_embeddings().weight.float())  # not a target: unchanged


def test_lora_phase_killed_mid_way_resumes_from_its_checkpoint(service, tiny_model):
    training = {"peft": LORA, "checkpoint_every": 2, "lr": 1e-2}
    straight = service.train(spec(service, "lora-straight", "sft", tiny_model, training=training))
    # Rank 0 dies right after the phase's first checkpoint (a tag without the frozen base); the restarted group
    # resumes from it: same optimizer steps, same losses, and the same merged model.
    resumed = service.train(spec(service, "lora-crashing", "sft", tiny_model, training=training))
    assert resumed["resumed_from_tag"] == "step2" and resumed["resumed_from_micro_step"] > 0
    assert resumed["steps"] == straight["steps"] == 6
    assert resumed["final"]["loss"] == pytest.approx(straight["final"]["loss"], abs=1e-3)
    assert mean_nll(resumed["output"], ROWS) == pytest.approx(mean_nll(straight["output"], ROWS), abs=1e-3)


def test_lora_spin_reference_is_model_t_with_its_adapter(service, lora_phases):
    """SPIN iteration t with LoRA starts from model t's merged folder (model t's adapter in it) with a fresh adapter:
    the precomputed reference log-probs are model t's own, and the phase trains (reward margin > 0)."""
    model_t = lora_phases[3]["output"]
    result = service.train(
        spec(service, "lora-spin", "spin", model_t, beta=0.5, loss_type="sigmoid", training={"peft": LORA, "lr": 1e-2})
    )
    reference = json.loads((service.root / "lora-spin" / "reference_logps.json").read_text())
    tok = AutoTokenizer.from_pretrained(model_t)
    model = AutoModelForCausalLM.from_pretrained(model_t, dtype=torch.float32).eval()
    for row in ROWS:
        for side, field in enumerate(("chosen", "rejected")):
            prompt, answer = render_prompt(tok, row["messages"]), response_ids(tok, row[field])
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logps = model(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
            expected = logps.gather(-1, ids[0, len(prompt) :, None]).sum().item()
            assert reference[row["id"]][side] == pytest.approx(expected, abs=1e-3), (row["id"], field)
    assert result["final"]["reward_margin"] > 0 and result["adapter"]
