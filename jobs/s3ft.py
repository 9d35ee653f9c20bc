"""S3FT: selective self-to-supervised fine-tuning (arXiv 2502.08130).

the base model answers every training input; the judge checks each answer against the gold one
    equivalent             -> target = the model's own answer
    else the model paraphrases the gold answer; judged equivalent, and for a worked gold answer (GSM8K) keeping
        its steps (s3ft.min_step_fraction of its intermediate results) -> target = the paraphrase
    else                   -> target = the gold answer
one SFT pass on those targets; compare with plain SFT on gold answers, in-domain and on a general benchmark
"""

from __future__ import annotations

from actors.teacher import paraphrase_messages
from jobs import lm_eval_phase, mt_bench_phase
from jobs.controller import Controller, main
from methods.s3ft import bucket_fractions, reasoning_verdicts, select_target


def s3ft(ctl: Controller) -> None:
    c = ctl.config
    train_rows, eval_rows = ctl.datasets()
    general_rows = ctl.general_eval()
    base = ctl.base_model
    evaluate_general = ctl.evaluate_loglik if c.data.general_eval_protocol == "loglik" else ctl.evaluate

    own = ctl.generate("generate", train_rows, ctl.sampling(c.generation))
    own_verdicts = ctl.judge_equivalence("judge-own", train_rows, {k: v["response"] for k, v in own.items()})

    not_equivalent = [r for r in train_rows if own_verdicts.get(r["id"]) != "yes"]
    paraphrase_requests = [{**r, "messages": paraphrase_messages(c.judge.prompts_dir, r)} for r in not_equivalent]
    paraphrases = ctl.generate(
        "paraphrase", paraphrase_requests, ctl.sampling(c.generation, salt=1), role=c.s3ft.paraphrase_by
    )
    paraphrase_texts = {k: v["response"] for k, v in paraphrases.items()}
    paraphrase_verdicts = ctl.judge_equivalence("judge-paraphrase", not_equivalent, paraphrase_texts)
    # a worked gold answer (GSM8K): the paraphrase must also keep its steps, not only its final number
    paraphrase_verdicts, answer_only = reasoning_verdicts(
        not_equivalent, paraphrase_texts, paraphrase_verdicts, c.s3ft.min_step_fraction
    )
    ctl.run.metric("paraphrase/answer_only", len(answer_only))

    examples, buckets = [], []
    for row in train_rows:
        paraphrase = paraphrases.get(row["id"])
        bucket, target = select_target(
            row,
            own[row["id"]]["response"] if row["id"] in own else "",
            own_verdicts.get(row["id"], "unknown"),
            paraphrase["response"] if paraphrase else None,
            paraphrase_verdicts.get(row["id"]),
        )
        buckets.append(bucket)
        examples.append(
            {
                "id": row["id"],
                "source_id": row["id"],
                "bucket": bucket,
                "messages": row["messages"],
                "response": target,
                "verdict": own_verdicts.get(row["id"], "unknown"),
            }
        )
    for bucket, fraction in bucket_fractions(buckets).items():
        ctl.run.metric(f"buckets/{bucket}", fraction)
    ctl.run.table("samples/s3ft_targets", examples, ["source_id", "bucket", "response"])

    ctl.evaluate("base/eval", eval_rows, base)
    evaluate_general("base/general", general_rows, base)
    model = ctl.train("s3ft", "sft", init_model=base, examples=examples)
    ctl.evaluate("s3ft/eval", eval_rows, model)
    evaluate_general("s3ft/general", general_rows, model)
    if c.s3ft.baseline_sft:
        gold = [{**e, "response": row["reference"], "bucket": "gold"} for e, row in zip(examples, train_rows)]
        sft = ctl.train("sft", "sft", init_model=base, examples=gold)
        ctl.evaluate("sft/eval", eval_rows, sft)
        evaluate_general("sft/general", general_rows, sft)
    ctl.run.metric("final_model", model)
    lm_eval_phase.final(ctl, model)  # evaluation.lm_eval: standard benchmarks on the final model
    mt_bench_phase.final(ctl, model)  # evaluation.mt_bench: the final model against the earlier one


if __name__ == "__main__":
    main("s3ft", s3ft)
