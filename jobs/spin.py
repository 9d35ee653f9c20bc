"""SPIN: self-play fine-tuning (arXiv 2401.01335), read top to bottom as the paper's algorithm.

model 0 = the base model, or SFT on the gold answers first (spin.sft_first: the paper starts from an SFT'd model)
for t = 0..T-1:
    the opponent (model t, frozen) answers every SFT prompt        -> generated answers
    pairs: (prompt, gold answer = real/chosen, own answer = rejected)
    model t+1 = train(model t, SPIN loss, reference = model t, β_t, lr_t) on pairs_t (+ pairs_{t-1})
    evaluate model t+1 on the held-out split
    (spin.heldout_rewards) on held-out prompts: gold log-likelihood under model t+1, and the implicit rewards of
    gold vs model t's own answers, β_t·(log π_{t+1} − log π_t): their margin and reward accuracy

With data.streaming the SFT prompts are a folder of Parquet blocks (data.streaming): generation, pairs and SFT
targets then run block by block (``ctl.per_block``), and the driver never holds the whole set.
"""

from __future__ import annotations

from configs.schema import phase_training
from jobs import lm_eval_phase, mt_bench_phase
from jobs.controller import Controller, main
from methods.spin import (
    beta_for,
    build_pairs,
    logprob_per_token,
    lr_for,
    reward_metrics,
    sequence_scores,
    sft_examples,
    training_pairs,
)


def spin(ctl: Controller) -> None:
    c = ctl.config
    train_rows, eval_rows = ctl.datasets()  # train_rows: a list, or the Blocks of a streamed data.train
    model = ctl.base_model
    if c.spin.sft_first:
        sft_training = phase_training(c, "sft", lr=c.training.sft.lr or c.spin.sft_lr)
        model = ctl.train(
            "sft",
            "sft",
            init_model=model,
            examples=ctl.per_block("sft-data", sft_examples, train_rows),
            training=sft_training,
            uses=[ctl.source(train_rows)],
        )
    ctl.evaluate("iter0/eval", eval_rows, model)
    scores = heldout_scores(ctl, 0, eval_rows, model) if c.spin.heldout_rewards else None
    previous_pairs: list[dict] = []
    for t in range(c.spin.iterations):
        ctl.use_generator_weights(model)
        generated = ctl.generate(f"iter{t}/generate", train_rows, ctl.sampling(c.generation, salt=t), iteration=t)
        pairs = ctl.per_block(f"iter{t}/pairs-data", build_pairs, train_rows, generated, iteration=t)
        ctl.record_rows(f"iter{t}/pairs", len(train_rows), len(pairs), "prompts", "pairs")
        ctl.run.table(f"samples/iter{t}/pairs", pairs, ["source_id", "chosen", "rejected"])
        model = ctl.train(
            f"iter{t}/spin",
            "spin",
            init_model=model,
            examples=training_pairs(pairs, previous_pairs, c.spin.mix_previous),
            # what the pairs are made of (W&B lineage): gold answers, this iteration's and the mixed-in generations
            uses=[ctl.source(train_rows), ctl.run.phase_file(f"iter{t}/generate")]
            + ([ctl.run.phase_file(f"iter{t - 1}/generate")] if previous_pairs and c.spin.mix_previous else []),
            training=phase_training(c, "preference", lr=lr_for(t, c.spin.lr)),
            beta=beta_for(t, c.spin.beta),
            loss_type=c.spin.loss_type,
        )
        ctl.evaluate(f"iter{t + 1}/eval", eval_rows, model)
        if scores is not None:
            scores = heldout_scores(ctl, t + 1, eval_rows, model, previous=scores, beta=beta_for(t, c.spin.beta))
        previous_pairs = pairs
    ctl.run.metric("final_model", model)
    lm_eval_phase.final(ctl, model)  # evaluation.lm_eval: standard benchmarks on the final model
    mt_bench_phase.final(ctl, model)  # evaluation.mt_bench: the final model against the earlier one


def heldout_scores(
    ctl: Controller, t: int, rows: list[dict], model: str, previous: dict | None = None, beta: float = 0.0
) -> dict:
    """Model t's log-probs of the held-out gold answers and of its own greedy eval answers (and of model t-1's,
    when there is a model t-1): ``iter<t>/heldout/gold_logprob_per_token``, and for t >= 1 the implicit rewards
    of iteration t-1 (reference model t-1, β of iteration t-1) under ``iter<t>/heldout/``."""
    by_id = {r["id"]: r for r in rows}

    def score(name: str, answers: dict[str, str]) -> dict[str, tuple[float, int]]:
        ctl.use_generator_weights(model)
        requests = [
            {"id": k, "messages": by_id[k]["messages"], "response": v} for k, v in answers.items() if k in by_id
        ]

        def scores() -> dict:
            logprobs = ctl.generator.score_all(requests)
            missing = {r["id"]: "not scored" for r in requests if r["id"] not in logprobs}
            ctl.run.account(f"iter{t}/heldout-{name}", missing, len(requests))
            return sequence_scores(logprobs)

        key = {"requests": requests, "model": ctl.run.model_key(model)}
        found = ctl.run.once(f"iter{t}/heldout-{name}", scores, key=key)
        return {k: tuple(v) for k, v in found.items()}

    own = {r["id"]: r["response"] for r in ctl.run.rows(f"iter{t}/eval-answers")}
    result = {"gold": score("gold", {r["id"]: r["reference"] for r in rows}), "own": score("own", own)}
    ctl.run.metric(f"iter{t}/heldout/gold_logprob_per_token", round(logprob_per_token(result["gold"]), 4))
    ctl.run.metric(f"iter{t}/heldout/own_logprob_per_token", round(logprob_per_token(result["own"]), 4))
    if previous is not None:
        previous_own = {r["id"]: r["response"] for r in ctl.run.rows(f"iter{t - 1}/eval-answers")}
        generated = score("previous-own", previous_own)
        rewards = reward_metrics(result["gold"], previous["gold"], generated, previous["own"], beta)
        for key, value in rewards.items():
            ctl.run.metric(f"iter{t}/heldout/{key}", round(value, 4) if isinstance(value, float) else value)
    return result


if __name__ == "__main__":
    main("spin", spin)
