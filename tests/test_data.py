import datetime
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.schema import DataConfig
from data.rows import (
    DataError,
    find_overlap,
    likelihood_question,
    load_dataset,
    prepare,
    prompt_text,
    record,
    reworded,
    split,
    split_prompt,
    take,
)
from methods.llm2llm import wrong_seed_examples
from methods.s3ft import select_target
from methods.spin import build_pairs, sft_examples

EXPECTED = {
    "gsm8k": 1319,
    "sst2": 872,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "mmlu": 14042,
    "hellaswag": 10042,
    "mbpp": 500,
    "boolq": 3270,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_counts_and_schema(name):
    rows, report = load_dataset(name)
    assert len(rows) == EXPECTED[name] and report.malformed == 0
    assert len({r["id"] for r in rows}) == len(rows)
    first = rows[0]
    assert set(first) == {"id", "messages", "reference", "label", "task", "metadata"}
    assert first["messages"][-1]["role"] == "user" and first["messages"][-1]["content"]
    assert all(r["reference"].strip() for r in rows)  # every built-in a job may train on has gold answers
    if name in ("gsm8k", "sst2", "arc_easy", "mmlu", "boolq", "hellaswag"):
        assert first["label"] and first["reference"]


def test_mtbench_has_no_gold_answers_so_only_reference_free_uses_get_its_rows():
    rows, report = load_dataset("mtbench")
    assert rows == [] and report.malformed == 80
    assert "no gold answer" in report.reasons[0]
    prompts, report = load_dataset("mtbench", require_reference=False)  # the benchmarks' prompt set
    assert len(prompts) == 80 and report.malformed == 0


def test_gsm8k_reference_is_clean():
    rows, _ = load_dataset("gsm8k")
    janet = rows[0]
    assert janet["label"] == "18" and "<<" not in janet["reference"] and janet["reference"].endswith("#### 18")


def test_jsonl_malformed_rows_are_reported_and_the_rest_kept(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"id": "a", "prompt": "What is 2+2?", "answer": "4", "label": "4", "task": "gsm8k"}),
        "{not json",
        json.dumps({"id": "b"}),  # no prompt
        json.dumps({"id": "c", "messages": [{"role": "user", "content": "hi"}], "reference": "hello"}),
        json.dumps({"id": "a", "prompt": "dup", "completion": "x"}),
        json.dumps({"prompt": "no id", "reference": "x", "task": "bogus"}),
        "",
        json.dumps({"prompt": "no id here", "response": "y", "proposals": ["p1", "p2"]}),
    ]
    path.write_text("\n".join(lines))
    rows, report = load_dataset(str(path))
    assert [r["id"] for r in rows][:2] == ["a", "c"] and len(rows) == 3
    assert report.malformed == 4
    assert any("line 2: invalid JSON" in r for r in report.reasons)
    assert any("line 3: no prompt" in r for r in report.reasons)
    assert any("line 5: duplicate id 'a'" in r for r in report.reasons)
    assert any("line 6: 'task' 'bogus'" in r for r in report.reasons)
    assert json.loads(rows[2]["metadata"])["proposals"] == ["p1", "p2"]
    assert "4 malformed" in str(report)


def test_parquet_and_hf_folder(tmp_path):
    table = pa.Table.from_pylist([{"id": str(i), "prompt": f"q{i}", "reference": f"a{i}"} for i in range(5)])
    pq.write_table(table, tmp_path / "d.parquet")
    rows, report = load_dataset(str(tmp_path / "d.parquet"))
    assert len(rows) == 5 and report.malformed == 0
    import datasets

    datasets.Dataset.from_list(table.to_pylist() + [{"id": "5", "prompt": "", "reference": "x"}]).save_to_disk(
        str(tmp_path / "hf")
    )
    rows, report = load_dataset(str(tmp_path / "hf"))
    assert len(rows) == 5 and report.reasons == ["row 5: the prompt has no non-empty user turn"]


def test_unknown_reference_is_a_clear_error():
    with pytest.raises(DataError, match="not a built-in"):
        load_dataset("no-such-dataset")
    with pytest.raises(DataError, match="data.eval: './no/such/file.jsonl' is neither a built-in"):
        load_dataset("./no/such/file.jsonl", key="data.eval")
    with pytest.raises(DataError, match="'data/train.jsonl' is neither a built-in"):  # not taken for a hub id
        load_dataset("data/train.jsonl")


