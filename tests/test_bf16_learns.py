"""bf16 on the CPU learns like fp32 (training/precision.py), on the real model: SmolLM2-135M-Instruct SFT on SST-2
labels at a fine-tuning learning rate, the setting in which bf16 with round-to-nearest weights once learnt only the
label prior. Plain PyTorch with the ranks' own loss and bf16 compute, so the numbers are the precision's alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from training.losses import loss_window, sft_loss
from training.precision import Bf16Compute, stochastic_round_bf16

native_bf16 = pytest.mark.skipif(
    not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
    reason="bf16 compute is the CPU default only where it is native (avx512_bf16 / AMX); emulated it is slow",
)


@pytest.fixture(scope="module")
def smollm2():
    from cluster.models import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    return path, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def sst2():
    from data.rows import BUILTIN

    rows = list(BUILTIN["sst2"]())
    return rows[:64], rows[200:300]


def encode(tok, row, answer):
    prompt = tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(row["messages"] + [{"role": "assistant", "content": answer}], tokenize=False)
    return tok(full, add_special_tokens=False)["input_ids"], len(tok(prompt, add_special_tokens=False)["input_ids"])


def sft(path, tok, rows, precision: str, steps: int, seed: int = 0):
    """Per-step losses of AdamW lr 1e-5 (cosine), batch 8, over ``rows`` in a seeded order; and the model."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    compute = None
    if precision != "fp32":
        compute = Bf16Compute(seed, precision)
        compute.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    data = [encode(tok, r, r["label"]) for r in rows]
    generator = torch.Generator().manual_seed(seed)
    order = [
        i for _ in range(-(-steps * 8 // len(data))) for i in torch.randperm(len(data), generator=generator).tolist()
    ]
    losses = []
    for step in range(steps):
        batch = [data[i] for i in order[step * 8 : (step + 1) * 8]]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((8, width), tok.pad_token_id)
        mask, labels = torch.zeros_like(input_ids), torch.full_like(input_ids, -100)
        for k, (ids, prompt_len) in enumerate(batch):
            input_ids[k, : len(ids)], mask[k, : len(ids)] = torch.tensor(ids), 1
            labels[k, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
        if compute is not None:
            compute.optimizer_step(step + 1)
        window = loss_window(labels)  # logits only where the loss reads them, as the ranks compute them
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute is not None):
            logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=window).logits
        loss, _ = sft_loss(logits, labels[:, -window:])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model


def label_accuracy(model, tok, rows, batch: int = 50) -> tuple[float, float]:
    """Accuracy by each label's log-likelihood (an fp32 forward of every (row, label) sequence, right-padded in
    batches of similar length), and the fraction answered 'positive'. The LM head and log-softmax run only at the
    label tokens' positions: the rest of the vocabulary projection (49k words at every position, padding included)
    was most of this function's time."""
    labels = ("negative", "positive")
    label_ids = {label: tok(label, add_special_tokens=False)["input_ids"] for label in labels}
    encoded = [(i, label, *encode(tok, row, label)) for i, row in enumerate(rows) for label in labels]
    encoded.sort(key=lambda e: len(e[2]))  # similar lengths together: little padding
    scores: dict[tuple[int, str], float] = {}
    model.eval()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    for first in range(0, len(encoded), batch):
        chunk = encoded[first : first + batch]
        width = max(len(ids) for _, _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), tok.pad_token_id)
        mask = torch.zeros_like(input_ids)
        for k, (_, _, ids, _) in enumerate(chunk):
            input_ids[k, : len(ids)], mask[k, : len(ids)] = torch.tensor(ids), 1
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            hidden = decoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
            for k, (i, label, ids, prompt_len) in enumerate(chunk):
                n = len(label_ids[label])
                logps = head(hidden[k, prompt_len - 1 : prompt_len - 1 + n]).float().log_softmax(-1)
                targets = torch.tensor(ids[prompt_len : prompt_len + n])
                scores[i, label] = logps.gather(-1, targets[:, None]).sum().item()
    answers = [labels[int(scores[i, "positive"] > scores[i, "negative"])] for i in range(len(rows))]
    correct = sum(answer == row["label"] for answer, row in zip(answers, rows))
    return correct / len(rows), answers.count("positive") / len(rows)


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    weight = torch.full((200_000,), 1.0 + 2**-10)  # an eighth of the way between two bf16 values (spacing 2^-7)
    rounded = stochastic_round_bf16(weight, 0).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(rounded.mean().item() - weight[0].item()) < 2e-5
    assert weight.to(torch.bfloat16).float().unique().tolist() == [1.0]  # nearest: the update is gone
    signs = torch.tensor([-3.0001, 3.0001, -0.5, 1e-30])
    assert torch.equal(stochastic_round_bf16(signs).float().sign(), signs.sign())
    # every fraction rounds up as often as it says, in every layer's draw (the key), not only on average
    fractions = torch.arange(1, 16) / 16
    grid = (1.0 + fractions[:, None] * 2**-7).expand(15, 40_000).contiguous()
    for key in (1, 2**40 + 7):
        up = (stochastic_round_bf16(grid, key).float() > 1.0).float().mean(1)
        torch.testing.assert_close(up, fractions, rtol=0, atol=0.01)


