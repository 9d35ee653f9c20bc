"""bf16 compute over fp32 weights on the CPU, with stochastically rounded weight casts.

Design note (measured, 2-core AMD EPYC AVX-512 + avx512_bf16, SmolLM2-135M-Instruct, 64 SST-2 rows with their labels
as answers, AdamW lr 1e-5 cosine, batch 8, 16 steps; NOTES.md "bf16 on the CPU: the cause"): why bf16 "did not
learn" here. bf16 keeps 8 bits of mantissa, so a weight w moves in its bf16 copy only when its fp32 master has moved
by ~|w|/256. A fine-tuning step moves each weight by about lr (Adam), far less: after the first step only 1.8% of
the Linear weights' bf16 values had changed. The forward (DeepSpeed's bf16 copy, or autocast's cast, both round to
nearest) therefore keeps seeing the starting model while the master weights move: the loss after one step was 0.759
(fp32: 0.343), and training runs open-loop on stale gradients until enough updates pile up: its loss stayed 1.4-3.4x
fp32's at every later step. Whether that ends well depends on the budget: here it still reached 0.82 (fp32 0.83); on
2026-11-26 the same setting gave the label prior (0.50). Rounding each weight cast *stochastically* (up with
probability equal to the dropped fraction) makes the bf16 weight an unbiased estimate of the fp32 master, so every
update reaches the forward in expectation: the loss then followed fp32's within 2.2% over the first 8 steps (0.342
after one step) and within 7% over all 16 (the losses fall to ~0.12, where the rounding noise is a larger share),
accuracy 0.83 with 0.47 answered positive, as fp32; the 16 steps took 76 s against fp32's 135.5 s (round-to-nearest
autocast: 63 s).

What runs: the model keeps fp32 weights (DeepSpeed runs fp32: its master weights are the weights), every
``nn.Linear`` multiplies in bf16 with a stochastically rounded copy of its weight (``Bf16Compute.attach``), and
the rest of the forward runs under ``torch.autocast('cpu', bf16)``. Gradients: bf16 GEMMs, accumulated into the fp32
weight's grad.

One draw per optimizer step: the weights change only when the optimizer steps, so every micro step of a step (a
one-rank layout runs ``grad_accum x replicas`` of them) and gradient checkpointing's recompute reuse that step's
rounded copy, as DeepSpeed's bf16 mode refreshes its bf16 weights once per step. The draw is keyed by (seed,
optimizer step, layer), so a phase resumed from a step's checkpoint draws the same rounding. Memory: the copies
were already all alive at the peak (each forward saves its layer's copy for backward); they now also stay alive
between micro steps. The draw was ~20% of a bf16 step when it ran per forward and again in the recompute (NOTES.md:
"bf16 on the CPU: the cause" and "Training on the Xeon").

The noise is 16 bits of a counter hash of (key, element index), one fused loop per weight (torch.compile, dynamic
sizes), not torch's Mersenne Twister: that generator runs on one thread, and drew 32 bits per weight in a separate
pass. Rounding all 134.5M Linear weights of SmolLM2 took 0.574 s with it and 0.167 s fused, on the 2-core Xeon (AMX):
about 10% of a one-rank bf16 step of the bench (NOTES.md "The loss window and the fused rounding"). The hash is a
pure function of its key, so a resumed phase, another machine or the eager fallback draws the same bits.

Frozen weights (a LoRA phase's base model) never move, so there is no update for rounding to hide: they are
rounded once, to nearest (what a bf16 inference engine computes with), and kept; and their backward skips the
weight-gradient GEMM nobody reads. Measured on the 2-core Xeon (AMX), SmolLM2 LoRA r 16 all-linear, 2 micro steps
of 4 x 256 tokens per step: 6.13 s a step with the base redrawn each step and its weight gradients computed, 5.18
without the gradients, 4.50 with the base rounded once as well (1.36x).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (Wellons' lowbias32) of int64 values below 2^32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _round_bits(bits: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Flat fp32 bit patterns (int32) -> bf16, each value's dropped low 16 bits compared with 16 bits of a counter
    hash of (key, element index): the noise is a pure function of its key, so any machine, thread count or
    compiler gives the same draw."""
    index = torch.arange(bits.numel(), dtype=torch.int64, device=bits.device) & _MASK32
    noise = _mix32(_mix32(index ^ key[0]) ^ key[1]) >> 16
    return ((bits.to(torch.int64) + noise) & -65536).to(torch.int32).view(torch.float32).to(torch.bfloat16)