def test_split_is_deterministic_and_disjoint():
    rows, _ = load_dataset("sst2")
    train, evals = split(rows, seed=3, eval_fraction=0.25)
    train2, evals2 = split(list(reversed(rows)), seed=3, eval_fraction=0.25)
    assert [r["id"] for r in evals] == [r["id"] for r in evals2]
    assert not {r["id"] for r in train} & {r["id"] for r in evals}
    assert len(train) + len(evals) == len(rows)
    assert [r["id"] for r in take(train, 10, 3)] == [r["id"] for r in take(train2, 10, 3)]
    assert split(rows, seed=4, eval_fraction=0.25)[1] != evals


def test_likelihood_questions_are_cloze_for_choices_and_keep_the_prompt_for_labels():
    arc = take(load_dataset("arc_easy")[0], 1, 0)[0]
    messages, candidates, gold = likelihood_question(arc)
    assert arc["reference"] == f"{arc['label']}. {candidates[gold]}" and len(candidates) >= 3
    assert messages[0]["content"] in arc["messages"][0]["content"] and "A. " not in messages[0]["content"]
    boolq = take(load_dataset("boolq")[0], 1, 0)[0]
    assert likelihood_question(boolq) == (boolq["messages"], ["no", "yes"], ["no", "yes"].index(boolq["reference"]))
    assert likelihood_question(take(load_dataset("gsm8k")[0], 1, 0)[0]) is None  # open answer: nothing to score


@pytest.mark.parametrize("name", ["sst2", "boolq", "gsm8k"])
def test_reworded_rows_keep_input_and_answer_under_another_instruction(name):
    from actors.judge import rule_verdict

    rows = take(load_dataset(name)[0], 20, 0)
    for row in rows:
        other = reworded(row)
        assert other is not None and other["id"] == row["id"] and other["reference"] == row["reference"]
        assert split_prompt(other)[1] == split_prompt(row)[1]  # the same review / passage / problem
        instruction = split_prompt(row)[0] + split_prompt(row)[2]
        assert instruction.strip() and instruction.strip() not in prompt_text(other)  # the wording changed
        assert reworded(other)["messages"] == row["messages"]  # and back
        assert rule_verdict(other, row["reference"]) == "yes"  # the verifier reads the same gold answer
    if name != "gsm8k":  # label tasks keep their candidates for log-likelihood scoring, under the new prompt
        question = likelihood_question(reworded(rows[0]))
        assert question[1:] == likelihood_question(rows[0])[1:] and question[0] == reworded(rows[0])["messages"]


def test_rows_without_a_reworded_instruction_are_not_reworded():
    assert reworded(take(load_dataset("arc_easy")[0], 1, 0)[0]) is None
    assert reworded(record("x", "Is this good?", "yes", "yes", "classification", labels=["no", "yes"])) is None
    sst2 = take(load_dataset("sst2")[0], 1, 0)[0]
    edited = {**sst2, "messages": [{"role": "user", "content": "Classify: great film"}]}  # not in its template
    assert reworded(edited) is None


# ---------------------------------------------------------------------------------------------------
# TRL's dataset formats -> what each method trains on
# ---------------------------------------------------------------------------------------------------


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Answer in one word."}

