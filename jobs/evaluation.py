"""Evaluation, written in the controller's phases: greedy answers judged by the task's verifier (or an LLM
judge), label log-likelihood multiple choice, and accuracy with a 95% Wilson interval as run metrics.

Each function takes the controller as a method driver does (typed as ``jobs.phases.Phases``: the members it
uses): answers and verdicts are its ``generate`` and ``judge_equivalence`` phases and log-likelihood scores one
keyed ``run.once`` (rows, candidates, the model's key), so an evaluation resumes, and places the generator or
judge pool on first use, as any phase does. Which pool serves a role, and when it stops, is
``jobs.roles``' business, not this module's.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from data.rows import likelihood_question, reworded
from runfolder.dryrun import is_pending
from runfolder.run import Run

if TYPE_CHECKING:  # the controller calls in here; this module only uses its phases
    from jobs.phases import Phases

log = logging.getLogger("selfimprove")


def wilson_ci95(correct: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    z, p = 1.96, correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def record_accuracy(run: Run, name: str, verdicts: dict[str, str], n: int) -> tuple[float, tuple[float, float]]:
    """Log ``<name>/accuracy``, ``/ci95`` (Wilson) and ``/n`` from judge verdicts over ``n`` rows."""
    correct = sum(v == "yes" for v in verdicts.values())
    accuracy, ci95 = correct / max(n, 1), wilson_ci95(correct, n)
    run.metric(f"{name}/accuracy", accuracy)
    run.metric(f"{name}/ci95", [round(x, 4) for x in ci95])
    run.metric(f"{name}/n", n)
    return accuracy, ci95


def paired_mean(baseline: dict[str, float], method: dict[str, float]) -> tuple[float, float, float, int]:
    """(mean of method − baseline over the rows both have, 95% normal interval low, high, n)."""
    ids = sorted(set(baseline) & set(method))
    n = len(ids)
    if n == 0:
        return (math.nan, math.nan, math.nan, 0)
    diffs = [method[i] - baseline[i] for i in ids]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n)
    return (mean, mean - half, mean + half, n)


def paired_difference(baseline: dict[str, str], method: dict[str, str]) -> tuple[float, float, float, int]:
    """(method − baseline accuracy, 95% interval low, high, n) over the rows both scored: the normal interval of
    the mean per-row difference (each -1, 0 or 1), which is narrower than two separate intervals suggest when the
    models agree on most rows."""
    return paired_mean({k: v == "yes" for k, v in baseline.items()}, {k: v == "yes" for k, v in method.items()})


def record_difference(ctl: Phases, name: str, baseline: str, method: str) -> tuple[float, float, float, int]:
    """``<name>``: [method − baseline accuracy, 95% low, high, n] on the same held-out rows, from two greedy
    evaluations' verdicts (``<baseline>-verdicts``, ``<method>-verdicts``): the paired comparison a method's claim
    rests on, printed with its interval whichever way it points."""
    verdicts = [{r["id"]: r["verdict"] for r in ctl.run.rows(f"{e}-verdicts")} for e in (baseline, method)]
    mean, low, high, n = paired_difference(*verdicts)
    ctl.run.metric(name, [round(mean, 4), round(low, 4), round(high, 4), n])
    log.info("%s (%s − %s): %+.3f [%+.3f, %+.3f], n=%d paired rows", name, method, baseline, mean, low, high, n)
    return mean, low, high, n


def evaluate(ctl: Phases, name: str, rows: list[dict], model_path: str) -> float:
    """Greedy answers from ``model_path`` on ``rows``, judged; accuracy with a 95% Wilson interval. With
    data.eval_reworded the rows are scored again under the task's reworded instruction (``<name>_reworded``),
    with data.eval_loglik classification rows also by label log-likelihood (``<name>_loglik``, and
    ``<name>_reworded_loglik``). Returns the accuracy under the rows' own wording."""
    accuracy = evaluate_greedy(ctl, name, rows, model_path)
    variants = [(name, rows)]
    if ctl.config.data.eval_reworded:
        other = [w for r in rows if (w := reworded(r)) is not None]
        if len(other) < len(rows):
            log.warning("%s: %d rows have no reworded instruction and are left out", name, len(rows) - len(other))
        if other:
            evaluate_greedy(ctl, f"{name}_reworded", other, model_path)
            variants.append((f"{name}_reworded", other))
    if ctl.config.data.eval_loglik:
        for variant, variant_rows in variants:
            labelled = [r for r in variant_rows if r["task"] == "classification"]
            if labelled:
                evaluate_loglik(ctl, f"{variant}_loglik", labelled, model_path)
    return accuracy


