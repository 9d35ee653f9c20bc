"""LLM2LLM: iterative teacher-driven data augmentation (arXiv 2403.15042).

data = seed
for t = 0..T-1:
    student_t = fine-tune the *base* model on data           (restarting avoids overfitting)
    the student answers the seed set; the judge marks the wrong ones ('####' tasks: the official filter, an
        answer without the '#### n' form is wrong)
    only original seed examples are eligible (teacher-made ones are never augmented again)
    the teacher writes k new examples per wrong seed example (asked again, up to teacher.max_attempts, until
        k are kept); examples without '####' and near-duplicates (ROUGE-L) dropped
    data = data + new examples
    evaluate student_t
optional control (llm2llm.matched_steps_control): a student trained from the base model on the seed repeated to the
last student's data size: the same optimizer steps without the teacher's examples
"""

from __future__ import annotations

from actors.judge import load_prompt
from data.rows import split_prompt, take
from jobs import lm_eval_phase, mt_bench_phase
from jobs.controller import REQUIRED_PROMPTS, Controller, main
from methods.llm2llm import accumulate, instruction_wordings, repeat_rows, seed_verdicts, wrong_seed_examples


def llm2llm(ctl: Controller) -> None:
    c = ctl.config
    train_rows, eval_rows = ctl.datasets()
    seed = take(train_rows, c.llm2llm.seed_size, c.run.seed) if c.llm2llm.seed_size else train_rows
    base = ctl.base_model
    ctl.evaluate("base/eval", eval_rows, base)
    data = list(seed)
    model = base
    for t in range(c.llm2llm.iterations):
        wordings = instruction_wordings(data)  # every teacher example reuses its seed's instruction framing
        ctl.run.metric(f"iter{t}/instruction_wordings", len(wordings))
        ctl.run.metric(f"iter{t}/top_wording_share", round(max(wordings.values()) / len(data), 4))
        model = ctl.train(f"iter{t}/student", "sft", init_model=base, examples=sft_rows(data))
        ctl.evaluate(f"iter{t}/eval", eval_rows, model)
        ctl.use_generator_weights(model)
        answers = ctl.generate(f"iter{t}/answer-seed", seed, ctl.sampling(c.generation, salt=t), iteration=t)
        texts = {k: v["response"] for k, v in answers.items()}
        judged = ctl.judge_equivalence(f"iter{t}/judge-seed", seed, texts)
        verdicts, unmarked = seed_verdicts(seed, texts, judged)  # '####' tasks: the official filter's test
        wrong = wrong_seed_examples(seed, verdicts)
        ctl.run.metric(f"iter{t}/wrong_seed", len(wrong))
        ctl.run.metric(f"iter{t}/wrong_seed_unmarked", unmarked)  # right number, no '#### n': wrong as officially
        if t == c.llm2llm.iterations - 1:
            break  # the last student is the result; more data would not be trained on
        existing_questions = [split_prompt(r)[1] for r in data]  # the inputs, as the code compares questions

        failed: list[dict] = []  # seeds the teacher pool could not answer: stored and counted by the phase

        def augment(todo: list[dict], known: list[str] = existing_questions, t: int = t, failed=failed):
            teacher = ctl.teacher()
            examples = teacher.augment(todo, known, iteration=t, failed=failed)
            ctl.run.metric(f"iter{t}/teacher", teacher.stats)  # where the teacher's replies were lost
            return [examples]

        # The new examples depend on the wrong seeds, the teacher's weights and the questions they must not repeat,
        # and on how the teacher is asked (its sampling, k, attempts, ROUGE-L threshold).
        t_c = c.teacher
        asked = [t_c.k, t_c.temperature, t_c.top_p, t_c.max_tokens, t_c.rouge_threshold, t_c.max_attempts, c.run.seed]
        context = {
            "teacher": ctl.run.model_key(ctl.model_paths["teacher.model"]),
            "known": existing_questions,
            "asked": asked,
            # the prompt files' text (a prompt edited in place under the same folder is another way of asking)
            "prompts": {n: load_prompt(c.judge.prompts_dir, n) for n in sorted(REQUIRED_PROMPTS["llm2llm"])},
        }
        new = ctl.run.row_phase(f"iter{t}/augment", wrong, augment, key="seed_id", failed=failed, context=context)
        ctl.run.metric(f"iter{t}/new_examples", len(new))
        data = accumulate(data, new)
        ctl.run.metric(f"iter{t}/data_size", len(data))
    ctl.run.metric("final_model", model)
    lm_eval_phase.final(ctl, model)  # evaluation.lm_eval: standard benchmarks on the final model
    mt_bench_phase.final(ctl, model)  # evaluation.mt_bench: the final model against the earlier one
    if c.llm2llm.matched_steps_control:
        control = repeat_rows(seed, len(data))
        ctl.run.metric("control/data_size", len(control))
        control_model = ctl.train("control/student", "sft", init_model=base, examples=sft_rows(control))
        ctl.evaluate("control/eval", eval_rows, control_model)


def sft_rows(rows: list[dict]) -> list[dict]:
    return [
        {"id": r["id"], "source_id": r.get("source_id", r["id"]), "messages": r["messages"], "response": r["reference"]}
        for r in rows
    ]


if __name__ == "__main__":
    main("llm2llm", llm2llm)
