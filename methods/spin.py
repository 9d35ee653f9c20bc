"""SPIN data construction (arXiv 2401.01335): gold answer = chosen ("real"), own answer = rejected; and the
paper's mechanism measured on held-out prompts (implicit rewards of real vs generated answers)."""

from __future__ import annotations


def beta_for(iteration: int, betas: list[float]) -> float:
    """β of iteration t, counted from 0 as the paper does; the last configured value repeats (paper: 0.1, raised
    to 5.0 at iteration 3, so [0.1, 0.1, 0.1, 5.0])."""
    return betas[min(iteration, len(betas) - 1)]


def lr_for(iteration: int, lrs: list[float]) -> float | None:
    """Peak lr of iteration t (last value repeats; paper: 5e-7 for iterations 0-1, then 1e-7); None when no list
    is configured, so the preference phases' lr applies."""
    return lrs[min(iteration, len(lrs) - 1)] if lrs else None


def sft_examples(rows: list[dict]) -> list[dict]:
    """Gold answers as SFT targets: the SFT'd starting point SPIN assumes."""
    return [
        {"id": r["id"], "source_id": r["id"], "messages": r["messages"], "response": r["reference"]}
        for r in rows
        if r["reference"]
    ]


def build_pairs(rows: list[dict], generations: dict[str, dict], iteration: int) -> list[dict]:
    """One pair per prompt that has both a gold answer and a generation; ids stay tied to the source row."""
    pairs = []
    for row in rows:
        generated = generations.get(row["id"])
        if generated is None or not row["reference"]:
            continue
        pairs.append(
            {
                "id": f"{row['id']}@{iteration}",
                "source_id": row["id"],
                "iteration": iteration,
                "messages": row["messages"],
                "chosen": row["reference"],
                "rejected": generated["response"],
            }
        )
    return pairs


def training_pairs(current: list[dict], previous: list[dict], mix_previous: bool) -> list[dict]:
    """Iteration t's pairs, plus iteration t-1's when mixing (the official code's data schedule)."""
    return current + (previous if mix_previous else [])


def sequence_scores(token_logprobs: dict[str, list[float]]) -> dict[str, tuple[float, int]]:
    """{row id: (log-prob of the whole answer, its token count)} from per-token log-probs."""
    return {k: (float(sum(v)), len(v)) for k, v in token_logprobs.items()}


def logprob_per_token(scores: dict[str, tuple[float, int]]) -> float:
    """Mean log-likelihood per token over all answers (token-weighted: a long answer counts by its tokens)."""
    tokens = sum(n for _, n in scores.values())
    return sum(lp for lp, _ in scores.values()) / tokens if tokens else float("nan")


def reward_metrics(
    policy_real: dict[str, tuple[float, int]],
    ref_real: dict[str, tuple[float, int]],
    policy_generated: dict[str, tuple[float, int]],
    ref_generated: dict[str, tuple[float, int]],
    beta: float,
) -> dict[str, float]:
    """SPIN's implicit rewards on prompts scored by the trained model (policy) and the model it started from
    (reference, the opponent): reward = β·(log π_θ(y|x) − log π_ref(y|x)) of the gold answer (real) and of the
    opponent's own answer (generated), as the training loss computes them. Means over the prompts all four
    scores cover: reward_real, reward_generated, reward_margin (real − generated) and reward_accuracy (fraction
    with real > generated; the loss pushes it up)."""
    ids = sorted(set(policy_real) & set(ref_real) & set(policy_generated) & set(ref_generated))
    if not ids:
        return {"n": 0}
    real = [beta * (policy_real[i][0] - ref_real[i][0]) for i in ids]
    generated = [beta * (policy_generated[i][0] - ref_generated[i][0]) for i in ids]
    return {
        "n": len(ids),
        "reward_real": sum(real) / len(ids),
        "reward_generated": sum(generated) / len(ids),
        "reward_margin": sum(r - g for r, g in zip(real, generated)) / len(ids),
        "reward_accuracy": sum(r > g for r, g in zip(real, generated)) / len(ids),
    }
