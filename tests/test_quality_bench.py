"""bench.quality's arithmetic and report on a synthetic finished run folder (no model, no Ray)."""

import json

import pytest

from bench.quality import PLANS, paired_difference, report, verdicts
from configs.schema import load_config
from runfolder.run import write_parquet


def test_paired_difference_counts_rows_where_the_models_disagree():
    base = {str(i): "yes" if i < 60 else "no" for i in range(100)}
    other = {str(i): "yes" if i < 70 else "unknown" for i in range(100)}  # right on 10 more rows, wrong on none
    diff, low, high, n = paired_difference(base, other)
    assert n == 100 and diff == pytest.approx(0.10)
    # 10 rows of +1, 90 of 0: sd = 0.3015, half-width 1.96 * 0.3015 / 10
    assert (low, high) == pytest.approx((0.10 - 0.0591, 0.10 + 0.0591), abs=1e-3)
    assert paired_difference(base, {"x": "yes"})[3] == 0  # no common rows
    assert paired_difference(other, base)[0] == pytest.approx(-0.10)


@pytest.mark.parametrize("method", sorted(PLANS))
def test_every_plan_is_a_valid_config(method):
    from bench.quality import EVIDENCE

    config = load_config(f"configs/{method}.yaml", ["run.id=quality", *EVIDENCE, *PLANS[method]["overrides"]])
    assert config.data.eval_reworded and config.data.eval_loglik
    if method == "spin":
        assert config.spin.iterations >= 2 and len(set(config.spin.beta)) >= 2 and config.spin.mix_previous
        assert config.data.train == "gsm8k" and config.spin.heldout_rewards
    if method == "llm2llm":
        assert config.llm2llm.matched_steps_control
    if method == "aft":
        assert config.aft.baseline_sft


def test_report_prints_every_model_under_both_wordings_and_paired_differences(tmp_path, capsys):
    from runfolder.run import read_parquet

    rows_of = lambda key: read_parquet(tmp_path / "phases" / f"{key}-verdicts.parquet")  # noqa: E731
    ids = [f"r{i}" for i in range(10)]
    m = {"final_model": "x"}
    for key, _ in PLANS["llm2llm"]["evals"]:
        right = {"base/eval": 5, "iter0/eval": 6, "iter2/eval": 8, "control/eval": 7}.get(key, 6)
        for suffix in ("", "_reworded"):
            rows = [
                {"id": i, "verdict": "yes" if k < right - (suffix == "_reworded") else "no"} for k, i in enumerate(ids)
            ]
            write_parquet(tmp_path / "phases" / f"{key}{suffix}-verdicts.parquet", rows)
            m[f"{key}{suffix}/accuracy"] = sum(r["verdict"] == "yes" for r in rows) / 10
            m[f"{key}{suffix}/ci95"] = [0.1, 0.9]
            m[f"{key}{suffix}/n"] = 10
    # an answer with no label: unknown, not correct (same as "no" for the accuracy), and printed as unreadable
    write_parquet(
        tmp_path / "phases/control/eval-verdicts.parquet",
        [*rows_of("control/eval")[:9], {"id": "r9", "verdict": "unknown"}],
    )
    write_parquet(tmp_path / "phases/control/eval-answers.parquet", [{"id": "r9", "response": "I liked it a lot"}])
    scored = {"r0": {"verdict": "yes", "gold_logprob_per_char": -1.0}}
    (tmp_path / "state.json").write_text(json.dumps({"phases": {"iter2/eval_loglik-loglik": {"result": scored}}}))
    assert verdicts(tmp_path, "iter2/eval_loglik") == {"r0": "yes"}
    m.update({"iter2/student/steps": 15, "control/student/steps": 15, "iter2/instruction_wordings": 1})
    result = report("llm2llm", m, tmp_path)
    out = capsys.readouterr().out
    assert "control/eval  'I liked it a lot'" in out
    assert "seed-only, student 3's steps" in out and "0.700 [0.100, 0.900]" in out
    assert result["evals"]["control/eval"] == {"": 0.7, "_reworded": 0.6}
    assert result["steps"]["control/student"] == result["steps"]["iter2/student"] == 15
    by_pair = {(d["models"], d["scored"]): d["diff"] for d in result["differences"]}
    assert by_pair[("iter2/eval − control/eval", "own wording")] == pytest.approx(0.1)
    assert by_pair[("iter2/eval − iter0/eval", "reworded")] == pytest.approx(0.2)
    assert (tmp_path / "quality.png").exists()