# name -> (row with its answer, the same row without one, data.columns, expected prompt turns).
# Row i asks question q(i); its gold answer is a(i).
q = "What is the capital of country number {}?".format
a = "City {}.".format
FORMATS = {
    "language_modelling_conversational": (
        lambda i: {"messages": [SYSTEM, user(q(i)), assistant(a(i))]},
        lambda i: {"messages": [SYSTEM, user(q(i))]},
        {},
        lambda i: [SYSTEM, user(q(i))],
    ),
    "prompt_completion_standard": (
        lambda i: {"prompt": q(i), "completion": a(i)},
        lambda i: {"prompt": q(i), "completion": ""},
        {},
        lambda i: [user(q(i))],
    ),
    "prompt_completion_conversational": (
        lambda i: {"prompt": [SYSTEM, user(q(i))], "completion": [assistant(a(i))]},
        lambda i: {"prompt": [SYSTEM, user(q(i))], "completion": [assistant("  ")]},
        {},
        lambda i: [SYSTEM, user(q(i))],
    ),
    "preference_standard": (
        lambda i: {"prompt": q(i), "chosen": a(i), "rejected": "Nowhere."},
        lambda i: {"prompt": q(i), "rejected": "Nowhere."},
        {},
        lambda i: [user(q(i))],
    ),
    "preference_conversational": (
        lambda i: {"prompt": [user(q(i))], "chosen": [assistant(a(i))], "rejected": [assistant("Nowhere.")]},
        lambda i: {"prompt": [user(q(i))], "chosen": [assistant("")], "rejected": [assistant("Nowhere.")]},
        {},
        lambda i: [user(q(i))],
    ),
    "preference_implicit_prompt": (
        lambda i: {"chosen": [user(q(i)), assistant(a(i))], "rejected": [user(q(i)), assistant("Nowhere.")]},
        lambda i: {"chosen": [user(q(i)), assistant("")], "rejected": [user(q(i)), assistant("Nowhere.")]},
        {},
        lambda i: [user(q(i))],
    ),
    "column_mapping": (
        lambda i: {"question": q(i), "gold": a(i), "source": "atlas"},
        lambda i: {"question": q(i), "gold": None, "source": "atlas"},
        {"prompt": "question", "reference": "gold"},
        lambda i: [user(q(i))],
    ),
    "ultrachat_200k": (  # SPIN's paper data: prompt, prompt_id, messages (multi-turn): the first exchange is kept
        lambda i: {
            "prompt": q(i),
            "prompt_id": f"pid{i}",
            "messages": [user(q(i)), assistant(a(i)), user("And its river?"), assistant("The Long River.")],
        },
        lambda i: {"prompt": q(i), "prompt_id": f"pid{i}", "messages": [user(q(i))]},
        {},
        lambda i: [user(q(i))],
    ),
}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_trl_format_becomes_spin_pairs_s3ft_targets_and_llm2llm_seeds_with_the_gold_answer(fmt, tmp_path):
    good, without_answer, columns, prompt = FORMATS[fmt]
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), without_answer(1), good(2), without_answer(3)])
    rows, report = load_dataset(path, columns=columns)

    assert report.malformed == 2 and report.kept == 2  # rows without an answer are malformed, with the reason
    assert all(
        where in ("line 2", "line 4") and reason.startswith("no gold answer") for where, reason in report.bad_rows
    )
    assert [r["messages"] for r in rows] == [prompt(0), prompt(2)]  # the answer is not part of the prompt
    assert [r["reference"] for r in rows] == [a(0), a(2)]
    if fmt == "ultrachat_200k":
        assert [r["id"] for r in rows] == ["pid0", "pid2"]
    if fmt.startswith("preference"):
        assert json.loads(rows[0]["metadata"])["rejected"] == "Nowhere."

    pairs = build_pairs(rows, {r["id"]: {"response": "Own answer."} for r in rows}, iteration=0)
    assert [(p["messages"], p["chosen"], p["rejected"]) for p in pairs] == [
        (prompt(0), a(0), "Own answer."),
        (prompt(2), a(2), "Own answer."),
    ]
    assert [e["response"] for e in sft_examples(rows)] == [a(0), a(2)]
    assert [select_target(r, "Own answer.", "no", None, None) for r in rows] == [("gold", a(0)), ("gold", a(2))]
    wrong = wrong_seed_examples(rows, {r["id"]: "no" for r in rows})
    assert [(r["messages"], r["reference"]) for r in wrong] == [(prompt(0), a(0)), (prompt(2), a(2))]


def test_multi_turn_rows_keep_the_first_exchange_unless_data_sft_turns_is_all(tmp_path):
    """SPIN's official spin/reformat.py keeps messages[0] (user) and messages[1] (assistant, the gold answer) of an
    UltraChat conversation; data.sft_turns=all keeps the whole conversation before the last assistant turn."""
    conversation = [SYSTEM, user("Hello"), assistant("Hi!"), user(q(0)), assistant(a(0))]
    rows_in = [
        {"id": "multi", "messages": conversation},
        {"id": "no-reply-first", "messages": [user("Hello"), user(q(1)), assistant(a(1))]},  # falls back to 'all'
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows_in)
    first, _ = load_dataset(path)
    assert [(r["messages"], r["reference"]) for r in first] == [
        ([SYSTEM, user("Hello")], "Hi!"),
        ([user("Hello"), user(q(1))], a(1)),
    ]
    every, _ = load_dataset(path, sft_turns="all")
    assert [(r["messages"], r["reference"]) for r in every] == [
        ([SYSTEM, user("Hello"), assistant("Hi!"), user(q(0))], a(0)),
        ([user("Hello"), user(q(1))], a(1)),
    ]
    with pytest.raises(ValueError, match="sft_turns must be one of"):
        load_dataset(path, sft_turns="last")


