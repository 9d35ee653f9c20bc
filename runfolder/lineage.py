"""W&B lineage: every phase's output is an artifact, and every phase a small W&B run that declares what it used.

W&B draws its lineage graph from runs: artifact -> (run that used it) -> artifact it logged. One W&B run per
job session would connect every input to every output through that one run, so each finished phase gets a
short run of its own (``job_type`` = what it does, grouped with the job's main run) that uses its inputs and
logs its output. For SPIN that draws seed data -> model 0 -> generations -> pairs -> model 1 -> ...

An input or output is named by its path alone, so a phase finished in an earlier session (its artifact object
long gone) is used by the same name and content again: ``phases/<name>.parquet`` is the dataset artifact
``<job>-<name>``, ``models/<name>/`` the model artifact ``<job>-model-<name>``, any other folder (the base model)
``model-<folder name>``. Files above ``LARGE_BYTES`` are logged as ``file://`` references (W&B records their
paths and checksums, not a copy), smaller ones are copied into the artifact. A LoRA phase's model folder holds
the merged model and its adapter (``<model>/adapter``, training.adapters): both are logged, and each artifact's
metadata names the base model it was trained on and the adapter (``adapter_metadata``).

Offline (the default) ``Run.use_artifact`` refuses to run; what it does for an artifact object online is log it
with ``use_after_commit``, which ``wandb sync`` replays as a use. Offline runs record exactly that.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger("selfimprove")

LARGE_BYTES = 64 * 1024**2  # above this an artifact references its files instead of copying them
ADAPTER_DIR = "adapter"  # a LoRA phase's PEFT folder inside its (merged) model folder (training.adapters)
ITERATION_KEY = re.compile(r"^iter(\d+)/(.+)$")


def iteration_metric(key: str) -> tuple[str, int | None]:
    """``iter3/eval/accuracy`` -> (``eval/accuracy``, 3): one W&B metric whose x-axis is the iteration."""
    match = ITERATION_KEY.match(key)
    return (match.group(2), int(match.group(1))) if match else (key, None)


def safe_name(text: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'; phase names hold '/' (``iter0/generate``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def hub_repo(folder: Path) -> str | None:
    """``org/name`` of a snapshot in a Hugging Face cache (``models--org--name/snapshots/<revision>``), else None:
    a model given by hub id is named by its repo, not by its revision hash."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--").replace("--", "/")
    return None


def artifact_for(path: str | Path, run_dir: Path, job: str) -> tuple[str, str]:
    """(artifact name, type) of a phase's file or a model folder, from where it lies."""
    path = Path(path).resolve()
    run_dir = run_dir.resolve()
    if path.is_dir():
        if path.parent == run_dir / "models":
            return safe_name(f"{job}-model-{path.name}"), "model"
        if path.is_relative_to(run_dir / "models"):
            return safe_name(f"{job}-model-{path.relative_to(run_dir / 'models')}"), "model"
        return safe_name(f"model-{hub_repo(path) or path.name}"), "model"
    phases = run_dir / "phases"
    name = path.relative_to(phases).with_suffix("") if path.is_relative_to(phases) else path.stem
    return safe_name(f"{job}-{name}"), "dataset"


def adapter_metadata(path: Path, run_dir: Path, job: str) -> dict:
    """For a PEFT adapter folder, or a merged model folder with one inside: the base model it was trained on (path
    and artifact name), the adapter (path and artifact name) and its LoRA settings; {} for any other path."""
    adapter = path / ADAPTER_DIR if (path / ADAPTER_DIR / "adapter_config.json").is_file() else path
    try:
        settings = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
    base = settings.get("base_model_name_or_path")
    meta = {
        "merged": adapter != path,
        "adapter": str(adapter),
        "adapter_artifact": artifact_for(adapter, run_dir, job)[0],
        "base_model": base,
        "base_model_artifact": artifact_for(base, run_dir, job)[0] if base and Path(base).is_dir() else None,
        **{k: settings.get(k) for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules")},
    }
    if isinstance(meta["target_modules"], (set, list)):
        meta["target_modules"] = sorted(meta["target_modules"])
    return meta


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


class Lineage:
    """Logs one small W&B run per finished phase; ``main`` is the job session's own run (for project, group, mode)."""

    def __init__(self, main, run_dir: Path, job: str):
        self.main, self.run_dir, self.job = main, run_dir, job
        self.offline = main.settings._offline
        self.runs = 0

    def artifact(self, path: str | Path):
        import wandb

        path = Path(path).resolve()
        name, kind = artifact_for(path, self.run_dir, self.job)
        metadata = {"path": str(path), **(adapter_metadata(path, self.run_dir, self.job) if path.is_dir() else {})}
        artifact = wandb.Artifact(name, type=kind, metadata=metadata)
        if tree_size(path) > LARGE_BYTES:
            artifact.add_reference(path.as_uri(), name=None if path.is_dir() else path.name)
        elif path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        return artifact

    def phase(self, name: str, job_type: str, uses: list[str | Path], outputs: list[str | Path]) -> None:
        """A finished phase: a W&B run of ``job_type`` that used ``uses`` and logged ``outputs`` (paths)."""
        import wandb

        self.runs += 1
        run = wandb.init(
            project=self.main.project,
            entity=self.main.entity or None,
            group=self.main.group,
            job_type=job_type,
            name=f"{self.main.group}/{name}",
            id=f"{self.main.id}-{safe_name(name)}-{self.runs}",
            dir=str(self.run_dir),
            mode="offline" if self.offline else "online",
            config={"phase": name},
            reinit="create_new",  # the session's main run stays open beside it
        )
        try:
            for path in dict.fromkeys(str(Path(p).resolve()) for p in uses if p):  # each input once
                if Path(path).exists():
                    self._use(run, self.artifact(path))
                else:  # an input this job never wrote (e.g. a phase another config skipped): the edge is left out
                    log.warning("W&B lineage of %s: input %s does not exist", name, path)
            for path in outputs:
                run.log_artifact(self.artifact(path))
        finally:
            run.finish()

    def _use(self, run, artifact) -> None:
        if not self.offline:
            run.use_artifact(artifact)
            return
        # Run.use_artifact raises offline; for an artifact object it logs it with use_after_commit, which is
        # what this records for `wandb sync` to replay (same content: the version the producer logged).
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
