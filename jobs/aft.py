"""AFT: aggregation fine-tuning (arXiv 2501.11877).

proposals: N drafts per training query: on-policy, sampled from the base model or from the base model SFT'd on
           the propose data (aft.proposal_model), or off-policy, read from the data (every row must have some)
examples:  propose   query                      -> reference answer
           aggregate aggregator system prompt listing the proposals + query -> reference answer
           (an over-long one keeps its instruction and query; its proposals share the prompt budget, cut at their ends)
train the base model on propose + aggregate data (and plain SFT as the baseline)
inference: propose-and-aggregate, N proposals and L aggregation layers (the last layer one answer, at
           aft.final_top_p: the official code's final_layer_top_p 1.0; the other layers at top_p 0.95);
evaluate greedy, one proposal (layer 0, the like-for-like baseline: one sample at the proposal settings) and
propose-and-aggregate side by side (``<model>/side_by_side``) for the AFT model, and for the SFT model trained on
the same queries (aft.baseline_sft, the paper's comparison): task accuracy; pairwise win rate against SFT
(aft.pairwise_vs_sft)
"""

from __future__ import annotations

from actors.judge import load_prompt
from data.rows import meta
from jobs import lm_eval_phase, mt_bench_phase
from jobs.controller import Controller, main
from methods.aft import build_examples, off_policy_proposals, propose_and_aggregate


def aft(ctl: Controller) -> None:
    c, a = ctl.config, ctl.config.aft
    train_rows, eval_rows = ctl.datasets()
    base = ctl.base_model
    template = load_prompt(c.judge.prompts_dir, "aggregate_system")

    proposals: dict[str, list[str]] = {}
    if a.proposal_source == "off_policy":  # read first: rows without drafts stop the job before any training
        proposals = off_policy_proposals({r["id"]: meta(r).get("proposals") or [] for r in train_rows}, a.n_proposals)

    sft_model = None
    if a.baseline_sft or (a.proposal_source == "on_policy" and a.proposal_model == "sft"):
        sft_model = ctl.train("sft", "sft", init_model=base, examples=build_examples(train_rows, {}, template))

    if a.proposal_source == "on_policy":
        ctl.use_generator_weights(sft_model if a.proposal_model == "sft" else base)
        drafts = ctl.generate(
            "proposals",
            train_rows,
            ctl.sampling(c.generation, n=a.n_proposals, temperature=a.proposal_temperature, top_p=a.proposal_top_p),
        )
        proposals = {k: v["samples"] for k, v in drafts.items()}
    examples = build_examples(train_rows, proposals, template)
    aggregate = sum(e["kind"] == "aggregate" for e in examples)
    ctl.record_rows("aft/aggregate-examples", len(train_rows), aggregate, "queries", "aggregate_examples")
    ctl.run.table("samples/aft_examples", examples, ["source_id", "kind", "messages", "response"])

    model = ctl.train("aft", "sft", init_model=base, examples=examples, min_proposal_tokens=a.min_proposal_tokens)
    if a.baseline_sft:
        ctl.evaluate("sft/eval", eval_rows, sft_model)
    ctl.evaluate("aft/single", eval_rows, model)  # single greedy sample from the AFT model
    if a.baseline_sft:  # the paper's claim: AFT beats SFT on the same queries (paired rows, 95% interval)
        ctl.compare("aft/vs_sft", baseline="sft/eval", method="aft/single")

    if not a.eval_propose_aggregate:
        ctl.run.metric("final_model", model)
        mt_bench_phase.final(ctl, model)  # evaluation.mt_bench: the final model against the earlier one
        return
    answers = evaluate_propose_and_aggregate(ctl, "aft", eval_rows, model, template, _recorded(ctl, "aft/single"))
    if a.baseline_sft:  # the paper's comparison: the SFT model on the same queries, with the same inference
        evaluate_propose_and_aggregate(ctl, "sft", eval_rows, sft_model, template, _recorded(ctl, "sft/eval"))

    if a.baseline_sft and a.pairwise_vs_sft:
        sft_answers = ctl.run.rows("sft/eval-answers")
        by_id = {r["id"]: r["response"] for r in sft_answers}
        items = [
            {"id": r["id"], "question": r["messages"][-1]["content"], "a": answers[r["id"]]["answer"]}
            | {"b": by_id[r["id"]]}
            for r in eval_rows
            if r["id"] in by_id and answers.get(r["id"], {}).get("answer")
        ]

        def compare() -> dict[str, str]:
            failed: list[dict] = []
            ctl.serving_pool("judge")  # placed only when the comparison runs (a rerun reuses it)
            outcome = ctl.judge.compare(items, failed=failed)
            ctl.run.account("aft/pairwise-vs-sft", {f["id"]: f["reason"] for f in failed}, len(items))
            return outcome

        judge = {"model": ctl.run.model_key(ctl.serving("judge")), "prompt": ctl.judge.pairwise_prompt}
        outcome = ctl.run.once("aft/pairwise-vs-sft", compare, key={"items": items, "judge": judge})
        decided = [v for v in outcome.values() if v != "unknown"]
        if decided:
            wins = sum(v == "win" for v in decided) + 0.5 * sum(v == "tie" for v in decided)
            ctl.run.metric("aft/win_rate_vs_sft", wins / len(decided))
        ctl.run.metric("aft/pairwise_unknown", len(outcome) - len(decided))
    ctl.run.metric("final_model", model)
    lm_eval_phase.final(ctl, model)  # evaluation.lm_eval: standard benchmarks on the final model
    mt_bench_phase.final(ctl, model)  # evaluation.mt_bench: the final model against the earlier one


