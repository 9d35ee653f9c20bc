"""One user row, in any of TRL's dataset formats, -> the record every method reads (``data.rows.record``).

Formats (https://huggingface.co/docs/trl/dataset_formats), each standard (strings) or conversational (lists
of ``{role, content}`` turns):

- language modelling, conversational: ``messages`` -> its first exchange by default (``data.sft_turns=first``):
  prompt = the turns up to the first user turn, reference = the assistant turn after it, as SPIN's official
  ``spin/reformat.py`` builds its data from UltraChat (``messages[0]``, ``messages[1]``); with
  ``data.sft_turns=all``, prompt = every turn before the last assistant turn, reference = that turn
  (``conversation_exchange``). UltraChat-200k's ``prompt``/``prompt_id``/``messages`` rows load this way, the
  id taken from ``prompt_id``. A plain ``text`` row has no prompt/answer boundary and is reported;
- prompt-completion: ``prompt`` + ``completion`` -> reference = the completion;
- preference: ``prompt`` + ``chosen`` (+ ``rejected``) -> reference = chosen, ``rejected`` kept in metadata;
  with an implicit prompt (``chosen`` is a whole conversation) the prompt is chosen's turns before its last;
- unpaired preference: ``prompt`` + ``completion`` + a bool ``label``: a desirable completion is the reference,
  an undesirable one is no gold answer (the row is malformed);
- anything else through ``data.columns`` ({field: column}), e.g. ``{prompt: question, reference: answer}``.

This repo's own fields keep working: ``reference`` (or ``answer`` / ``response``), ``label``, ``task``,
``proposals``, ``id``. Every method trains or judges against a gold answer, so a row without one is
malformed, never a record with an empty target. A label alone is a gold answer (``{prompt, label}`` rows).
Numbers are accepted as text (GSM8K-style ``answer: 4`` -> "4").
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

TASKS = ("gsm8k", "classification", "multiple_choice", "none")
ROLES = ("system", "user", "assistant")

# Fields a canonical row may have: what ``data.columns`` can map a dataset's columns onto.
FIELDS = (
    "id",
    "prompt",
    "messages",
    "completion",
    "chosen",
    "rejected",
    "reference",
    "label",
    "task",
    "proposals",
)
# Where a gold answer may sit when the prompt does not end in it, in order of precedence.
REFERENCE_FIELDS = ("reference", "completion", "chosen", "answer", "response")
ID_FIELDS = ("id", "prompt_id")
CONSUMED = set(FIELDS) | set(REFERENCE_FIELDS) | set(ID_FIELDS) | {"text"}


class BadRow(ValueError):
    """A row that cannot become a record; the message is the reason shown in the load report."""


# Deepest nesting of lists and objects a row may have. Real rows nest a few levels (messages -> turn -> content
# parts); a deeper one is reported here, before any recursive code (checks below, json.dumps of its metadata)
# meets it: Python's recursion limit (~1000 frames) would otherwise end the whole load with a RecursionError.
MAX_DEPTH = 32
_SURROGATES = re.compile("[\ud800-\udfff]")


def _has_invalid_utf8(text: str) -> bool:
    # Files are decoded with errors="surrogateescape": an invalid byte becomes a lone surrogate, so the row
    # can be reported instead of the whole file failing to decode. A JSON "\ud800" escape gives one too; no
    # UTF-8 writer (Parquet, the tokenizer) can encode it.
    return _SURROGATES.search(text) is not None


def _find_invalid_utf8(value: Any) -> bool:
    if isinstance(value, str):
        return _has_invalid_utf8(value)
    if isinstance(value, dict):
        return any(_find_invalid_utf8(k) or _find_invalid_utf8(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_find_invalid_utf8(v) for v in value)
    return False


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Levels of lists / objects in ``value`` (a string is 0), counted without recursion and up to ``limit + 1``."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else None
        if children is None:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def as_text(value: Any, field: str) -> str | None:
    """A scalar answer or id as text; None when missing. Numbers are text here (4 -> "4", 4.0 -> "4")."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # before int: bool is an int subclass; BoolQ-style answers
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):  # a missing cell in a pandas-written file
            return None
        if math.isinf(value):  # JSON's 1e999
            raise BadRow(f"'{field}' is {value}, not a usable number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (bytes, bytearray)):
        raise BadRow(f"'{field}' holds bytes, not text")
    raise BadRow(f"'{field}' must be text, got {type(value).__name__}")


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    # Multimodal-style content: a list of parts; text-only parts are joined, anything else cannot be trained on.
    if isinstance(value, list) and value and all(isinstance(p, dict) for p in value):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        kinds = sorted({str(p.get("type")) for p in value if p.get("type") != "text"})
        raise BadRow(f"{where} has non-text content ({', '.join(kinds)})")
    raise BadRow(f"{where} content must be text, got {type(value).__name__}")


def as_messages(value: Any, field: str) -> list[dict]:
    """A conversational field -> [{role, content}]; unknown roles and non-text content are reasons."""
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRow(f"'{field}' must be a non-empty list of {{role, content}} turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise BadRow(f"'{field}' turn {i} must be an object with 'role' and 'content'")
        role = turn["role"]
        if role not in ROLES:
            raise BadRow(f"unknown role {role!r} in '{field}' turn {i} (expected one of {', '.join(ROLES)})")
        turns.append({"role": role, "content": _content(turn["content"], f"'{field}' turn {i}")})
    return turns


SFT_TURNS = ("first", "all")


def conversation_exchange(turns: list[dict], sft_turns: str) -> tuple[list[dict], str | None]:
    """(prompt turns, gold answer or None) of a conversation. 'first': the turns up to and including the first user
    turn (a leading system turn stays) and the assistant reply right after it, as SPIN's official spin/reformat.py
    takes messages[0] and messages[1]: a later turn's gold answer was written for a context of human-written
    turns the model never produced, and SPIN's generated answer must answer the same prompt as the gold one.
    A conversation whose first user turn has no assistant reply after it falls back to 'all': every turn before
    the last assistant turn is the prompt and that turn the gold answer (no assistant turn at the end: None)."""
    if sft_turns not in SFT_TURNS:
        raise ValueError(f"sft_turns must be one of {SFT_TURNS}, got {sft_turns!r}")
    if sft_turns == "first":
        first_user = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
        if first_user is not None and first_user + 1 < len(turns) and turns[first_user + 1]["role"] == "assistant":
            return turns[: first_user + 1], turns[first_user + 1]["content"]
    if turns[-1]["role"] == "assistant":
        return turns[:-1], turns[-1]["content"]
    return turns, None


def _answer_text(value: Any, field: str) -> str | None:
    """A completion / chosen / rejected / reference value: a string (standard) or turns (conversational)
    whose last is the assistant's answer (a preference pair with an implicit prompt repeats the prompt's turns)."""
    if isinstance(value, (list, tuple)):
        turns = as_messages(value, field)
        if turns[-1]["role"] != "assistant":
            raise BadRow(f"'{field}' must end with an assistant turn, got roles {[t['role'] for t in turns]}")
        return turns[-1]["content"]
    return as_text(value, field)


def _json_value(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=True)
        return True
    except (TypeError, ValueError):
        return False


def apply_columns(raw: dict, columns: dict[str, str]) -> dict:
    """Rename the dataset's columns to this repo's fields (``data.columns``: {field: column})."""
    if not columns:
        return raw
    missing = [f"data.columns.{field}={column}" for field, column in columns.items() if column not in raw]
    if missing:
        raise BadRow(f"no column for {', '.join(missing)} (columns: {', '.join(map(str, raw))})")
    sources = set(columns.values())
    row = {k: v for k, v in raw.items() if k not in sources}
    row.update({field: raw[column] for field, column in columns.items()})
    return row


def gsm8k_label(reference: str) -> str:
    """The final number of a GSM8K-style solution ('... #### 18' -> '18'), or ''."""
    found = re.search(r"####\s*([-+]?[\d,]*\.?\d+)", reference)
    return found.group(1).replace(",", "") if found else ""


def normalize_row(
    raw: Any,
    columns: dict[str, str] | None = None,
    default_task: str | None = None,
    require_reference: bool = True,
    sft_turns: str = "first",
) -> tuple[dict, list]:
    """(record fields, notes) for one user row; raise BadRow with the reason when the row cannot be used.
    ``sft_turns``: which exchange of a multi-turn ``messages`` row is the prompt and gold answer
    (``conversation_exchange``).

    notes: columns left out of the row's metadata because JSON cannot hold their values (timestamps, bytes):
    the row is still usable, the column is reported."""
    if not isinstance(raw, dict):
        raise BadRow(f"expected an object, got {type(raw).__name__}")
    if nesting_depth(raw) > MAX_DEPTH:
        raise BadRow(f"nested more than {MAX_DEPTH} levels deep")
    if _find_invalid_utf8(raw):
        bad = sorted(str(k) for k, v in raw.items() if _find_invalid_utf8(v) or _find_invalid_utf8(k))
        raise BadRow(f"invalid UTF-8 in {', '.join(repr(b) for b in bad)}")
    row = apply_columns(raw, columns or {})

    reference: str | None = None
    if row.get("messages") is not None:
        prompt, reference = conversation_exchange(as_messages(row["messages"], "messages"), sft_turns)
    elif row.get("prompt") is not None:
        if isinstance(row["prompt"], (list, tuple)):
            prompt = as_messages(row["prompt"], "prompt")
            if prompt[-1]["role"] == "assistant":
                raise BadRow("'prompt' ends with an assistant turn; the answer belongs in 'completion' or 'chosen'")
        else:
            text = as_text(row["prompt"], "prompt") or ""
            prompt = [{"role": "user", "content": text}]
    elif isinstance(row.get("chosen"), (list, tuple)):  # preference with an implicit prompt
        turns = as_messages(row["chosen"], "chosen")
        if turns[-1]["role"] != "assistant":
            raise BadRow("'chosen' conversation does not end with an assistant turn")
        prompt, reference = turns[:-1], turns[-1]["content"]
    elif row.get("text") is not None:
        raise BadRow(
            "a plain 'text' row has no boundary between prompt and answer; use 'messages', 'prompt' + 'completion', "
            "or map columns with data.columns"
        )
    else:
        raise BadRow(
            "no prompt: needs 'messages', 'prompt' (+ 'completion', 'chosen' or 'reference') or a data.columns "
            f"mapping (columns: {', '.join(map(str, raw))})"
        )
    if not any(t["role"] == "user" and t["content"].strip() for t in prompt):
        raise BadRow("the prompt has no non-empty user turn")

    if isinstance(row.get("label"), bool) and row.get("completion") is not None:
        # TRL's unpaired preference format (KTO): the bool says whether the completion is desirable.
        if not row["label"]:
            raise BadRow("the completion is labelled undesirable (unpaired preference, label=false): not a gold answer")
        row = {k: v for k, v in row.items() if k != "label"}
    label = as_text(row.get("label"), "label") or ""
    if reference is None:
        field = next((f for f in REFERENCE_FIELDS if row.get(f) is not None), None)
        reference = _answer_text(row[field], field) if field else None
    if not (reference or "").strip():
        reference = label  # {prompt, label} rows: the label is the gold answer
    if require_reference and not reference.strip():
        raise BadRow(
            "no gold answer: needs an assistant turn ending 'messages', or 'completion', 'chosen', 'reference' or "
            "'label' (every method trains or judges against it)"
        )

    task = as_text(row.get("task"), "task") or default_task or "none"
    if task not in TASKS:
        raise BadRow(f"'task' {task!r} is not one of {TASKS}")
    if task == "gsm8k" and not label:
        label = gsm8k_label(reference)

    metadata: dict[str, Any] = {}
    if row.get("rejected") is not None:
        metadata["rejected"] = _answer_text(row["rejected"], "rejected")
    if row.get("proposals") is not None:
        proposals = row["proposals"]
        if not (isinstance(proposals, (list, tuple)) and all(isinstance(p, str) for p in proposals)):
            raise BadRow("'proposals' must be a list of strings")
        metadata["proposals"] = list(proposals)
    notes = []
    for key, value in row.items():
        if key in CONSUMED:
            continue
        if _json_value(value):
            metadata[str(key)] = value
        else:
            notes.append(f"column {key!r} ({type(value).__name__}) left out of metadata: JSON cannot hold it")

    row_id = next((as_text(row[f], f) for f in ID_FIELDS if row.get(f) is not None), None)
    if not row_id:
        row_id = hashlib.sha1(json.dumps([prompt, reference]).encode()).hexdigest()[:16]
    return {
        "id": row_id,
        "prompt": prompt,
        "reference": reference,
        "label": label,
        "task": task,
        "metadata": metadata,
    }, notes
