"""HTML report of one run folder: ``python -m jobs.report RUN_DIR [--out FILE]``.

Writes ``RUN_DIR/report.html`` (or FILE) and its PNG charts into the sibling folder of the same name
(``RUN_DIR/report/``): eval accuracy per stage with 95% CIs, phase timings, S3FT buckets, LLM2LLM augmentation
counts, pool idle times, lm-evaluation-harness results per model (value ± stderr), all metrics and the first
rows of the answer and training-data phases. An unfinished run (no ``summary.json``) is reported from
``state.json``; missing or unreadable pieces are skipped, never fatal.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SAMPLE_ROWS = 5
MAX_CELL_CHARS = 300
AUGMENT_FIELDS = ("wrong_seed", "new_examples", "data_size")
# Which columns of which phases are shown as samples (never the prompt `messages`).
SAMPLE_COLUMNS = {"-answers": ["id", "response"], "-data": ["id", "bucket", "chosen", "rejected", "response"]}
CSS = """body{font-family:sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}h1{font-size:1.5em}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}img{max-width:100%;display:block;margin:.5em 0}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}th{background:#f3f3f3}th,td{border:1px solid #ddd;
padding:.25em .5em;text-align:left;vertical-align:top}td{white-space:pre-wrap;word-break:break-word;max-width:480px}
.status{padding:.1em .5em;border-radius:4px;background:#dfd}.unfinished{background:#fed}.failed{background:#fcc}
.empty{color:#888}"""


def _read(path: Path, parse: Callable[[str], Any] = json.loads) -> Any:
    """Parsed file, or None when it is missing or not (yet) parseable."""
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def load_samples(phases_dir: Path, limit: int = SAMPLE_ROWS) -> dict[str, list[dict]]:
    """First `limit` rows of each answers/data phase (finished phases only), with the eval verdict when known."""
    samples: dict[str, list[dict]] = {}
    for path in sorted(phases_dir.rglob("*.parquet"), key=_natural_key):
        name = path.relative_to(phases_dir).with_suffix("").as_posix()
        if path.name.startswith("part-"):  # an unfinished row phase's batch, or a block of a streamed phase
            if not list(path.parent.glob(".part-*.json")) or path.parent.relative_to(phases_dir).as_posix() in samples:
                continue
            name = path.parent.relative_to(phases_dir).as_posix()  # streamed: its first block stands for it
        wanted = next((cols for suffix, cols in SAMPLE_COLUMNS.items() if name.endswith(suffix)), None)
        if wanted is None:
            continue
        try:
            file = pq.ParquetFile(path)
            rows = file.read(columns=[c for c in wanted if c in file.schema_arrow.names]).slice(0, limit).to_pylist()
            verdicts_path = path.with_name(path.name.replace("-answers.parquet", "-verdicts.parquet"))
            if name.endswith("-answers") and verdicts_path.exists():
                verdicts = pq.read_table(verdicts_path, columns=["id", "verdict"]).to_pylist()
                by_id = {v["id"]: v["verdict"] for v in verdicts}
                rows = [{**row, "verdict": by_id.get(row.get("id"))} for row in rows]
        except (OSError, KeyError, pa.ArrowException) as e:
            rows = [{"error": f"unreadable: {e}"}]
        samples[name] = rows
    return samples


def load_run(run_dir: Path) -> dict[str, Any]:
    """The run's summary (rebuilt from state.json and config.yaml while unfinished) and its sample rows."""
    summary = _read(run_dir / "summary.json")
    finished = isinstance(summary, dict)
    if not finished:
        state = _read(run_dir / "state.json") or {}
        config = _read(run_dir / "config.yaml", yaml.safe_load) or {}
        phases = {name: p.get("wall_s") for name, p in (state.get("phases") or {}).items() if isinstance(p, dict)}
        summary = {
            "method": (config.get("run") or {}).get("method", run_dir.parent.name),
            "run_dir": str(run_dir),
            "phases": phases,
            "metrics": state.get("metrics") or {},
        }
    return {"summary": summary, "finished": finished, "samples": load_samples(run_dir / "phases")}


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def eval_series(metrics: dict) -> tuple[list[str], dict[str, dict[str, tuple]]]:
    """`<stage>/<eval>/accuracy` (+ `.../ci95`) -> (ordered stages, {eval: {stage: (accuracy, ci or None)}})."""
    series: dict[str, dict[str, tuple]] = {}
    seen: list[str] = []
    for key, value in metrics.items():
        if not key.endswith("/accuracy") or not _num(value):
            continue
        prefix = key[: -len("/accuracy")]
        stage, _, name = prefix.partition("/") if "/" in prefix else ("run", "", prefix)
        ci = metrics.get(f"{prefix}/ci95")
        ci = tuple(ci) if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(_num, ci)) else None
        series.setdefault(name, {})[stage] = (float(value), ci)
        seen += [stage] if stage not in seen else []
    iteration = {s: int(s[4:]) for s in seen if re.fullmatch(r"iter\d+", s)}
    # base first, then iter0, iter1, ... numerically, then other stages in the order they were recorded
    order = {s: (0, 0) if s == "base" else (1, iteration[s]) if s in iteration else (2, i) for i, s in enumerate(seen)}
    return sorted(seen, key=order.__getitem__), series


def augment_counts(metrics: dict) -> dict[int, dict[str, float]]:
    """LLM2LLM `iter<N>/<field>` counts -> {N: {field: count}}."""
    counts: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        match = re.fullmatch(r"iter(\d+)/(\w+)", key)
        if match and match[2] in AUGMENT_FIELDS and _num(value):
            counts.setdefault(int(match[1]), {})[match[2]] = value
    return dict(sorted(counts.items()))


def _numbers(mapping: Any) -> dict[str, float]:
    return {str(k): v for k, v in (mapping or {}).items() if _num(v)} if isinstance(mapping, dict) else {}


def _axes(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_eval(metrics: dict, path: Path) -> Path | None:
    stages, series = eval_series(metrics)
    if not series:
        return None
    fig, ax = _axes(9, 4.5)
    for i, (name, points) in enumerate(sorted(series.items())):
        offset = (i - (len(series) - 1) / 2) * 0.06
        ordered = sorted(points.items(), key=lambda item: stages.index(item[0]))
        xs = [stages.index(stage) + offset for stage, _ in ordered]
        ys = [acc for _, (acc, _) in ordered]
        yerr = [
            [max(acc - ci[0], 0) if ci else 0 for _, (acc, ci) in ordered],
            [max(ci[1] - acc, 0) if ci else 0 for _, (acc, ci) in ordered],
        ]
        ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=4, label=name)
    ax.set_xticks(range(len(stages)), stages)
    ax.set(ylim=(-0.03, 1.03), ylabel="accuracy", title="Eval accuracy per stage (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_bars(values: dict[str, float], path: Path, title: str, unit: str) -> Path | None:
    """Horizontal bars, first key on top."""
    if not values:
        return None
    names = list(values)[::-1]
    fig, ax = _axes(9, max(2.2, 0.32 * len(names) + 1.2))
    bars = ax.barh(names, [values[n] for n in names], color="#4c78a8")
    ax.bar_label(bars, fmt="%.3g", fontsize="small", padding=2)
    ax.set(xlabel=unit, title=title)
    ax.margins(x=0.12)
    return _save(fig, path)


def plot_augment(counts: dict[int, dict[str, float]], path: Path) -> Path | None:
    if not counts:
        return None
    fig, ax = _axes(9, 3.5)
    width = 0.8 / len(AUGMENT_FIELDS)
    for j, field in enumerate(AUGMENT_FIELDS):
        heights = [counts[it].get(field, math.nan) for it in counts]
        bars = ax.bar([i + (j - 1) * width for i in range(len(counts))], heights, width, label=field)
        ax.bar_label(bars, labels=["" if math.isnan(h) else f"{h:g}" for h in heights], fontsize="small")
    ax.set_xticks(range(len(counts)), [f"iter{it}" for it in counts])
    ax.set(xlim=(-0.5, len(counts) - 0.5), ylabel="examples", title="Augmentation per iteration")
    ax.margins(y=0.15)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def make_charts(summary: dict, chart_dir: Path) -> dict[str, Path | None]:
    """Every chart this run has data for: section title -> PNG path (None: nothing to plot)."""
    metrics = summary.get("metrics") or {}
    buckets = {k.split("/", 1)[1]: v for k, v in _numbers(metrics).items() if k.startswith("buckets/")}
    return {
        "Eval accuracy": plot_eval(metrics, chart_dir / "eval.png"),
        "Phase timings": plot_bars(
            _numbers(summary.get("phases")), chart_dir / "phases.png", "Phase wall time", "seconds"
        ),
        "Bucket fractions": plot_bars(buckets, chart_dir / "buckets.png", "S3FT target buckets", "fraction"),
        "Augmentation": plot_augment(augment_counts(metrics), chart_dir / "augment.png"),
        "Pool idle": plot_bars(
            _numbers(summary.get("pool_idle_s")), chart_dir / "pool_idle.png", "Pool idle time", "seconds"
        ),
    }


def _fmt(value: Any) -> str:
    """Plain text of a metric or cell value."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "—" if value is None else str(value)


def html_table(rows: list[dict]) -> str:
    if not rows:
        return '<p class="empty">no rows</p>'
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    """Escaped, clipped text; whitespace-only text is shown as its repr so it stays visible."""
    text = _fmt(value)
    text = repr(text) if text and not text.strip() else text
    return html.escape(text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS] + "…")


def benchmark_table(metrics: dict) -> list[dict]:
    """lm-evaluation-harness results (``<model>/lm_eval`` metrics, jobs.lm_eval_phase): one row per task and
    metric, one column per model, each cell ``value ± stderr``, the documents scored in ``n``."""
    models = [k.removesuffix("/lm_eval") for k, v in metrics.items() if k.endswith("/lm_eval") and isinstance(v, dict)]
    rows: dict[tuple[str, str], dict] = {}
    for model in models:
        for task, values in (metrics[f"{model}/lm_eval"].get("tasks") or {}).items():
            for metric, v in values.items():
                if not isinstance(v, dict) or v.get("value") is None:
                    continue
                row = rows.setdefault((task, metric), {"task": task, "metric": metric, "n": values.get("n")})
                stderr = f" ± {v['stderr']:.4f}" if isinstance(v.get("stderr"), (int, float)) else ""
                row[model] = f"{v['value']:.4f}{stderr}"
    return list(rows.values())


def mt_bench_table(metrics: dict) -> list[dict]:
    """MT-Bench pairwise comparisons (``<model>/mt_bench`` metrics, jobs.mt_bench_phase): one row per pair, the
    newer model's win rate (ties half) with its 95% bootstrap interval and the games behind it, unreadable
    verdicts and failed judgments included."""
    rows = []
    for key, v in metrics.items():
        if not (key.endswith("/mt_bench") and isinstance(v, dict) and "vs" in v):
            continue
        rate = "n/a (no decided game)" if v.get("win_rate") is None else f"{v['win_rate']:.3f}"
        if v.get("ci95"):
            rate += f" [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
        rows.append(
            {
                "model": v.get("label"),
                "vs": v.get("vs"),
                "win rate [95% CI]": rate,
                "win / tie / lose": f"{v.get('win')} / {v.get('tie')} / {v.get('lose')}",
                "inconsistent (ties)": v.get("inconsistent"),
                "unparseable": v.get("unparseable"),
                "failed": v.get("failed"),
                "games": v.get("games"),
                "turns": v.get("turns"),
            }
        )
    return rows


def render_html(run: dict, charts: dict[str, Path | None], out: Path) -> str:
    s, finished = run["summary"], run["finished"]
    failed = finished and s.get("status") == "failed"  # the driver ended on an error: summary.json says which
    if failed:
        status = f"failed: {s.get('error', 'unknown error')}"
    else:
        status = "finished" if finished else "unfinished (no summary.json yet: read from state.json)"
    total = s.get("wall_s") if finished else sum(_numbers(s.get("phases")).values())
    overview = [{"": "wall time (s)" if finished else "finished phases (s)", "value": total}] + [
        {"": key.replace("_", " "), "value": s.get(key)}
        for key in ("peak_memory_gib", "generation_tokens_per_s", "judge_counts", "failed_rows")
        if key in s
    ]
    parts = [
        f"<h1>{html.escape(str(s.get('method', '?')))} — {html.escape(str(s.get('run_dir', '')))}</h1>",
        f'<p>Status: <span class="status{" failed" if failed else "" if finished else " unfinished"}">'
        f"{html.escape(status)}</span></p>",
        "<h2>Overview</h2>",
        html_table(overview),
    ]
    for title, png in charts.items():
        if png is not None:
            src = Path(os.path.relpath(png, out.parent)).as_posix()
            parts.append(f'<h2>{html.escape(title)}</h2><img src="{html.escape(src)}" alt="{html.escape(title)}">')
        elif title in ("Eval accuracy", "Phase timings"):
            parts.append(f'<h2>{html.escape(title)}</h2><p class="empty">nothing recorded yet</p>')
    benchmarks = benchmark_table(s.get("metrics") or {})
    if benchmarks:
        parts += ["<h2>Standard benchmarks (lm-evaluation-harness)</h2>", html_table(benchmarks)]
    pairs = mt_bench_table(s.get("metrics") or {})
    if pairs:
        parts += ["<h2>MT-Bench pairwise (FastChat judge prompts, both orders)</h2>", html_table(pairs)]
    metrics = [{"metric": k, "value": v} for k, v in (s.get("metrics") or {}).items()]
    parts += ["<h2>Metrics</h2>", html_table(metrics), "<h2>Sample rows</h2>"]
    for name, rows in run["samples"].items():
        parts += [f"<h3>{html.escape(name)}</h3>", html_table(rows)]
    if not run["samples"]:
        parts.append('<p class="empty">no finished answer or data phases yet</p>')
    title = html.escape(f"{s.get('method', '?')} report")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def build_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html), charts into out's sibling folder."""
    out = out or run_dir / "report.html"
    run = load_run(run_dir)
    charts = make_charts(run["summary"], out.parent / out.stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(run, charts, out), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="runs/<method>/<run-id>")
    parser.add_argument("--out", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        parser.error(f"not a run folder: {args.run_dir}")
    print(out := build_report(args.run_dir, args.out))
    return out


if __name__ == "__main__":
    main()