def evaluate_propose_and_aggregate(
    ctl: Controller, prefix: str, rows: list[dict], model: str, template: str, greedy: tuple | None = None
) -> dict[str, dict]:
    """Propose-and-aggregate (N, L from aft) with ``model`` on ``rows``: ``<prefix>/propose_aggregate`` and, along
    the sequential-refinement axis, ``<prefix>/layer<l>`` (the first response of each layer; layer 0 is one
    sample at the proposal temperature); ``<prefix>/side_by_side`` puts ``greedy`` ((accuracy, ci95) of the
    model's greedy answer), one proposal and P&A together. Returns {row id: {answer, layers}}."""
    a = ctl.config.aft
    ctl.use_generator_weights(model)

    def run_layers() -> dict[str, dict]:
        found = propose_and_aggregate(
            rows,
            lambda reqs, n, temp, top_p=None: _generate_texts(ctl, reqs, n, temp, top_p),
            template,
            a.n_proposals,
            a.layers,
            a.proposal_temperature,
            a.aggregate_temperature,
            a.final_top_p,
        )
        # A query whose last layer never answered (its requests failed) is a failed row of this phase.
        unanswered = {r["id"]: "no final answer" for r in rows if not found.get(r["id"], {}).get("layers", [[]])[-1]}
        ctl.run.account(f"{prefix}/propose-and-aggregate", unanswered, len(rows))
        return found

    key = {
        "rows": rows,
        "model": ctl.run.model_key(model),
        "template": template,
        "settings": [
            a.n_proposals,
            a.layers,
            a.proposal_temperature,
            a.aggregate_temperature,
            a.proposal_top_p,
            a.final_top_p,
        ],
        "sampling": [ctl.config.evaluation.max_tokens, ctl.config.generation.max_tokens, ctl.config.run.seed],
    }
    answers = ctl.run.once(f"{prefix}/propose-and-aggregate", run_layers, key=key)
    # A query whose last layer never answered (its requests failed) is a failed row, not a wrong answer.
    answered = {k: v["answer"] for k, v in answers.items() if v["layers"][-1]}
    verdicts = ctl.judge_equivalence(f"{prefix}/pa-verdicts", rows, answered)
    ctl.run.metric(f"{prefix}/propose_aggregate/failed", len(rows) - len(verdicts))
    ctl.run.metric(f"{prefix}/propose_aggregate/unknown", sum(v == "unknown" for v in verdicts.values()))
    pa = ctl.record_accuracy(f"{prefix}/propose_aggregate", verdicts, len(verdicts))
    by_layer = []
    for layer in range(a.layers):
        firsts = {k: v["layers"][layer][0] for k, v in answers.items() if v["layers"][layer]}
        layer_verdicts = ctl.judge_equivalence(f"{prefix}/pa-layer{layer}-verdicts", rows, firsts)
        by_layer.append(ctl.record_accuracy(f"{prefix}/layer{layer}", layer_verdicts, len(layer_verdicts)))
    # Side by side: the greedy answer, one proposal (layer 0: one sample at the proposal temperature and top_p,
    # the like-for-like baseline of P&A, which samples too) and P&A; each accuracy with its 95% interval.
    side = {"greedy": greedy, "one_proposal": by_layer[0], "propose_aggregate": pa}
    ctl.run.metric(
        f"{prefix}/side_by_side",
        {name: {"accuracy": v[0], "ci95": [round(x, 4) for x in v[1]]} for name, v in side.items() if v is not None},
    )
    ctl.run.metric(f"{prefix}/propose_aggregate_minus_one_proposal", round(pa[0] - by_layer[0][0], 4))
    return answers


def _recorded(ctl: Controller, name: str) -> tuple[float, tuple[float, float]] | None:
    """(accuracy, ci95) an evaluation logged as ``<name>/...``; None when it did not run."""
    metrics = ctl.run.state["metrics"]
    if f"{name}/accuracy" not in metrics:
        return None
    return metrics[f"{name}/accuracy"], tuple(metrics[f"{name}/ci95"])


def _generate_texts(
    ctl: Controller, requests: list[dict], n: int, temperature: float, top_p: float | None = None
) -> dict[str, list[str]]:
    """One P&A layer on the generator pool: proposal and intermediate layers at aft.proposal_top_p, the final
    layer at ``top_p`` (aft.final_top_p, passed by propose_and_aggregate)."""
    sampling = ctl.sampling(
        ctl.config.evaluation,
        n=n,
        temperature=temperature,
        top_p=ctl.config.aft.proposal_top_p if top_p is None else top_p,
        max_tokens=ctl.config.generation.max_tokens,
    )
    outputs = ctl.generator.generate_all(requests, sampling, desc=f"propose-aggregate n={n}")
    return {k: [s["text"] for s in v["samples"]] for k, v in outputs.items()}


if __name__ == "__main__":
    main("aft", aft)
