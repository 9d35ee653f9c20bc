"""Hostile input gets a reason per row, never a traceback (issue 28, item 10).

The cases found by hand first (each crashed the loader before), then property-based tests (hypothesis) over the
JSONL, CSV, YAML and override parsers: whatever the bytes, a parser returns rows (every bad one reported with its
reason, every kept one writable to Parquet) or raises the project's own DataError / ConfigError."""

from __future__ import annotations

import io
import json
import string
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs.schema import ConfigError, JobConfig, load_config
from data.formats import FIELDS, MAX_DEPTH, BadRow
from data.rows import DataError, _open_text, load_dataset, normalize, shard_rows

GOOD = json.dumps({"prompt": "What is 2+2?", "reference": "4"})
DEEP = "[" * 100_000 + "]" * 100_000


def load_jsonl(tmp_path: Path, *lines: str):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return load_dataset(str(path))


# -- data files: one reason per bad row ----------------------------------------------------------------------


def test_a_line_nested_100k_deep_is_one_malformed_row(tmp_path):
    rows, report = load_jsonl(tmp_path, GOOD, DEEP, '{"prompt": "x", "reference": "y", "n": ' + DEEP + "}")
    assert len(rows) == 1
    assert report.reasons == [f"line {n}: invalid JSON (nested too deeply to read)" for n in (2, 3)]


def test_a_row_nested_deeper_than_the_limit_but_readable_is_malformed(tmp_path):
    # ~900 levels: json reads it, the checks after it (and json.dumps of its metadata) used to recurse into it
    deep = "[" * 900 + "]" * 900
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH  # the row itself is a level: this value reaches MAX_DEPTH + 1
    rows, report = load_jsonl(
        tmp_path,
        json.dumps(
            {"prompt": "a", "reference": "b", "tree": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))}
        ),
        '{"prompt": "x", "reference": "y", "tree": ' + deep + "}",
        '{"prompt": "x2", "reference": "y", "tree": ' + ok + "}",
    )
    assert len(rows) == 1
    assert report.reasons == [f"line {n}: nested more than {MAX_DEPTH} levels deep" for n in (2, 3)]


def test_an_integer_of_more_than_4300_digits_is_one_malformed_row(tmp_path):
    rows, report = load_jsonl(tmp_path, GOOD, '{"prompt": "x", "reference": ' + "9" * 5000 + "}")
    assert len(rows) == 1
    assert report.reasons == ["line 2: invalid JSON (an integer of 5000 digits; at most 4300 can be read)"]


def test_unpaired_surrogate_escapes_and_infinite_numbers_are_malformed_rows(tmp_path):
    # "\ud800" is valid JSON but no UTF-8 writer can encode it: it crashed the Parquet write of the phase after
    rows, report = load_jsonl(
        tmp_path,
        GOOD,
        '{"prompt": "hi \\ud800", "reference": "y"}',
        '{"prompt": "inf", "reference": 1e999}',
        '{"prompt": "inf id", "reference": "y", "id": -1e999}',
    )
    assert len(rows) == 1
    assert report.reasons == [
        "line 2: invalid UTF-8 in 'prompt'",
        "line 3: 'reference' is inf, not a usable number",
        "line 4: 'id' is -inf, not a usable number",
    ]
    pa.Table.from_pylist(rows)  # what the phases write