def test_data_sft_turns_is_a_checked_config_field(tmp_path):
    from configs.schema import ConfigError, load_config

    assert load_config(None, []).data.sft_turns == "first"
    assert load_config(None, ["data.sft_turns=all"]).data.sft_turns == "all"
    with pytest.raises(ConfigError, match="data.sft_turns"):
        load_config(None, ["data.sft_turns=last"])


def test_a_plain_text_row_is_reported_not_split_by_guess(tmp_path):
    rows, report = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"text": "Q: hi A: hello"}]))
    assert rows == [] and "no boundary between prompt and answer" in report.reasons[0]


def test_unpaired_preference_rows_keep_only_desirable_completions(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "2+2?", "completion": "4", "label": True}, {"prompt": "2+3?", "completion": "7", "label": False}],
    )
    rows, report = load_dataset(path)
    assert [(r["reference"], r["label"]) for r in rows] == [("4", "")]
    assert report.reasons == [
        "line 2: the completion is labelled undesirable (unpaired preference, label=false): not a gold answer"
    ]


def test_a_label_alone_is_a_gold_answer_and_gsm8k_labels_come_from_the_solution(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "Great film!", "label": "positive"}, {"prompt": "2+2?", "answer": "2+2=4\n#### 4"}],
    )
    rows, _ = load_dataset(path, task="gsm8k")
    assert rows[0]["reference"] == "positive" and rows[1]["label"] == "4" and rows[1]["task"] == "gsm8k"


# ---------------------------------------------------------------------------------------------------
# File kinds
# ---------------------------------------------------------------------------------------------------

PLAIN = [{"id": f"r{i}", "prompt": q(i), "completion": a(i)} for i in range(4)]
CONVERSATIONAL = [{"id": f"c{i}", "messages": [user(q(i)), assistant(a(i))]} for i in range(4)]


def as_loaded(rows):
    return [(r["id"], r["messages"], r["reference"]) for r in rows]


def expected(rows, folder: Path):
    return as_loaded(load_dataset(write_jsonl(folder / f"expected-{rows[0]['id']}.jsonl", rows))[0])


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "csv", "parquet", "save_to_disk", "data_folder"])
def test_every_file_kind_loads_the_same_rows(kind, tmp_path):
    import gzip

    import datasets

    for rows in (PLAIN, CONVERSATIONAL):
        if kind == "csv" and rows is CONVERSATIONAL:
            continue  # CSV cells are strings: conversational data has no CSV form
        target = tmp_path / f"{rows[0]['id']}.{kind}"
        if kind == "jsonl":
            write_jsonl(target, rows)
        elif kind == "jsonl.gz":
            target.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
        elif kind == "json":
            target.write_text(json.dumps(rows))
        elif kind == "csv":
            target.write_text(
                "id,prompt,completion\n" + "".join(f'{r["id"]},"{r["prompt"]}",{r["completion"]}\n' for r in rows)
            )
        elif kind == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), target)
        elif kind == "save_to_disk":
            datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(target))
        else:  # a folder of data files, as datasets.load_dataset(folder) reads it
            target.mkdir()
            write_jsonl(target / "train.jsonl", rows)
        loaded, report = load_dataset(str(target))
        assert report.malformed == 0 and as_loaded(loaded) == expected(rows, tmp_path), kind


# ---------------------------------------------------------------------------------------------------
# Bad rows: each reported with its reason, never a crash
# ---------------------------------------------------------------------------------------------------


