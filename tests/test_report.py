"""jobs.report on a synthetic run folder: sections, charts, escaping, unfinished runs, and a Chromium render."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.report import eval_series, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")
EVIL = "<script>alert('x')</script>"

METRICS = {
    "base/eval/accuracy": 0.25,
    "base/eval/ci95": [0.1, 0.45],
    "iter0/eval/accuracy": 0.5,
    "iter0/eval/ci95": [0.3, 0.7],
    "iter1/eval/accuracy": 0.625,  # no ci95: plotted without an error bar
    "sft/general/accuracy": 0.4,
    "sft/general/ci95": [0.2, 0.6],
    "buckets/own": 0.5,
    "buckets/paraphrase": 0.25,
    "buckets/gold": 0.25,
    "iter0/wrong_seed": 6,
    "iter0/new_examples": 4,
    "iter0/data_size": 10,
    "iter1/wrong_seed": 3,
    "aft/win_rate_vs_sft": 0.75,
    "final_model": "runs/x/models/iter1",
}
PHASES = {"base/eval-answers": 1.5, "iter0/generate": 2.0, "iter0/spin": 12.25, "iter1/eval-answers": 0.5}


def _parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "spin" / "synthetic"
    (run / "phases").mkdir(parents=True)
    (run / "config.yaml").write_text("run:\n  method: spin\n  id: synthetic\n")
    state = {"phases": {name: {"wall_s": s, "result": {"rows": 4}} for name, s in PHASES.items()}, "metrics": METRICS}
    (run / "state.json").write_text(json.dumps(state))
    summary = {
        "method": "spin",
        "run_dir": str(run),
        "wall_s": 20.0,
        "phases": PHASES,
        "pool_idle_s": {"generator": 3.5, "train": 1.0},
        "peak_memory_gib": 7.5,
        "metrics": METRICS,
        "generation_tokens_per_s": {"generator": 17.6},
        "judge_counts": {"rule_no": 12},
        "failed_rows": {},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    answers = [
        {"id": f"q{i}", "messages": "SECRET_PROMPT", "response": EVIL if i == 0 else f"answer {i}"} for i in range(8)
    ]
    _parquet(run / "phases" / "iter1" / "eval-answers.parquet", answers)
    _parquet(
        run / "phases" / "iter1" / "eval-verdicts.parquet",
        [{"id": f"q{i}", "verdict": "yes" if i % 2 else "no", "judge": "auto"} for i in range(8)],
    )
    _parquet(
        run / "phases" / "iter0" / "spin-data.parquet",
        [{"id": "q0@0", "messages": "SECRET_PROMPT", "chosen": "gold & true", "rejected": "own <b>guess</b>"}],
    )
    target = {"id": "q0", "messages": "SECRET_PROMPT", "bucket": "paraphrase", "response": "reworded", "verdict": "yes"}
    _parquet(run / "phases" / "s3ft-data.parquet", [target])
    return run


def _images(page: Path) -> list[Path]:
    return [page.parent / src for src in re.findall(r'<img src="([^"]+)"', page.read_text())]


def _assert_pngs(images: list[Path]) -> None:
    for image in images:
        assert image.is_file(), image
        assert image.read_bytes()[:8] == PNG_MAGIC, image


def test_report_has_sections_and_valid_charts(run_dir: Path) -> None:
    page = main([str(run_dir)])
    assert page == run_dir / "report.html"
    text = page.read_text()
    for section in (
        "Overview",
        "Eval accuracy",
        "Phase timings",
        "Bucket fractions",
        "Augmentation",
        "Pool idle",
        "Metrics",
        "Sample rows",
        "iter1/eval-answers",
        "iter0/spin-data",
        "s3ft-data",
    ):
        assert f">{section}</h" in text, section
    images = _images(page)
    assert len(images) == 5 and all(image.parent == run_dir / "report" for image in images)
    _assert_pngs(images)
    assert '<span class="status">finished</span>' in text
    assert "answer 4" in text and "answer 5" not in text  # first five rows only
    assert ">paraphrase<" in text and ">reworded<" in text and "SECRET_PROMPT" not in text  # no prompt column


def test_parquet_text_is_escaped(run_dir: Path) -> None:
    text = main([str(run_dir)]).read_text()
    assert EVIL not in text and "<script" not in text
    assert html_escaped(EVIL) in text
    assert "own &lt;b&gt;guess&lt;/b&gt;" in text and "gold &amp; true" in text


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#x27;")


def test_unfinished_run_without_summary_renders(run_dir: Path) -> None:
    (run_dir / "summary.json").unlink()
    part = run_dir / "phases" / "iter2" / "eval-answers" / "part-00000.parquet"
    _parquet(part, [{"id": "q0", "response": "partial"}])  # an unfinished phase's part file is not a sample
    (run_dir / "phases" / "iter2" / "generate-data.parquet").write_bytes(b"PAR1 truncated")  # unreadable file
    text = main([str(run_dir)]).read_text()
    assert "unfinished (no summary.json" in text and ">spin — " in text  # method comes from config.yaml
    assert ">Eval accuracy</h2><img" in text and ">Phase timings</h2><img" in text
    assert "Pool idle" not in text  # only summary.json knows pool idle times
    assert "eval-answers/part-00000" not in text and "unreadable" in text
    _assert_pngs(_images(run_dir / "report.html"))


def test_empty_run_folder_renders(tmp_path: Path) -> None:
    text = main([str(tmp_path)]).read_text()
    assert "nothing recorded yet" in text and "<img" not in text


def test_out_option_writes_charts_next_to_the_page(run_dir: Path, tmp_path: Path) -> None:
    page = main([str(run_dir), "--out", str(tmp_path / "pages" / "spin.html")])
    images = _images(page)
    assert images and all(image.parent == tmp_path / "pages" / "spin" for image in images)
    _assert_pngs(images)


def test_eval_series_groups_by_eval_name_and_orders_stages() -> None:
    stages, series = eval_series(METRICS | {"iter10/eval/accuracy": 1.0, "iter2/eval/accuracy": 0.9})
    assert stages == ["base", "iter0", "iter1", "iter2", "iter10", "sft"]
    assert series["eval"]["iter0"] == (0.5, (0.3, 0.7)) and series["eval"]["iter1"] == (0.625, None)
    assert series["general"] == {"sft": (0.4, (0.2, 0.6))}


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    page = main([str(run_dir)])
    shot = tmp_path / "screenshot.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,1600",
        page.resolve().as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=180, check=False)
    assert shot.is_file() and shot.read_bytes()[:8] == PNG_MAGIC
    assert shot.stat().st_size > 20_000  # a blank 1200x1600 page compresses to a few KB
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_a_crashed_run_is_reported_failed_with_its_error(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(status="failed", error="PhaseFailedError: phase iter0/generate: 5 of 8 rows failed")
    (run_dir / "summary.json").write_text(json.dumps(summary))
    text = main([str(run_dir)]).read_text()
    status = "failed: PhaseFailedError: phase iter0/generate: 5 of 8 rows failed"
    assert f'<span class="status failed">{status}</span>' in text
    assert ">finished<" not in text