def test_the_rounding_is_a_pure_function_of_its_key_and_the_fused_loop_gives_eager_bits():
    """A phase resumed from a checkpoint, on another machine or thread count, draws the same rounding: the noise is
    a counter hash of (key, index); torch.compile's fused loop must give exactly the eager function's bits."""
    from training import precision
    from training.precision import _round_bits

    weight = torch.randn(3, 1000, 577)  # not a multiple of any vector width
    bits = weight.view(-1).view(torch.int32)
    for key in (0, 12345, 2**63 + 5):
        halves = torch.tensor([key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF])
        fused = stochastic_round_bf16(weight, key)
        assert torch.equal(fused, _round_bits(bits, halves).view(weight.shape))
        assert torch.equal(fused, stochastic_round_bf16(weight, key))  # the same draw again
    assert not torch.equal(stochastic_round_bf16(weight, 1), stochastic_round_bf16(weight, 2))  # another draw
    assert precision._compiled_round_bits is not _round_bits  # the fused loop ran, not the eager fallback
    # each value lands on one of its two bf16 neighbours
    rounded = stochastic_round_bf16(weight, 9).float()
    below = weight.to(torch.bfloat16).float()
    spacing = (below.abs() * 2**-7).clamp_min(1e-38)
    assert ((rounded - weight).abs() <= spacing * 1.01).all()


@native_bf16
def test_bf16_loss_curve_follows_fp32_with_stochastic_rounding_not_with_nearest(smollm2, sst2):
    path, tok = smollm2
    fp32, _ = sft(path, tok, sst2[0], "fp32", steps=4)
    stochastic, _ = sft(path, tok, sst2[0], "stochastic", steps=4)
    nearest, _ = sft(path, tok, sst2[0], "nearest", steps=4)
    # The curve within 2% of fp32: its mean relative gap. One draw of the rounding moves single steps by more,
    # either way: on the AVX-512 EPYC, -2.3% to +3.8% at single steps over 3 other draws x 6 steps and this one
    # (-2.27% at step 2), each draw's mean within +-0.9% (NOTES.md "Issue 32 on the AVX-512 EPYC").
    # A step beyond 5% is no draw's noise.
    gaps = [(b - a) / a for a, b in zip(fp32, stochastic)]
    assert abs(sum(gaps) / len(gaps)) <= 0.02, (fp32, stochastic)
    assert max(map(abs, gaps)) <= 0.05, (fp32, stochastic)
    # Round-to-nearest hides the first update from the forward (measured 0.76 vs fp32's 0.34 after one step).
    assert nearest[1] > 1.2 * fp32[1], (fp32, nearest)


