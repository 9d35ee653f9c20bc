"""Teacher prompt families: LLM2LLM augmentation and S3FT paraphrase.

Design note: prompt building, output parsing and ROUGE-L near-duplicate filtering are pure functions;
``Teacher`` batches requests through an ``EnginePool`` and asks again (up to ``max_attempts``) for the
examples a reply did not deliver. ROUGE-L comes from Google's ``rouge-score`` package, the implementation
the LLM2LLM code uses.

What follows the official LLM2LLM code (SqueezeAILab/LLM2LLM, GSM8K/generate_data.py; NOTES.md "Papers as they
ran"): the conversation (system rules, one worked example exchange, the seed question with its answer key); the
reply format ``N. Question: ... Answer: ... #### n`` and its post-processing (a block needs exactly one
``Answer:`` and, for a ``####`` task, exactly one ``####``: the answer is kept as the rationale, a newline and
``#### <first line after ####>``; a block without is dropped and counted as ``unmarked``; the last block of a
reply cut by max_tokens is dropped); asking for ``min(k + attempt, 10)`` examples per attempt until k are kept, with the
examples kept so far shown back on odd attempts ("now generate more, different from these"). Not the code: the
attempts are bounded (``teacher.max_attempts``; the code loops until k are kept), and the seeds given up on are
counted.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

from actors.judge import load_prompt
from data.formats import gsm8k_label
from data.rows import meta, prompt_text, record, split_prompt

_BLOCK = re.compile(r"[0-9]{1,2}\.\s+Question:")  # generate_data.post_process_gpt3_response's split
MAX_ASKED = 10  # the code asks for min(k + attempt, 10) examples


def task_prompt(prompts_dir: str, name: str, task: str) -> str:
    """The task's own variant of a prompt (``augment_system.classification.txt``) if there is one, else the default.
    The default one-shot is arithmetic (official GSM8K code): shown movie reviews, a 135M teacher wrote sums."""
    try:
        return load_prompt(prompts_dir, f"{name}.{task}")
    except FileNotFoundError:
        return load_prompt(prompts_dir, name)


def numbered_examples(pairs: list[tuple[str, str]]) -> str:
    """Examples in the reply format, as the code shows the kept ones back to the teacher."""
    return "\n".join(f"{i}. Question: {q}\nAnswer: {a}" for i, (q, a) in enumerate(pairs, 1))


def augmentation_messages(
    prompts_dir: str, task: str, question: str, reference: str, k: int, kept: list[tuple[str, str]] | None = None
) -> list[dict]:
    """System rules, one worked example exchange, then the seed question and answer key asking for k examples.
    With ``kept`` (the code does this on odd attempts once some are kept): the seed turn asks for as many as were
    kept, the kept ones follow as the teacher's reply, and a last user turn asks for k more, different ones."""
    prompt = lambda name: task_prompt(prompts_dir, name, task).strip()  # noqa: E731
    asked = len(kept) if kept else k
    messages = [
        {"role": "system", "content": prompt("augment_system")},
        {"role": "user", "content": prompt("augment_example_user")},
        {"role": "assistant", "content": prompt("augment_example_assistant")},
        {"role": "user", "content": prompt("augment_user").format(question=question, reference=reference, k=asked)},
    ]
    if kept:
        messages.append({"role": "assistant", "content": numbered_examples(kept)})
        messages.append({"role": "user", "content": prompt("augment_more_user").format(k=k)})
    return messages


def has_answer_marker(reference: str) -> bool:
    """A '#### n' task (GSM8K form): the gold answer ends its rationale with '#### <answer>'."""
    return re.search(r"#### \S", reference) is not None