def test_a_json_document_too_deep_to_read_fails_the_file_naming_it(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[" + GOOD + ", " + DEEP + "]")
    with pytest.raises(DataError, match=r"d\.json: invalid JSON \(nested too deeply to read\)"):
        load_dataset(str(path))
    path.write_text('{"rows": [{"prompt": "x", "reference": ' + "1" * 4400 + "}]}")
    with pytest.raises(DataError, match=r"d\.json: invalid JSON \(an integer of 4400 digits"):
        load_dataset(str(path))


def test_a_reason_quoting_a_huge_value_is_cut(tmp_path):
    role = "r" * 100_000
    line = json.dumps({"messages": [{"role": role, "content": "x"}], "reference": "y"})
    _, report = load_jsonl(tmp_path, GOOD, line)
    (reason,) = report.reasons
    assert reason.startswith("line 2: unknown role 'rrr") and reason.endswith(" characters)") and len(reason) < 600


def test_a_streamed_shard_reports_the_same_reasons():
    # data.streaming's read tasks parse a shard with shard_rows + normalize: a deep line is a row's reason there
    text = "\n".join([GOOD, DEEP, '{"prompt": "x", "reference": ' + "9" * 5000 + "}"]).encode()
    reasons = []
    for where, raw in shard_rows(io.BytesIO(text), "s.jsonl"):
        try:
            normalize(raw, {}, None, require_reference=True)
        except BadRow as err:
            reasons.append(f"{where}: {err}")
    assert reasons == [
        "line 2: invalid JSON (nested too deeply to read)",
        "line 3: invalid JSON (an integer of 5000 digits; at most 4300 can be read)",
    ]


def test_csv_oversized_fields_and_nul_bytes_are_rows_not_crashes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'prompt,reference\nhi,yo\n"' + b"a" * 200_000 + b'",b\nh\x00i,b\nhey,you\n')
    rows, report = load_dataset(str(path))
    assert [r["reference"] for r in rows] == ["yo", "b", "you"]  # a NUL byte is text like any other
    assert report.reasons == ["line 3: invalid CSV (field larger than field limit (131072))"]


# -- config files and overrides: a ConfigError naming the key or file ----------------------------------------


def load_yaml(tmp_path: Path, text: str | bytes):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("? [1, 2]\n: 3\n", r"a key must be a name, got list \[1, 2\] \(line 1 of .*c\.yaml\)"),
        ("training: {[1]: 2}\n", r"a key must be a name, got list \[1\] \(line 1 of .*c\.yaml\)"),
        ("training:\n  {a: 1}: 2\n", r"a key must be a name, got dict"),
        ("training:\n  lr: " + "1" * 5000 + "\n", r"Exceeds the limit \(4300 digits\).*\(line 2 of .*c\.yaml\)"),
        ("run: {seed: 0x" + "f" * 5000 + "}\n", r"an integer of 20000 bits does not fit in 64 \(line 1 of"),
        ("run: {seed: 0x" + "f" * 20 + "}\n", r"an integer of 80 bits does not fit in 64"),
        ("run: {id: 2020-13-45}\n", r"'2020-13-45': month must be in 1\.\.12 \(line 1 of"),
        ("[" * 100_000, r"c\.yaml: not valid YAML: nested too deeply to read"),
    ],
)
def test_hostile_yaml_is_a_config_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_yaml(tmp_path, text)


def test_a_config_file_that_is_not_utf8_or_not_a_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--config: .*c\.yaml is not UTF-8 text \(invalid start byte at byte 11\)"):
        load_yaml(tmp_path, b"run: {id: x\xff}\n")
    with pytest.raises(ConfigError, match=r"--config: cannot read .* \(Is a directory\)"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.lr=" + "1" * 5000, r"Exceeds the limit \(4300 digits\).*\(line 1 of training\.lr\)"),
        ("training={[1]: 2}", r"a key must be a name, got list \[1\] \(line 1 of training\)"),
        ("run.seed=0x" + "f" * 40, r"an integer of 160 bits does not fit in 64 \(line 1 of run\.seed\)"),
        ("run.id=2020-13-45", r"month must be in 1\.\.12 \(line 1 of run\.id\)"),
        ("training.lr=" + "[" * 100_000, r"training\.lr: not valid YAML: nested too deeply to read"),
    ],
)
def test_hostile_overrides_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_overrides_nested_past_the_recursion_limit_are_a_config_error():
    deep = ".".join(["a"] * 5000) + "=1"
    with pytest.raises(ConfigError, match="overrides: sections nested too deeply"):
        load_config(None, [deep, deep])  # the second one merges into the first, a level at a time


# -- property-based: any input, rows or the project's own error ---------------------------------------------

# Bounded time: the four properties below take ~10-15 s together on a 2-core box.
BOUNDED = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=30)  # surrogates included
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), any_text)  # floats: inf and nan too
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3), max_leaves=12
)
turn = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"]) | any_text, "content": json_value | any_text}
)
row_like = st.dictionaries(
    st.sampled_from([*FIELDS, "answer", "response", "prompt_id", "text", "extra"]) | any_text,
    json_value | st.lists(turn, max_size=3) | any_text,
    max_size=6,
)