@native_bf16
def test_small_bf16_sft_learns_the_labels_not_the_prior(smollm2, sst2):
    path, tok = smollm2
    train, held_out = sst2
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base_accuracy, _ = label_accuracy(base, tok, held_out)
    losses, model = sft(path, tok, train, "stochastic", steps=16)
    accuracy, positive = label_accuracy(model, tok, held_out)
    # Measured: base 0.70, fp32 0.83 (0.47 positive), stochastic bf16 0.83 (0.47). The failure this guards against
    # answered 'positive' to 97% of the reviews (0.50).
    assert accuracy >= base_accuracy + 0.05 and accuracy >= 0.78, (base_accuracy, accuracy, losses)
    assert 0.25 <= positive <= 0.75, positive


def test_one_rounding_per_optimizer_step_shared_by_its_micro_steps_and_the_recompute():
    """Two micro steps of one optimizer step see the same bf16 weights, so their accumulated gradient is the gradient
    of the whole batch at once (as in fp32); gradient checkpointing's recompute reuses them too; the next step draws
    anew from the moved master weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    compute = Bf16Compute(seed=3)
    compute.attach(model)
    x = torch.randn(8, 64)

    def grads(micro_batches, checkpointed=False):
        model.zero_grad()
        for part in micro_batches:
            with compute.autocast():
                if checkpointed:
                    out = torch.utils.checkpoint.checkpoint(model, part, use_reentrant=False)
                else:
                    out = model(part)
            (out.float().sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    compute.optimizer_step(1)
    whole = grads([x])
    halves = grads([x[:4], x[4:]])
    recomputed = grads([x[:4], x[4:]], checkpointed=True)
    for a, b, c in zip(whole, halves, recomputed):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)  # bf16 GEMMs over other row splits
        torch.testing.assert_close(c, b, rtol=0, atol=0)  # the recompute rounds the weights as the forward did
    first = compute._rounded[0].clone()
    with torch.no_grad():
        model[0].weight.add_(1e-4)  # below bf16's spacing for most weights: only a new draw can show it
    compute.optimizer_step(1)
    assert torch.equal(compute._rounded[0], first)  # the same step: no new draw
    compute.optimizer_step(2)
    grads([x])
    assert not torch.equal(compute._rounded[0], first)
    moved = (compute._rounded[0].float() - first.float()).mean().item()
    assert 5e-5 < moved < 2e-4, moved  # unbiased: the mean bf16 weight moved by about the update (1e-4)


def test_a_frozen_weight_is_rounded_once_to_nearest_and_gets_no_gradient():
    """LoRA's base: a weight that never moves has no update for rounding to hide, so its bf16 copy is the nearest one,
    made once for the phase; its backward skips the weight-gradient GEMM, and the other gradients are as in fp32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.matmul.default)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    frozen, trained = torch.nn.Linear(32, 32), torch.nn.Linear(32, 1)
    frozen.weight.requires_grad_(False)
    model = torch.nn.Sequential(frozen, trained)
    x = torch.randn(4, 32, requires_grad=True)
    model(x).sum().backward()  # the fp32 reference, before the bf16 forwards replace it
    expected = {"x": x.grad.clone(), "frozen.bias": frozen.bias.grad.clone(), "trained.weight": trained.weight.grad}
    model.zero_grad()
    x.grad = None
    compute = Bf16Compute(seed=1)
    compute.attach(model)
    for step in (1, 2):
        compute.optimizer_step(step)
        with compute.autocast():
            out = model(x).float().sum()
        with CountMatmuls() as matmuls:
            out.backward()
        # grad_x of both layers and grad_w of the trained one; the frozen weight's GEMM is skipped (was 4)
        assert matmuls.count == 3, matmuls.count
        assert torch.equal(compute._frozen[0], frozen.weight.to(torch.bfloat16))  # nearest, the same every step
    assert sorted(compute._rounded) == [1]  # only the trained layer draws a stochastic rounding
    got = {"x": x.grad / 2, "frozen.bias": frozen.bias.grad / 2, "trained.weight": trained.weight.grad / 2}
    for name, value in expected.items():  # two backwards accumulated: half of it is one, up to bf16's rounding
        torch.testing.assert_close(got[name], value, rtol=3e-2, atol=3e-2, msg=name)