def parse_augmentations(text: str, marked: bool, truncated: bool = False) -> tuple[list[tuple[str, str]], Counter]:
    """A teacher reply -> ([(question, answer)], counts of the blocks dropped), as the official post-processing:
    blocks split at 'N. Question:'; a block needs exactly one 'Answer:' (else ``no_answer``); with ``marked`` (a
    '####' task) exactly one '####' (else ``unmarked``), the answer becoming the rationale, a newline and '#### <first
    line after ####>'; a block starting 'Write a program', or whose first character is punctuation or not ASCII, is
    ``rejected``; with ``truncated`` (the reply hit max_tokens) the last block is ``truncated``. The text before
    the first numbered block is the reply's preamble and is not counted."""
    dropped: Counter = Counter()
    pairs: list[tuple[str, str]] = []
    blocks = _BLOCK.split(text)[1:]  # [0]: the preamble before the first numbered block
    for index, block in enumerate(blocks):
        if truncated and index == len(blocks) - 1:
            dropped["truncated"] += 1
            continue
        parts = re.split(r"(Answer):", block)
        if len(parts) != 3:
            dropped["no_answer"] += 1
            continue
        question, answer = parts[0].strip(), parts[2].strip()
        if marked:
            pieces = re.split(r"(####)", parts[2])
            if len(pieces) != 3:
                dropped["unmarked"] += 1
                continue
            final = pieces[2].split("\n", 1)[0].strip()
            answer = f"{pieces[0].strip()}\n#### {final}"
        if block.startswith("Write a program") or block[0] in string.punctuation or not block[0].isascii():
            dropped["rejected"] += 1
            continue
        if question and answer:
            pairs.append((question, answer))
        else:
            dropped["no_answer"] += 1
    return pairs, dropped


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(a: str, b: str) -> float:
    return _scorer().score(a, b)["rougeL"].fmeasure


def is_near_duplicate(question: str, existing: list[str], threshold: float) -> bool:
    return any(rouge_l(question, other) > threshold for other in existing)


def paraphrase_messages(prompts_dir: str, row: dict) -> list[dict]:
    text = load_prompt(prompts_dir, "paraphrase").format(question=prompt_text(row), reference=row["reference"])
    return [{"role": "user", "content": text}]


def answer_label(task: str, answer: str, labels: list[str]) -> str | None:
    """The label a rule verifier reads from a teacher's answer; None when a checkable task's answer has none."""
    from actors.judge import extract_final_number, extract_label, extract_letter

    if task == "gsm8k":
        if "####" in answer:  # the teacher's '#### n' line is the label, as gsm8k_label reads a GSM8K solution's
            return gsm8k_label(answer) or None
        number = extract_final_number(answer)
        return None if number is None else f"{number:g}"
    if task == "classification":
        return extract_label(answer, labels)
    if task == "multiple_choice":
        return extract_letter(answer)
    return ""


def new_example(seed: dict, question: str, answer: str, index: int, iteration: int) -> dict | None:
    """A teacher-made record in the seed's instruction framing, never eligible for augmentation itself.

    None when the answer carries no label the task's verifier can read: such a row would teach the student to
    answer without one."""
    seed_meta = meta(seed)
    label = answer_label(seed["task"], answer, seed_meta.get("labels", []))
    if label is None:
        return None
    head, _, tail = split_prompt(seed)
    row = record(
        f"{seed['id']}-aug{iteration}-{index}",
        head + question + tail,
        answer,
        label,
        seed["task"],
        origin="teacher",
        seed_id=seed["id"],
        iteration=iteration,
        labels=seed_meta.get("labels"),
        template=seed_meta.get("template"),
    )
    row["seed_id"] = seed["id"]  # lineage column: which wrong seed example this was written for
    return row


