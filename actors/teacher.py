"""Teacher prompt families: LLM2LLM augmentation and S3FT paraphrase.

Design note: prompt building, output parsing and ROUGE-L near-duplicate filtering are pure functions;
``Teacher`` batches requests through an ``EnginePool`` and asks again (up to ``max_attempts``) for the
examples a reply did not deliver. ROUGE-L comes from Google's ``rouge-score`` package, the implementation
the LLM2LLM code uses.
"""

from __future__ import annotations

import re
from functools import lru_cache

from actors.judge import load_prompt
from cluster.data import meta, prompt_text, record, split_prompt

_PAIR = re.compile(r"Question\s*(\d+)\s*:\s*(.*?)\s*Answer\s*\1\s*:\s*(.*?)(?=\n\s*Question\s*\d+\s*:|\Z)", re.S | re.I)


def task_prompt(prompts_dir: str, name: str, task: str) -> str:
    """The task's own variant of a prompt (``augment_system.classification.txt``) if there is one, else the default.
    The default one-shot is arithmetic (official GSM8K code): shown movie reviews, a 135M teacher wrote sums."""
    try:
        return load_prompt(prompts_dir, f"{name}.{task}")
    except FileNotFoundError:
        return load_prompt(prompts_dir, name)


def augmentation_messages(prompts_dir: str, task: str, question: str, reference: str, k: int) -> list[dict]:
    """System job description, one worked example exchange, then the seed question and answer key."""
    prompt = lambda name: task_prompt(prompts_dir, name, task).strip()  # noqa: E731
    return [
        {"role": "system", "content": prompt("augment_system")},
        {"role": "user", "content": prompt("augment_example_user")},
        {"role": "assistant", "content": prompt("augment_example_assistant")},
        {"role": "user", "content": prompt("augment_user").format(question=question, reference=reference, k=k)},
    ]


def parse_augmentations(text: str) -> list[tuple[str, str]]:
    """'Question i: ... Answer i: ...' blocks -> [(question, answer)]; incomplete blocks are dropped."""
    pairs = []
    for _, question, answer in _PAIR.findall(text):
        question, answer = question.strip(), answer.strip()
        if question and answer:
            pairs.append((question, answer))
    return pairs


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
        self.stats = {
            "requested": 0,
            "parsed": 0,
            "unlabelled": 0,
            "duplicates": 0,
            "missing": 0,
            "unparseable_replies": 0,
        }

    def augment(
        self, wrong_seeds: list[dict], existing_questions: list[str], iteration: int, failed: list[dict] | None = None
    ) -> list[dict]:
        """k new examples per wrong seed, near-duplicates of anything so far dropped, missing ones re-asked.
        Seeds whose teacher request could not be run (batch failed twice, over-long prompt) go to ``failed``."""
        from actors.engine import Sampling

        existing = list(existing_questions)
        made: dict[str, list[dict]] = {s["id"]: [] for s in wrong_seeds}
        by_id = {s["id"]: s for s in wrong_seeds}
        self.stats["requested"] += self.k * len(wrong_seeds)
        for attempt in range(self.max_attempts):
            todo = [s for s in wrong_seeds if len(made[s["id"]]) < self.k]
            if not todo:
                break
            requests = [
                {
                    "id": s["id"],
                    "messages": augmentation_messages(
                        self.prompts_dir, s["task"], split_prompt(s)[1], s["reference"], self.k - len(made[s["id"]])
                    ),
                }
                for s in todo
            ]
            sampling = Sampling(
                temperature=self.temperature,
                top_p=self.top_p,
                max_tokens=self.max_tokens,
                seed=self.seed + 1000 * iteration + attempt,
            )
            replies = self.pool.generate_all(requests, sampling, desc=f"teacher augment {attempt}", failed=failed)
            for out in replies.values():
                seed = by_id[out["id"]]
                pairs = parse_augmentations(out["samples"][0]["text"])
                if not pairs:
                    self.stats["unparseable_replies"] += 1
                for question, answer in pairs:
                    if len(made[seed["id"]]) >= self.k:
                        break
                    self.stats["parsed"] += 1
                    example = new_example(seed, question, answer, len(made[seed["id"]]), iteration)
                    if example is None:
                        self.stats["unlabelled"] += 1
                        continue
                    new_prompt = prompt_text(example)
                    if is_near_duplicate(new_prompt, existing, self.rouge_threshold):
                        self.stats["duplicates"] += 1
                        continue
                    existing.append(new_prompt)
                    made[seed["id"]].append(example)
        self.stats["missing"] += sum(self.k - len(v) for v in made.values())
        return [example for seed in wrong_seeds for example in made[seed["id"]]]
