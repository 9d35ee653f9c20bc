"""Ray Train + DeepSpeed ZeRO-3 on 2 CPU workers (gloo) with the tiny random model."""

from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engine import render_prompt, response_ids
from cluster.config import load_config
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
            "pools.train.max_restarts=1",
            "pools.train.env={SELFIMPROVE_CRASH_AFTER_CHECKPOINT: crashing}",
        ],
    )
    svc = TrainingService(config)
    svc.root = root
    svc.training = asdict(config.training)
    yield svc
    svc.shutdown()


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
    # Rank 0 dies right after its first checkpoint; Ray Train restarts the worker group (max_failures=1)
    # and the phase resumes from that checkpoint.
    resumed = service.train(spec(service, "crashing", "sft", tiny_model, training={"checkpoint_every": 2}))
    assert resumed["resumed_from_micro_step"] > 0
    assert resumed["steps"] == uninterrupted["steps"]
    assert abs(resumed["final"]["loss"] - uninterrupted["final"]["loss"]) < 0.05
