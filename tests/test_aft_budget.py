"""AFT prompts keep their instruction and every proposal: over-long ones share the prompt budget equally, cut at
their ends and counted; where even minimum shares cannot fit, the phase stops with the reason. Off-policy rows
without proposals stop the job instead of silently training plain SFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from actors.engine import render_prompt
from methods.aft import ProposalError, build_examples, off_policy_proposals, share_budget
from training.sequences import TruncationReport, build_sequence, prompt_messages

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "You aggregate answers. Judge them critically.\n{responses}\nWrite one refined answer."
QUERY = [{"role": "user", "content": "Explain why the sky is blue in two sentences."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def aggregate_example(drafts: list[str]) -> dict:
    row = {"id": "q1", "messages": QUERY, "reference": "Rayleigh scattering."}
    (propose, aggregate) = build_examples([row], {"q1": drafts}, TEMPLATE)
    assert propose["proposals"] == [] and aggregate["proposals"] == drafts
    return aggregate


def test_share_budget_is_equal_and_gives_short_proposals_all_they_need():
    assert share_budget([100, 100, 100], 90) == [30, 30, 30]
    assert share_budget([100, 10, 100], 90) == [40, 10, 40]  # the short one's leftover goes to the others
    assert share_budget([5, 6], 100) == [5, 6]
    keep = share_budget([7, 300, 50, 300], 200)
    assert sum(keep) == 200 and keep[0] == 7 and keep[2] == 50 and abs(keep[1] - keep[3]) <= 1


def test_long_proposals_are_cut_at_their_ends_and_the_instruction_stays(tokenizer):
    drafts = [f"Answer {i}: " + "the light scatters off air molecules " * (40 + 30 * i) for i in range(3)]
    example = aggregate_example(drafts)
    assert len(render_prompt(tokenizer, example["messages"])) > 256  # the example as built does not fit
    report = TruncationReport()
    messages = prompt_messages(tokenizer, example, 256, 8, report)
    assert len(render_prompt(tokenizer, messages)) <= 256
    system = messages[0]["content"]
    assert system.startswith("You aggregate answers.") and system.endswith("Write one refined answer.")
    assert messages[1:] == QUERY  # the query whole
    numbered = system.split("\n")[1:-1]
    assert [line[:3] for line in numbered] == ["1. ", "2. ", "3. "]  # every proposal, in order
    for line, draft in zip(numbered, drafts):
        kept = line[3:]
        assert kept and draft.startswith(kept.rstrip()) and len(kept) < len(draft)  # its start, cut at its end
    shares = [len(tokenizer(line[3:], add_special_tokens=False)["input_ids"]) for line in numbered]
    assert max(shares) - min(shares) <= 3  # equal shares (a decoded cut may re-tokenize a token differently)
    assert (report.aggregate_prompts_cut, report.proposals_cut) == (1, 3)
    # The trainer then never cuts the prompt's start: the instruction survives into the sequence.
    sequence = build_sequence(tokenizer, example["id"], messages, example["response"], 320, 256, report)
    assert report.prompts_truncated == 0 and len(sequence.input_ids) <= 320


def test_a_short_proposal_keeps_all_of_itself(tokenizer):
    drafts = ["Blue light scatters most.", "the light scatters off air molecules " * 80]
    report = TruncationReport()
    messages = prompt_messages(tokenizer, aggregate_example(drafts), 200, 8, report)
    assert "1. Blue light scatters most.\n2. " in messages[0]["content"]
    assert report.proposals_cut == 1


def test_a_prompt_that_fits_is_left_as_built(tokenizer):
    example = aggregate_example(["Blue light scatters.", "Air molecules scatter short waves."])
    report = TruncationReport()
    assert prompt_messages(tokenizer, example, 512, 8, report) == example["messages"]
    assert (report.aggregate_prompts_cut, report.proposals_cut) == (0, 0)
    propose = build_examples([{"id": "q1", "messages": QUERY, "reference": "x"}], {}, TEMPLATE)[0]
    assert prompt_messages(tokenizer, propose, 8, 8, report) == QUERY  # not an aggregation prompt: untouched


def test_no_room_for_minimum_shares_stops_with_the_reason(tokenizer):
    example = aggregate_example(["the light scatters off air molecules " * 20] * 5)
    fixed = len(
        render_prompt(
            tokenizer, [{"role": "system", "content": TEMPLATE.format(responses="1. \n2. \n3. \n4. \n5. ")}, *QUERY]
        )
    )
    with pytest.raises(ProposalError, match=r"leaving \d+ for 5 proposals that need 160 \(aft.min_proposal_tokens=32"):
        prompt_messages(tokenizer, example, fixed + 100, 32, TruncationReport())


def test_off_policy_rows_without_proposals_are_refused():
    with pytest.raises(ProposalError, match=r"1 of 2 training rows have no 'proposals' \(first: b\)"):
        off_policy_proposals({"a": ["x", "y"], "b": []}, 5)
    assert off_policy_proposals({"a": ["1", "2", "3"]}, 2) == {"a": ["1", "2"]}  # at most N per query


def test_aft_job_with_off_policy_and_no_proposals_stops_before_training(ray_session, tmp_path):
    from jobs.aft import aft
    from jobs.controller import main

    argv = ["--config", str(ROOT / "configs/aft-tiny.yaml"), f"run.dir={tmp_path}", "aft.proposal_source=off_policy"]
    with pytest.raises(ProposalError, match="aft.proposal_source=off_policy, but 6 of 6 training rows"):
        main("aft", aft, argv)
    run = tmp_path / "aft" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("ProposalError: aft.proposal_source")
    assert summary["phases"] == {} and not list((run / "models").iterdir())  # nothing ran, not even the SFT baseline
    assert not (run / "DONE").exists()


def test_examples_keep_their_proposals_through_the_parquet_the_ranks_read(tokenizer, tmp_path):
    from runfolder.run import write_parquet
    from training.worker import _read_examples

    rows = [{"id": f"q{i}", "messages": QUERY, "reference": "Rayleigh scattering."} for i in range(2)]
    drafts = {"q1": ["the light scatters off air molecules " * 60, "Blue light scatters most."]}
    examples = build_examples(rows, drafts, TEMPLATE)  # the first row written is a propose example
    write_parquet(tmp_path / "aft-data.parquet", examples)
    read = _read_examples(str(tmp_path / "aft-data.parquet"))
    assert [(e["kind"], e["proposals"]) for e in read] == [
        ("propose", []),
        ("propose", []),
        ("aggregate", drafts["q1"]),
    ]
    aggregate = read[2]
    assert aggregate["query"] == QUERY and aggregate["aggregate_template"] == TEMPLATE
    report = TruncationReport()
    messages = prompt_messages(tokenizer, aggregate, 128, 8, report)
    assert len(render_prompt(tokenizer, messages)) <= 128 and report.proposals_cut == 1