jsonl_line = st.one_of(
    row_like.map(json.dumps),
    json_value.map(json.dumps),
    st.integers(4290, 4400).map(lambda n: '{"prompt": "p", "reference": -' + "9" * n + "}"),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: '{"prompt": "p", "reference": "r", "x": ' + "[" * n + "]" * n + "}"),
    any_text,
)
raw_bytes = st.binary(max_size=60)


def _parsed_or_own_error(path: Path):
    try:
        rows, report = load_dataset(str(path))
    except DataError:
        return None
    assert report.kept == len(rows)
    pa.Table.from_pylist(rows)  # every kept row survives the Parquet write the phases do next
    for row in rows:
        assert isinstance(row["id"], str) and row["reference"].strip()
        assert all(isinstance(t["content"], str) for t in row["messages"])
        json.loads(row["metadata"])
    return rows, report


@BOUNDED
@given(lines=st.lists(jsonl_line, max_size=6), noise=st.lists(raw_bytes, max_size=2))
def test_any_jsonl_gives_rows_and_reasons_or_a_data_error(lines, noise):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.jsonl"
        data = b"\n".join(line.encode("utf-8", "surrogatepass") for line in lines) + b"\n" + b"\n".join(noise)
        path.write_bytes(data)
        result = _parsed_or_own_error(path)
        if result is not None:  # every non-blank line is a kept row or a reason
            rows, report = result
            with _open_text(path) as fh:
                lines_read = sum(1 for line in fh if line.strip())
            assert report.kept + report.malformed == lines_read


csv_cell = st.text(st.sampled_from(list(string.printable) + ['"', ",", "\x00", "\r", "é", "\udcff"]), max_size=12)


@BOUNDED
@given(
    header=st.lists(st.sampled_from(["prompt", "reference", "id", "label", "task", "x"]) | csv_cell, max_size=4),
    cells=st.lists(st.lists(csv_cell, max_size=5), max_size=5),
    noise=raw_bytes,
)
def test_any_csv_gives_rows_and_reasons_or_a_data_error(header, cells, noise):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.csv"
        text = "\n".join(",".join(row) for row in [header, *cells])
        path.write_bytes(text.encode("utf-8", "surrogateescape") + noise)
        _parsed_or_own_error(path)


config_keys = st.sampled_from(["run", "training", "pools", "cluster", "data", "spin", "lr", "seed", "id", "env"])
yaml_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(config_keys | any_text, inner, max_size=3),
    max_leaves=10,
)
yaml_fragment = st.sampled_from(
    [
        "? [1, 2]\n: 3\n",
        "{[1]: 2}",
        "run: {id: 2020-13-45}",
        "&a [*a]",
        "!!python/object:os.system {}",
        "x: !!binary @@",
        "training:\n  lr: 1e-3\n",
        "? {a: 1}\n: 2\n",
        "[" * 2000,
        "a: b: c",
        "\x00",
        "--- 1\n--- 2\n",
        "<<: [*x]",
    ]
)


def _yaml_text(value) -> str:
    try:
        return yaml.safe_dump(value, allow_unicode=True)
    except yaml.YAMLError:
        return str(value)


yaml_document = st.one_of(
    yaml_value.map(_yaml_text),
    st.dictionaries(config_keys, yaml_value, max_size=3).map(_yaml_text),
    yaml_fragment,
    st.text(max_size=80),
    st.lists(yaml_fragment | st.text(max_size=20), max_size=4).map("\n".join),
)


@BOUNDED
@given(document=yaml_document | raw_bytes)
def test_any_yaml_config_gives_a_config_or_a_config_error(document):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_bytes(document if isinstance(document, bytes) else document.encode("utf-8", "surrogatepass"))
        try:
            assert isinstance(load_config(path), JobConfig)
        except ConfigError:
            pass


dotted_key = st.lists(
    config_keys | st.sampled_from(["num_cpus", "env", "columns", "beta", ""]) | any_text, min_size=1, max_size=4
).map(".".join)
override_value = yaml_document | st.sampled_from(["1" * 5000, "0x" + "f" * 100, "[" * 5000, "{[1]: 2}", ".inf", ""])


@BOUNDED
@given(overrides=st.lists(st.tuples(dotted_key, override_value).map("=".join) | any_text, min_size=1, max_size=3))
def test_any_override_gives_a_config_or_a_config_error(overrides):
    try:
        assert isinstance(load_config(None, overrides), JobConfig)
    except ConfigError:
        pass