class Teacher:
    def __init__(
        self,
        pool,
        prompts_dir: str,
        k: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        rouge_threshold: float,
        max_attempts: int,
        seed: int = 0,
    ):
        self.pool, self.prompts_dir, self.k = pool, prompts_dir, k
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.rouge_threshold, self.max_attempts, self.seed = rouge_threshold, max_attempts, seed
        # requested: k per wrong seed; requests: teacher prompts sent; parsed: well-formed examples read; then
        # where examples were lost (unmarked / no_answer / truncated / rejected blocks, unlabelled answers,
        # near-duplicates) and the outcome per seed: kept examples, seeds retried, seeds given up (< k kept after
        # max_attempts), missing examples.
        self.stats = {
            "requested": 0,
            "requests": 0,
            "parsed": 0,
            "unmarked": 0,
            "no_answer": 0,
            "truncated": 0,
            "rejected": 0,
            "unlabelled": 0,
            "duplicates": 0,
            "unparseable_replies": 0,
            "kept": 0,
            "retried": 0,
            "given_up": 0,
            "missing": 0,
        }

    def augment(
        self, wrong_seeds: list[dict], existing_questions: list[str], iteration: int, failed: list[dict] | None = None
    ) -> list[dict]:
        """k new examples per wrong seed, near-duplicates (ROUGE-L of the question, the row's input without its
        instruction framing, against ``existing_questions``: the inputs so far) dropped, asked again until k are kept
        or ``max_attempts`` prompts were sent for the seed; attempt a asks for min(k + a, 10) (official code).
        Seeds whose teacher request could not be run (batch failed twice, over-long prompt) go to ``failed``."""
        from actors.engine import Sampling

        existing = list(existing_questions)
        made: dict[str, list[dict]] = {s["id"]: [] for s in wrong_seeds}
        kept_pairs: dict[str, list[tuple[str, str]]] = {s["id"]: [] for s in wrong_seeds}
        by_id = {s["id"]: s for s in wrong_seeds}
        self.stats["requested"] += self.k * len(wrong_seeds)
        for attempt in range(self.max_attempts):
            todo = [s for s in wrong_seeds if len(made[s["id"]]) < self.k]
            if not todo:
                break
            if attempt == 1:
                self.stats["retried"] += len(todo)  # seeds asked more than once
            asked = min(self.k + attempt, MAX_ASKED)
            requests = [
                {
                    "id": s["id"],
                    "messages": augmentation_messages(
                        self.prompts_dir,
                        s["task"],
                        split_prompt(s)[1],
                        s["reference"],
                        asked,
                        kept=kept_pairs[s["id"]] if attempt % 2 == 1 else None,
                    ),
                }
                for s in todo
            ]
            self.stats["requests"] += len(requests)
            sampling = Sampling(
                temperature=self.temperature,
                top_p=self.top_p,
                max_tokens=self.max_tokens,
                seed=self.seed + 1000 * iteration + attempt,
            )
            replies = self.pool.generate_all(requests, sampling, desc=f"teacher augment {attempt}", failed=failed)
            for out in replies.values():
                seed = by_id[out["id"]]
                sample = out["samples"][0]
                pairs, dropped = parse_augmentations(
                    sample["text"], has_answer_marker(seed["reference"]), sample.get("finish_reason") == "length"
                )
                for reason, count in dropped.items():
                    self.stats[reason] += count
                if not pairs and not dropped:
                    self.stats["unparseable_replies"] += 1
                for question, answer in pairs:
                    if len(made[seed["id"]]) >= self.k:
                        break
                    self.stats["parsed"] += 1
                    example = new_example(seed, question, answer, len(made[seed["id"]]), iteration)
                    if example is None:
                        self.stats["unlabelled"] += 1
                        continue
                    # the question alone, as the code compares questions: the instruction framing every row
                    # shares would make two different questions look alike
                    new_question = split_prompt(example)[1]
                    if is_near_duplicate(new_question, existing, self.rouge_threshold):
                        self.stats["duplicates"] += 1
                        continue
                    existing.append(new_question)
                    made[seed["id"]].append(example)
                    kept_pairs[seed["id"]].append((question, answer))
        self.stats["kept"] += sum(len(v) for v in made.values())
        self.stats["given_up"] += sum(len(v) < self.k for v in made.values())
        self.stats["missing"] += sum(self.k - len(v) for v in made.values())
        return [example for seed in wrong_seeds for example in made[seed["id"]]]