def evaluate_greedy(ctl: Phases, name: str, rows: list[dict], model_path: str) -> float:
    """Greedy answers from ``model_path`` on ``rows``, judged: ``<name>/accuracy``, ``/ci95`` (Wilson),
    ``/n``, ``/failed``, ``/unknown`` (answers the verifier could not read: no label, number or letter) and
    ``/truncated`` (answers cut at evaluation.max_tokens, which may have lost their final answer)."""
    if not rows:
        return float("nan")
    run = ctl.run
    ctl.use_generator_weights(model_path)
    outputs = ctl.generate(f"{name}-answers", rows, ctl.sampling(ctl.config.evaluation))
    answers = outputs if is_pending(outputs) else {k: v["response"] for k, v in outputs.items()}
    verdicts = ctl.judge_equivalence(
        f"{name}-verdicts", rows, answers, uses=[ctl.source(rows), run.phase_file(f"{name}-answers")]
    )
    if is_pending(verdicts):  # a dry run (runfolder.dryrun): the accuracy is known once they have run
        return verdicts
    # A row never answered (or never judged) is a failed row, reported as such, not a wrong answer.
    run.metric(f"{name}/failed", len(rows) - len(verdicts))
    run.metric(f"{name}/unknown", sum(v == "unknown" for v in verdicts.values()))
    run.metric(f"{name}/truncated", sum(bool(o.get("truncated")) for o in outputs.values()))
    accuracy, (low, high) = record_accuracy(run, name, verdicts, len(verdicts))
    run.table(
        f"samples/{name}",
        [
            {
                "id": r["id"],
                "prompt": r["messages"][-1]["content"],
                "reference": r["reference"],
                "response": outputs.get(r["id"], {}).get("response"),
                "verdict": verdicts.get(r["id"]),
            }
            for r in rows
        ],
        ["id", "prompt", "reference", "response", "verdict"],
    )
    log.info("eval %s: accuracy %.3f (95%% CI %.3f-%.3f, n=%d)", name, accuracy, low, high, len(verdicts))
    return accuracy


def evaluate_loglik(ctl: Phases, name: str, rows: list[dict], model_path: str) -> float:
    """Log-likelihood multiple choice: each row's candidate answers scored by ``model_path`` after the
    chat-templated question; correct when the gold one has the highest log-prob per character (acc_norm)."""
    scorable = [(r, found) for r in rows if (found := likelihood_question(r))]
    if len(scorable) < len(rows):
        log.warning("%s: %d rows have no candidate answers and are left out", name, len(rows) - len(scorable))
    if not scorable:
        return float("nan")
    ctl.use_generator_weights(model_path)

    requests = [
        {"id": f"{r['id']}#{i}", "messages": messages, "response": text}
        for r, (messages, candidates, _) in scorable
        for i, text in enumerate(candidates)
    ]

    def score() -> dict[str, str]:
        logprobs = ctl.generator.score_all(requests)
        verdicts, reasons = {}, {}
        for r, (_, candidates, gold) in scorable:
            keys = [f"{r['id']}#{i}" for i in range(len(candidates))]
            if not all(k in logprobs for k in keys):  # a candidate the engine could not score: failed, not wrong
                reasons[r["id"]] = f"{sum(k not in logprobs for k in keys)} of {len(keys)} candidates not scored"
                continue
            per_char = [sum(logprobs[k]) / max(1, len(text)) for k, text in zip(keys, candidates)]
            verdicts[r["id"]] = {
                "verdict": "yes" if per_char.index(max(per_char)) == gold else "no",
                "gold_logprob_per_char": per_char[gold],
            }
        ctl.run.account(f"{name}-loglik", reasons, len(scorable))  # too many unscored rows: the phase fails
        return verdicts

    key = {"requests": requests, "gold": [g for _, (_, _, g) in scorable], "model": ctl.run.model_key(model_path)}
    scored = ctl.run.once(f"{name}-loglik", score, key=key)
    if is_pending(scored):  # a dry run: a phase that would run
        return scored
    verdicts = {k: v["verdict"] for k, v in scored.items()}
    ctl.run.metric(f"{name}/failed", len(scorable) - len(verdicts))
    accuracy, (low, high) = record_accuracy(ctl.run, name, verdicts, len(verdicts))
    # The gold answer's log-likelihood moves before the argmax does: a model drifting from what it knew shows here
    # first (a forgetting measure that does not need a flip of the best choice).
    gold_logprob = sum(v["gold_logprob_per_char"] for v in scored.values()) / max(1, len(scored))
    ctl.run.metric(f"{name}/gold_logprob_per_char", round(gold_logprob, 4))
    log.info(
        "loglik eval %s: accuracy %.3f (95%% CI %.3f-%.3f, n=%d), gold log-prob per char %.4f",
        name,
        accuracy,
        low,
        high,
        len(verdicts),
        gold_logprob,
    )
    return accuracy