def test_invalid_utf8_is_reported_per_row_in_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(
        b'{"prompt": "ok", "completion": "fine"}\n{"prompt": "caf\xe9 \xff", "completion": "x"}\n'
        b'{"prompt": "ok2", "completion": "fine"}\n'
    )
    rows, report = load_dataset(str(jsonl))
    assert len(rows) == 2 and report.reasons == ["line 2: invalid UTF-8 in 'prompt'"]
    csv_file = tmp_path / "d.csv"
    csv_file.write_bytes(b"prompt,completion\nok,fine\nbad,\xc3\x28\nok2,fine\n")
    rows, report = load_dataset(str(csv_file))
    assert len(rows) == 2 and report.reasons == ["line 3: invalid UTF-8 in 'completion'"]
    # A Parquet writer that did not validate its strings: the row is reported, its neighbours are read.
    valid = pa.array(["ok", "bad!", "ok2"], pa.string())
    validity, offsets, data = valid.buffers()
    corrupt = bytearray(data.to_pybytes())
    corrupt[2] = 0xFF  # first byte of "bad!"
    prompts = pa.Array.from_buffers(pa.string(), 3, [validity, offsets, pa.py_buffer(bytes(corrupt))])
    pq.write_table(pa.table({"prompt": prompts, "completion": ["a", "b", "c"]}), tmp_path / "d.parquet")
    rows, report = load_dataset(str(tmp_path / "d.parquet"))
    assert [r["reference"] for r in rows] == ["a", "c"]
    assert report.reasons == ["row 1: invalid UTF-8 (invalid start byte, byte 0xff)"]


