import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.data import likelihood_question, load_dataset, split, take

EXPECTED = {
    "gsm8k": 1319,
    "sst2": 872,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "mmlu": 14042,
    "mbpp": 500,
    "boolq": 3270,
    "mtbench": 80,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_counts_and_schema(name):
    rows, report = load_dataset(name)
    assert len(rows) == EXPECTED[name] and report.malformed == 0
    assert len({r["id"] for r in rows}) == len(rows)
    first = rows[0]
    assert set(first) == {"id", "messages", "reference", "label", "task", "metadata"}
    assert first["messages"][-1]["role"] == "user" and first["messages"][-1]["content"]
    if name in ("gsm8k", "sst2", "arc_easy", "mmlu", "boolq"):
        assert first["label"] and first["reference"]


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
        json.dumps({"id": "a", "prompt": "dup"}),
        json.dumps({"prompt": "no id", "reference": "x", "task": "bogus"}),
        "",
        json.dumps({"prompt": "no id here", "response": "y", "proposals": ["p1", "p2"]}),
    ]
    path.write_text("\n".join(lines))
    rows, report = load_dataset(str(path))
    assert [r["id"] for r in rows][:2] == ["a", "c"] and len(rows) == 3
    assert report.malformed == 4
    assert any("invalid JSON" in r for r in report.reasons)
    assert any("duplicate id" in r for r in report.reasons)
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
    assert len(rows) == 5 and report.malformed == 1


def test_unknown_reference_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        load_dataset("no-such-dataset")


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
