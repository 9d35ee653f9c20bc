"""Losses as pure tensor functions (no model, no distributed state).

- ``sft_loss``: token NLL on response tokens only; prompt and padding carry label -100.
- ``sequence_logps``: summed log-probs of the labelled tokens of each sequence (DPO/SPIN bookkeeping).
- ``loss_window``: the trailing positions those read logits at, so the LM head skips the batch's common prompt.
- ``spin_loss``: SPIN (arXiv 2401.01335, official trainer): with
  m = (logπθ(y_real) − logπref(y_real)) − (logπθ(y_gen) − logπref(y_gen)),
  sigmoid: −logsigmoid(β·m); hinge: relu(1 − β·m). Chosen = the gold ("real") answer, rejected = the
  model's own ("generated") answer, reference = the model the iteration starts from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def loss_window(labels: torch.Tensor) -> int:
    """How many trailing positions of a right-padded batch the loss reads logits at: from the one before the batch's
    first label to the end (the model's ``logits_to_keep``). Prompt positions before it need no LM head and no
    log-softmax over the vocabulary; the loss over ``labels[:, -window:]`` is the same. The whole width where
    nothing is labelled."""
    labelled = (labels[:, 1:] != IGNORE).any(0).nonzero()
    width = labels.shape[1]
    return width if not len(labelled) else width - int(labelled[0])


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's logits with token t+1."""
    return logits[:, :-1, :], labels[:, 1:]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labels (0 where masked) and the mask."""
    logits, labels = shifted(logits, labels)
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean NLL over all response tokens of the batch, and the number of tokens it averaged."""
    logps, mask = token_logps(logits, labels)
    n_tokens = int(mask.sum())
    return -(logps.sum() / max(n_tokens, 1)), n_tokens


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logps, _ = token_logps(logits, labels)
    return logps.sum(-1)


def spin_loss(
    policy_real: torch.Tensor,
    policy_gen: torch.Tensor,
    ref_real: torch.Tensor,
    ref_gen: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair SPIN losses and the implicit rewards β·(logπθ − logπref) of real and generated answers."""
    margin_logits = (policy_real - ref_real) - (policy_gen - ref_gen)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin_logits)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin_logits)
    else:
        raise ValueError(f"spin.loss_type: unknown loss type {loss_type!r}")
    reward_real = beta * (policy_real - ref_real).detach()
    reward_gen = beta * (policy_gen - ref_gen).detach()
    return losses, {
        "reward_real": reward_real,
        "reward_generated": reward_gen,
        "reward_margin": reward_real - reward_gen,
        "reward_accuracy": (reward_real > reward_gen).float(),
    }