def test_parquet_columns_json_cannot_hold_are_reported(tmp_path):
    created = datetime.datetime(2024, 5, 1, 12, 0)
    table = pa.table(
        {
            "prompt": ["q0", "q1", "q2"],
            "completion": pa.array([b"a0", b"a1", b"a2"], pa.binary()),  # the answer as bytes: unusable
            "created": [created] * 3,
        }
    )
    pq.write_table(table, tmp_path / "bytes.parquet")
    rows, report = load_dataset(str(tmp_path / "bytes.parquet"))
    assert rows == [] and report.reasons[0] == "row 0: 'completion' holds bytes, not text"

    table = pa.table(
        {
            "prompt": ["q0", "q1"],
            "completion": ["a0", "a1"],
            "created": [created, created],  # a timestamp beside the data: the row is fine, the column is left out
            "blob": pa.array([b"\x00\x01", None], pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "extra.parquet")
    rows, report = load_dataset(str(tmp_path / "extra.parquet"))
    assert [r["reference"] for r in rows] == ["a0", "a1"] and report.malformed == 0
    assert json.loads(rows[1]["metadata"]) == {"blob": None}
    assert report.notes == [
        ("row 0", "column 'created' (datetime) left out of metadata: JSON cannot hold it"),
        ("row 0", "column 'blob' (bytes) left out of metadata: JSON cannot hold it"),
        ("row 1", "column 'created' (datetime) left out of metadata: JSON cannot hold it"),
    ]
    assert "3 notes" in str(report)


def test_numeric_answers_are_text(tmp_path):
    table = pa.table({"question": ["2+2?", "1.5*2?", "half of 1?"], "answer": [4.0, 3.0, 0.5]})
    pq.write_table(table, tmp_path / "d.parquet")
    rows, report = load_dataset(str(tmp_path / "d.parquet"), columns={"prompt": "question"}, task="gsm8k")
    assert [r["reference"] for r in rows] == ["4", "3", "0.5"] and report.malformed == 0
    rows, _ = load_dataset(
        write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2?", "answer": 4}]), columns={"prompt": "question"}
    )
    assert rows[0]["reference"] == "4"


def test_unknown_roles_and_other_shape_errors_are_reported(tmp_path):
    sharegpt = {"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "hello"}]}
    rows, report = load_dataset(
        write_jsonl(
            tmp_path / "d.jsonl",
            [
                sharegpt,
                {"messages": [user("look"), {"role": "assistant", "content": [{"type": "image"}]}]},
                {"prompt": [user("q"), assistant("a")]},
                {"question": "q", "answer": "a"},
                {"prompt": "q", "completion": "a"},
            ],
        ),
        columns={"prompt": "prompt"},
    )
    assert len(rows) == 1
    assert report.reasons == [
        "line 1: no column for data.columns.prompt=prompt (columns: messages)",
        "line 2: no column for data.columns.prompt=prompt (columns: messages)",
        "line 3: 'prompt' ends with an assistant turn; the answer belongs in 'completion' or 'chosen'",
        "line 4: no column for data.columns.prompt=prompt (columns: question, answer)",
    ]
    rows, report = load_dataset(str(tmp_path / "d.jsonl"))
    assert report.reasons[:3] == [
        "line 1: unknown role 'human' in 'messages' turn 0 (expected one of system, user, assistant)",
        "line 2: 'messages' turn 1 has non-text content (image)",
        "line 3: 'prompt' ends with an assistant turn; the answer belongs in 'completion' or 'chosen'",
    ]
    assert report.reasons[3].startswith("line 4: no prompt")
    (tmp_path / "list.json").write_text(json.dumps(["just a string", {"prompt": "q", "completion": "a"}]))
    rows, report = load_dataset(str(tmp_path / "list.json"))
    assert len(rows) == 1 and report.reasons == ["row 0: expected an object, got str"]


# ---------------------------------------------------------------------------------------------------
# A dataset given by hub id, offline from a hub cache built here
# ---------------------------------------------------------------------------------------------------

ULTRACHAT_README = """---
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: data/train_sft-*
  - split: test_sft
    path: data/test_sft-*
- config_name: tiny
  data_files:
  - split: train_sft
    path: tiny/train_sft-*
---
# UltraChat-200k-shaped test data
"""


def ultrachat_rows(prefix: str, n: int) -> list[dict]:
    return [
        {
            "prompt": f"{prefix} question {i}?",
            "prompt_id": f"{prefix}-{i:04d}",
            "messages": [user(f"{prefix} question {i}?"), assistant(f"{prefix} answer {i}.")],
        }
        for i in range(n)
    ]


@pytest.fixture
def hub_dataset(tmp_path) -> str:
    """A hub cache holding `acme/ultrachat-mini` as `huggingface-cli download --repo-type dataset` leaves it."""
    cache = tmp_path / "hub"
    repo = cache / "datasets--acme--ultrachat-mini"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    for folder, split_name, prefix, n in (
        ("data", "train_sft", "train", 12),
        ("data", "test_sft", "test", 4),
        ("tiny", "train_sft", "tiny", 3),
    ):
        (snapshot / folder).mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist(ultrachat_rows(prefix, n)), snapshot / folder / f"{split_name}-00000-of-00001.parquet"
        )
    (snapshot / "README.md").write_text(ULTRACHAT_README)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return str(cache)


def test_a_dataset_by_hub_id_loads_offline_through_datasets_load_dataset(hub_dataset):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # no network: the id resolves from the hub cache
    rows, report = load_dataset("acme/ultrachat-mini", split="train_sft", cache_dir=hub_dataset)
    assert report.source == "acme/ultrachat-mini[train_sft]" and report.kept == 12
    assert rows[0]["id"] == "train-0000" and rows[0]["messages"] == [user("train question 0?")]
    assert rows[0]["reference"] == "train answer 0."
    tiny, report = load_dataset("acme/ultrachat-mini", split="train_sft", subset="tiny", cache_dir=hub_dataset)
    assert [r["id"] for r in tiny] == ["tiny-0000", "tiny-0001", "tiny-0002"]
    with pytest.raises(DataError, match=r"data.train: split 'train' is not in .*train_sft, test_sft"):
        load_dataset("acme/ultrachat-mini", split="train", key="data.train", cache_dir=hub_dataset)

    # As a job's data: SPIN training rows from train_sft, evaluation from its test_sft split.
    data = prepare(
        DataConfig(
            train="acme/ultrachat-mini",
            train_split="train_sft",
            eval_split="test_sft",
            n_train=0,
            cache_dir=hub_dataset,
        ),
        seed=0,
    )
    assert len(data.train) == 12 and {r["id"] for r in data.eval} == {f"test-{i:04d}" for i in range(4)}
    assert data.eval_source == "acme/ultrachat-mini[test_sft]" and not data.overlap
    pairs = build_pairs(data.train, {r["id"]: {"response": "mine"} for r in data.train}, 0)
    assert len(pairs) == 12 and all(p["chosen"].startswith("train answer") for p in pairs)


def test_a_missing_hub_dataset_is_a_data_error_naming_the_key(tmp_path):
    with pytest.raises(DataError, match="data.train: datasets.load_dataset could not load 'acme/nothing'"):
        prepare(DataConfig(train="acme/nothing", cache_dir=str(tmp_path)), seed=0)


# ---------------------------------------------------------------------------------------------------
# Train / eval hygiene and "too few rows"
# ---------------------------------------------------------------------------------------------------


def test_overlap_is_found_by_id_and_by_normalized_prompt_text():
    train = [record("t1", "What is 2+2?", "4"), record("shared", "Name a colour.", "red")]
    evals = [
        record("shared", "Something else entirely", "x"),  # same id
        record("e2", "  what IS 2 + 2 ", "4"),  # same question: case, spacing, punctuation differ
        record("e3", [SYSTEM, user("What is 2+2?")], "4"),  # same question under a system prompt
        record("e4", "What is 3+3?", "6"),
    ]
    overlap = find_overlap(train, evals)
    assert overlap.by_id == ["shared"] and overlap.by_text == [("e2", "t1"), ("e3", "t1")]
    assert "1 by id" in str(overlap) and "2 by prompt text" in str(overlap)
    assert not find_overlap(train, evals[3:])


def test_a_separate_eval_set_overlapping_the_training_data_stops_the_job(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"id": f"t{i}", "prompt": q(i), "completion": a(i)} for i in range(6)]
    )
    leak_by_id = write_jsonl(tmp_path / "by_id.jsonl", [{"id": "t3", "prompt": "Unrelated?", "completion": "x"}])
    leak_by_text = write_jsonl(tmp_path / "by_text.jsonl", [{"id": "e1", "prompt": q(2).upper(), "completion": a(2)}])
    clean = write_jsonl(tmp_path / "clean.jsonl", [{"id": "e1", "prompt": "Unrelated?", "completion": "x"}])
    with pytest.raises(DataError, match="1 by id"):
        prepare(DataConfig(train=train, eval=leak_by_id), seed=0)
    with pytest.raises(DataError, match=r"1 by prompt text \(eval = train, first: e1 = t2\)"):
        prepare(DataConfig(train=train, eval=leak_by_text, n_train=1), seed=0)  # checked against all of train
    allowed = prepare(DataConfig(train=train, eval=leak_by_text, allow_overlap=True), seed=0)
    assert allowed.overlap.by_text == [("e1", "t2")]
    assert not prepare(DataConfig(train=train, eval=clean), seed=0).overlap
    with pytest.raises(DataError, match=r"data.eval / data.general_eval: .*1 by prompt text"):  # forgetting set too
        prepare(DataConfig(train=train, eval=clean, general_eval=leak_by_text), seed=0)


