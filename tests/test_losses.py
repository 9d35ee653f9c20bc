import math
import random

import pytest
import torch

from training.losses import IGNORE, sequence_logps, sft_loss, spin_loss
from training.sequences import deal, micro_batches


def test_sft_loss_hand_computed():
    # vocab 2, uniform logits -> every token costs log 2; only the labelled (response) token counts.
    logits = torch.zeros(1, 3, 2)
    labels = torch.tensor([[IGNORE, 1, IGNORE]])
    loss, n = sft_loss(logits, labels)
    assert n == 1 and loss.item() == pytest.approx(math.log(2))
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [0.0, 0.0]]])
    labels = torch.tensor([[IGNORE, 0, 1]])  # position 0 predicts token 0 (p=.5), position 1 predicts 1 (p=.75)
    loss, n = sft_loss(logits, labels)
    assert n == 2 and loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2, rel=1e-6)


def test_masked_positions_get_zero_gradient():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, 2, IGNORE, IGNORE]])
    loss, _ = sft_loss(logits, labels)
    loss.backward()
    # position t's logits predict label t+1: only positions whose next label is real get gradient.
    assert torch.all(logits.grad[0, [0, 3, 4]] == 0) and torch.any(logits.grad[0, 1] != 0)
    assert torch.all(logits.grad[1, [2, 3, 4]] == 0) and torch.any(logits.grad[1, 0] != 0)


def test_sequence_logps():
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[IGNORE, 2, 3]])
    assert sequence_logps(logits, labels).item() == pytest.approx(2 * math.log(0.25))


def test_spin_loss_hand_computed():
    real, gen = torch.tensor([-10.0]), torch.tensor([-12.0])
    ref_real, ref_gen = torch.tensor([-11.0]), torch.tensor([-11.0])
    # m = (-10 + 11) - (-12 + 11) = 2; beta 0.5 -> -logsigmoid(1)
    losses, stats = spin_loss(real, gen, ref_real, ref_gen, beta=0.5)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    assert stats["reward_real"].item() == pytest.approx(0.5) and stats["reward_generated"].item() == pytest.approx(-0.5)
    assert stats["reward_accuracy"].item() == 1.0
    hinge, _ = spin_loss(real, gen, ref_real, ref_gen, beta=0.25, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.5)  # relu(1 - 0.25 * 2)
    at_start, _ = spin_loss(ref_real, ref_gen, ref_real, ref_gen, beta=0.1)
    assert at_start.item() == pytest.approx(math.log(2))  # policy == reference


def test_micro_batches_respect_size_and_token_budget_and_ranks_stay_in_step():
    lengths = [10, 50, 20, 30, 40, 10, 60]
    batches = micro_batches(7, lengths, micro_batch_size=3, max_tokens=100, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= 100 for b in batches)
    plans = [deal(batches, r, 2) for r in range(2)]
    assert len(plans[0]) == len(plans[1])
    real = [i for plan in plans for b, w in plan if w for i in b]
    assert sorted(real) == list(range(7))  # zero-weight padding never double-counts an example


def test_length_grouped_batches_pad_less_and_give_the_ranks_of_a_step_equal_work():
    rng = random.Random(1)
    lengths = [rng.randint(40, 400) for _ in range(256)]

    def cost(grouped: bool) -> tuple[int, int, list[int]]:
        batches = micro_batches(256, lengths, 4, 0, seed=3, epoch=1, group_by_length=grouped, ranks=2)
        padded = [max(lengths[i] for i in b) * len(b) for b in batches]
        plans = [deal(batches, r, 2) for r in range(2)]
        # a micro step lasts as long as its slowest rank's batch
        step_cost = sum(max(padded[batches.index(a)], padded[batches.index(b)]) for (a, _), (b, _) in zip(*plans))
        return sum(padded), step_cost, sorted(i for b in batches for i in b)

    random_pad, random_steps, random_items = cost(False)
    grouped_pad, grouped_steps, grouped_items = cost(True)
    assert grouped_items == random_items == list(range(256))  # every example once per epoch
    assert grouped_pad < 0.8 * random_pad and grouped_steps < 0.8 * random_steps, (random_steps, grouped_steps)
    first = micro_batches(256, lengths, 4, 0, seed=3, epoch=1, group_by_length=True, ranks=2)
    assert first == micro_batches(256, lengths, 4, 0, seed=3, epoch=1, group_by_length=True, ranks=2)  # resumable
    widths = [max(lengths[i] for i in b) for b in first]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # steps shuffled, not long-to-short


@pytest.mark.parametrize("kind", ["sft", "pairs"])
def test_the_lm_head_over_the_loss_window_only_gives_the_same_loss_and_gradients(tiny_model, kind):
    """A rank computes logits only over the batch's trailing loss window (training.losses.loss_window, the model's
    logits_to_keep): the prompt positions every row has skip the LM head and the log-softmax over the vocabulary.
    The loss and every parameter's gradient must be those of the full logits (fp32: up to the LM head GEMM's
    summation order)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.losses import loss_window
    from training.sequences import TruncationReport, build_sequence, collate
    from training.worker import PhaseRunner

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    report = TruncationReport()
    rows = [("a long question " * 9, "short."), ("q?", "a longer answer " * 5), ("mid question " * 4, "an answer")]
    sequences = [
        build_sequence(tokenizer, f"r{i}", [{"role": "user", "content": q}], a, 512, 256, report)
        for i, (q, a) in enumerate(rows)
    ]
    batch = collate(sequences, tokenizer.pad_token_id)
    width = batch["labels"].shape[1]
    assert 1 < loss_window(batch["labels"]) < width - 10  # the shortest prompt's positions are skipped

    def run(keeps_logits: bool):
        runner = object.__new__(PhaseRunner)  # only what _logits reads: the model's support and no bf16 compute
        runner.keeps_logits, runner.compute = keeps_logits, None
        model.zero_grad()
        logits, labels = runner._logits(model, batch)
        value = sft_loss(logits, labels)[0] if kind == "sft" else sequence_logps(logits, labels)
        (value if kind == "sft" else value.sum()).backward()
        return logits.shape[1], value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    full, windowed = run(False), run(True)
    assert full[0] == width and windowed[0] == loss_window(batch["labels"])
    assert torch.allclose(windowed[1], full[1], rtol=1e-6, atol=1e-6), (windowed[1], full[1])
    for name, grad in full[2].items():
        assert torch.allclose(windowed[2][name], grad, rtol=1e-5, atol=1e-7), name