_compiled_round_bits = None


def _round_bits_fast(bits: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``_round_bits`` as one fused loop (torch.compile, dynamic sizes: one kernel for every layer): the same bits as
    eager. Where compiling fails (no C++ compiler) it stays eager, ~10x slower, and says so once."""
    global _compiled_round_bits
    if _compiled_round_bits is None:
        try:
            compiled = torch.compile(_round_bits, dynamic=True)
            compiled(torch.zeros(8, dtype=torch.int32), torch.zeros(2, dtype=torch.int64))  # compile now, or fail here
            _compiled_round_bits = compiled
        except Exception as err:  # noqa: BLE001 (inductor's errors have no common base): eager gives the same bits
            logging.getLogger(__name__).warning("stochastic rounding runs eager (torch.compile failed: %s)", err)
            _compiled_round_bits = _round_bits
    return _compiled_round_bits(bits, key)


def stochastic_round_bf16(weight: torch.Tensor, key: int = 0) -> torch.Tensor:
    """fp32 -> bf16, rounding each value's magnitude up with probability (dropped low 16 bits) / 2^16: unbiased,
    E[result] = weight. Adding the noise to the bit pattern carries into the exponent where it should. ``key`` (any
    int, 64 bits used) names the draw: the same key and weight give the same result."""
    halves = torch.tensor([key & _MASK32, (key >> 32) & _MASK32], dtype=torch.int64)
    bits = weight.detach().contiguous().view(-1).view(torch.int32)
    return _round_bits_fast(bits, halves).view(weight.shape)


class _StochasticBf16LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rounded):
        xb = x.to(torch.bfloat16)
        ctx.save_for_backward(xb, rounded)
        ctx.has_bias = bias is not None
        return F.linear(xb, rounded, None if bias is None else bias.to(torch.bfloat16))

    @staticmethod
    def backward(ctx, grad):
        xb, rounded = ctx.saved_tensors
        gb = grad.to(torch.bfloat16)
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_x = gb @ rounded if needs_x else None
        # a frozen weight (LoRA's base) gets no gradient: skipping its GEMM saves a third of that layer's work
        grad_w = (gb.reshape(-1, gb.shape[-1]).t() @ xb.reshape(-1, xb.shape[-1])).float() if needs_w else None
        grad_b = gb.reshape(-1, gb.shape[-1]).float().sum(0) if ctx.has_bias and needs_b else None
        return grad_x, grad_w, grad_b, None


class Bf16Compute:
    """bf16 matmuls over a model's fp32 weights. ``attach`` swaps every Linear's forward; ``optimizer_step(n)`` says
    which step the next forwards belong to (a new step draws new roundings; forwards within a step reuse them);
    ``autocast()`` wraps a forward. ``rounding='nearest'`` is plain autocast (the weights rounded to nearest per
    forward), kept to measure against."""

    def __init__(self, seed: int, rounding: str = "stochastic"):  # rounding: training.deepspeed.bf16_rounding
        self.seed, self.rounding, self.step = seed, rounding, 0
        self._rounded: dict[int, torch.Tensor] = {}  # layer index -> this step's bf16 copy of its weight
        self._frozen: dict[int, torch.Tensor] = {}  # layer index -> the bf16 copy of a frozen weight, for good

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.rounding == "nearest":
            return model
        for index, module in enumerate(m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            module.forward = self._forward(module, index)
        return model

    def _forward(self, module: torch.nn.Linear, index: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
                return F.linear(x, module.weight, module.bias)  # an fp32 pass (SPIN's reference): no rounding
            if not module.weight.requires_grad:  # a frozen weight (LoRA's base) never moves: round it once, to nearest
                rounded = self._frozen.get(index)
                if rounded is None:
                    rounded = self._frozen[index] = module.weight.detach().to(torch.bfloat16)
                return _StochasticBf16LinearFn.apply(x, module.weight, module.bias, rounded)
            rounded = self._rounded.get(index)
            if rounded is None:
                key = hash((self.seed, self.step, index)) & (2**64 - 1)  # ints' hash: the same in every process
                rounded = self._rounded[index] = stochastic_round_bf16(module.weight, key)
            return _StochasticBf16LinearFn.apply(x, module.weight, module.bias, rounded)

        return forward

    def optimizer_step(self, step: int) -> None:
        """The optimizer step (1-based) the next forwards belong to; a new one drops the last step's copies."""
        if step != self.step:
            self.step, self._rounded = step, {}

    @staticmethod
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)