def test_general_eval_takes_n_general_rows_else_n_eval(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"id": f"t{i}", "prompt": q(i), "completion": a(i)} for i in range(6)]
    )
    general = write_jsonl(
        tmp_path / "general.jsonl", [{"id": f"g{i}", "prompt": f"Name {i}?", "completion": "x"} for i in range(9)]
    )
    assert len(prepare(DataConfig(train=train, n_eval=2, general_eval=general), seed=0).general) == 2
    data = prepare(DataConfig(train=train, n_eval=2, general_eval=general, n_general=7), seed=0)
    assert len(data.eval) == 2 and len(data.general) == 7
    assert len(prepare(DataConfig(train=train, n_eval=2, general_eval=general, n_general=0), seed=0).general) == 9


def test_a_split_of_one_source_keeps_a_duplicated_question_on_one_side(tmp_path):
    rows = [{"id": f"r{i}", "prompt": q(i), "completion": a(i)} for i in range(20)]
    rows += [{"id": f"dup{i}", "prompt": q(i) + " ", "completion": a(i)} for i in range(20)]  # same questions
    data = prepare(DataConfig(train=write_jsonl(tmp_path / "d.jsonl", rows), n_train=0, n_eval=0), seed=0)
    assert not find_overlap(data.train, data.eval) and len(data.eval) == 20
    assert len(data.train) < 20  # the copies of held-out questions left the training side


def test_too_few_usable_rows_stop_before_any_work_with_the_reason(tmp_path):
    unanswered = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user(q(i))]} for i in range(5)])
    with pytest.raises(DataError, match=r"data.train: 0 usable rows.*line 1: no gold answer"):
        prepare(DataConfig(train=unanswered), seed=0)
    some = write_jsonl(tmp_path / "e.jsonl", [{"prompt": q(i), "completion": a(i)} for i in range(4)])
    with pytest.raises(DataError, match="data.train: 2 usable rows, fewer than data.min_rows=3"):
        prepare(DataConfig(train=some, min_rows=3), seed=0)
    with pytest.raises(DataError, match="data.task: 'maths' is not one of"):
        prepare(DataConfig(train=some, task="maths"), seed=0)
    with pytest.raises(DataError, match="data.columns.question: 'question' is not a field"):  # reversed mapping
        prepare(DataConfig(train=some, columns={"question": "prompt"}), seed=0)
