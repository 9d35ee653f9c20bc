"""``--dry-run``: which phases a rerun of a run folder would reuse, and which it would run again, and why.

The job script itself walks its phases in order (no second description of the phase graph to keep in sync):
``PlannedRun`` is a ``Run`` that reads the folder's state and writes nothing. Each phase computes its key exactly
as a real run does (``tracking.row_phase_key``, ``block_phase_key``, ``phase_key``) and records a verdict:

- ``reuse``: finished under the same key; the phase returns its stored output, so the walk goes on with the
  values the rerun would have.
- ``run``: never ran, half done (how far), or its key changed (which components, and inside a recorded component
  which setting: ``training.lr: 0.001 -> 0.002``, ``rows: 8 of 8 changed``, ``world_size (pools.train.replicas)``).
  The phase returns ``Pending``, a stand-in for an output nobody knows before it runs.
- ``run`` (``upstream <phase> runs again``): a phase whose key contains a ``Pending`` (a model, rows or a result of
  a phase that runs) is downstream of it; it returns ``Pending`` too.

``Pending`` lets an output be passed on and indexed (``outputs[id]["response"]`` is still pending), but anything
that would turn it into a plain value (truth, comparison, length, iteration, formatting) raises ``NeedsOutput``:
the job's next step depends on that phase's new output, so the walk stops there. Phases of the folder the walk
did not reach are then listed as running after it (their inputs cannot be known without running it). Nothing here
starts Ray, vLLM or training: the controller in plan mode places no pool (``jobs.roles.PlannedPools``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from configs.schema import JobConfig
from runfolder.blocks import Blocks, part_name
from runfolder.run import INPUT_DIGEST, KEY_FILE, Run, block_phase_key, row_phase_key
from runfolder.state import (
    RunLease,
    canonical,
    changed_keys,
    config_fingerprint,
    empty_state,
    load_state,
    phase_key,
)

# The config key behind a key component whose name does not say it.
COMPONENT_CONFIG = {
    "world_size": "pools.train.replicas",
    "ranks": "training.layout",
    "layout_zero_stage": "training.layout",
    "seed": "run.seed",
}


class NeedsOutput(BaseException):  # noqa: N818 (not an error: the walk's end; BaseException so no `except Exception` swallows it)
    """The job's next step needs the value of a phase that would run: the dry walk ends here."""

    def __init__(self, phase: str):
        super().__init__(phase)
        self.phase = phase


class Pending:
    """The output of a phase that would run (or of anything made from it): passed on and indexed freely, never
    read as a plain value."""

    __slots__ = ("phase",)

    def __init__(self, phase: str):
        object.__setattr__(self, "phase", phase)

    def __getitem__(self, _key: Any) -> Pending:
        return self

    def get(self, _key: Any, _default: Any = None) -> Pending:
        return self

    def __repr__(self) -> str:
        return f"<output of {self.phase}, known once it runs>"

    def _needed(self, *_args: Any, **_kwargs: Any):
        raise NeedsOutput(self.phase)

    __bool__ = __len__ = __iter__ = __contains__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _needed
    __str__ = __format__ = __fspath__ = __index__ = __int__ = __float__ = __add__ = __radd__ = __call__ = _needed
    __hash__ = _needed  # a dict or set lookup by a pending value needs the value too

    def __getattr__(self, name: str):  # any other method of the value it stands for
        if name.startswith("__"):
            raise AttributeError(name)
        raise NeedsOutput(self.phase)


def is_pending(value: Any) -> bool:
    return isinstance(value, Pending)


def pending_in(value: Any) -> Pending | None:
    """The first Pending inside a phase's key components (dicts, lists, tuples), or None."""
    if isinstance(value, Pending):
        return value
    if isinstance(value, dict):
        items = value.values()
    elif isinstance(value, (list, tuple, set)):
        items = value
    else:
        return None
    for item in items:
        found = pending_in(item)
        if found is not None:
            return found
    return None


@dataclass
class Verdict:
    phase: str
    action: str  # "reuse" or "run"
    reason: str = ""


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _differences(prefix: str, before: Any, now: Any) -> list[str]:
    """``prefix.sub: old -> new`` for each differing leaf of two recorded component values."""
    if isinstance(before, dict) and isinstance(now, dict):
        found = []
        for k in sorted(before.keys() | now.keys(), key=str):
            if before.get(k) != now.get(k):
                found += _differences(f"{prefix}.{k}", before.get(k), now.get(k))
        return found
    return [f"{prefix}: {_short(before)} -> {_short(now)}"]


def _rows_change(name: str, before: list | None, now: list) -> str:
    """How a phase's input rows changed, from their recorded values (content digests, or the rows themselves)."""
    if before is None:
        return f"{name} (its input rows)"
    old, new = {canonical(r) for r in before}, {canonical(r) for r in now}
    edited = min(len(new - old), len(old - new))  # by content only: an edited row is one gone and one new
    added, removed = len(new - old) - edited, len(old - new) - edited
    counts = [f"{edited} of {len(new)} input rows changed"] if edited else []
    counts += [f"{added} added"] * bool(added) + [f"{removed} removed"] * bool(removed)
    return f"{name}: {', '.join(counts)}"


class PlannedRun(Run):
    """A ``Run`` over a folder's state that writes nothing: its phases record a Verdict instead of running."""

    def __init__(self, config: JobConfig):  # no lease (a read-only look), no W&B, no log file, no memory monitor
        self.config = config
        self.dir = config.run_dir
        self.state_path = self.dir / "state.json"
        self.state = empty_state() if config.run.fresh else load_state(self.state_path)
        self.stop_reason: str | None = None
        if not config.run.fresh:
            changed = changed_keys(self.state.get("config", {}), config_fingerprint(config))
            if changed:
                self.stop_reason = (
                    f"{self.dir} was started with another config; changed: {'; '.join(changed)}. The rerun stops "
                    "there; with run.fresh=true every phase runs (the folder is cleared first)"
                )
        # Only looked at: a live holder means the verdicts describe the state as of now, and a rerun is refused.
        self.lease = RunLease(self.dir, config.run.lease_timeout_s)  # never acquired: check() passes, writes nothing
        holder = self.lease.holder() if self.dir.is_dir() else None
        live = holder is not None and self.lease.stale_reason(holder) is None
        self.holder = f"host {holder.get('host')}, pid {holder.get('pid')}" if live else None
        self.resumed = bool(self.state["phases"])
        self.wandb = self.lineage = None
        self.step = 0
        self.iteration_metrics: set[str] = set()
        self.finished_now: set[str] = set()
        self._digests: dict[str, str] = {}
        self.verdicts: dict[str, Verdict] = {}

    # -- nothing is written ------------------------------------------------------------------------

    def _save_state(self) -> None:
        pass

    def _read_or_set_aside(self, path: Path) -> list[dict] | None:
        try:
            return pq.read_table(path).to_pylist()
        except Exception:  # unreadable: the real run sets it aside and recomputes its rows
            return None

    def account(self, name: str, reasons: dict[str, str], rows_in: int) -> None:
        pass

    def write_rows(self, name: str, rows: list[dict]) -> str:
        return self.phase_file(name)

    def register_model(self, path: str, key: str) -> None:
        if not is_pending(path):
            self.state.setdefault("models", {})[str(Path(path).resolve())] = key

    def model_key(self, path: str | Path) -> str:
        return path if is_pending(path) else super().model_key(path)

    def rows(self, name: str) -> list[dict]:
        verdict = self.verdicts.get(name)
        return Pending(name) if verdict is not None and verdict.action == "run" else super().rows(name)

    # -- phases ------------------------------------------------------------------------------------

    def _verdict(
        self,
        name: str,
        components: dict[str, Any],
        reuse: Callable[[], Any],
        progress: Callable[[str, dict], str | None],
    ) -> Any:
        """Record ``name``'s verdict; its stored output when it is reused, else a Pending."""
        upstream = pending_in(components)
        if upstream is not None:
            again = upstream.phase in self.state["phases"] or upstream.phase in self.state["started"]
            return self._runs(name, f"upstream {upstream.phase} runs{' again' if again else ''}")
        key, parts = phase_key(**components)
        stored = self.state["phases"].get(name)
        if stored is not None and stored.get("key", stored.get("inputs")) == key:
            output = reuse()
            if output is not None:
                self.verdicts[name] = Verdict(name, "reuse")
                return output
            return self._runs(name, "its output cannot be read (it is set aside and computed again)")
        if stored is not None:
            return self._runs(name, "key changed: " + self.explain(stored, parts, components))
        return self._runs(name, progress(key, components) or "never ran")

    def _runs(self, name: str, reason: str) -> Pending:
        self.verdicts[name] = Verdict(name, "run", reason)
        return Pending(name)

    def explain(self, stored: dict, parts: dict[str, str], components: dict[str, Any]) -> str:
        """Which components of a finished phase's key changed and, where their values were recorded, how."""
        before_parts = stored.get("key_parts")
        if not before_parts:
            return "its key was recorded by an older version"
        before_values = stored.get("key_values") or {}
        now_values = {k: json.loads(json.dumps(v, sort_keys=True, default=str)) for k, v in components.items()}
        reasons = []
        named_key = None  # the setting the last reason named components of, bare (its names can take one more)
        for name in sorted(before_parts.keys() | parts.keys()):
            if before_parts.get(name) == parts.get(name):
                continue
            config_key = f" ({COMPONENT_CONFIG[name]})" if name in COMPONENT_CONFIG else ""
            last_named_key, named_key = named_key, None
            if name in ("rows", "examples") and isinstance(now_values.get(name), list):
                reasons.append(_rows_change(name, before_values.get(name), now_values[name]))
            elif isinstance(now_values.get(name), str) and now_values[name].startswith(("phase:", "content:")):
                reasons.append(f"{name}: {self.model_change(before_values.get(name), now_values[name])}")
            elif name in before_values and before_values[name] is not None and name in now_values:
                reasons += [d + config_key for d in _differences(name, before_values[name], now_values[name])]
            elif config_key and config_key == last_named_key:  # two components of one setting: one reason
                reasons[-1] = reasons[-1][: -len(config_key)] + f", {name}{config_key}"
                named_key = config_key
            else:
                reasons.append(name + config_key)
                named_key = config_key
        return "; ".join(reasons) or "its key changed"

    def model_change(self, before: str | None, now: str) -> str:
        """A model component's change in words: which finished phase made the model now named, or new content."""
        if now.startswith("content:"):
            return "another model folder, or its files changed"
        maker = next((n for n, p in self.state["phases"].items() if f"phase:{p.get('key')}" == now), None)
        return f"the model {maker} made" + (f" (was {before})" if before else "") if maker else f"{before} -> {now}"

    def row_phase(self, name, rows, process, key="id", failed=None, context=None):
        if pending_in([rows, context]) is not None:  # its rows or context come from a phase that runs
            return self._verdict(name, {"rows": rows, "context": context}, lambda: None, lambda *_: None)
        digests, context_key, components = row_phase_key(rows, context)

        def progress(_key: str, _components: dict) -> str | None:
            folder = self.dir / "phases" / name
            marker = folder / KEY_FILE
            if not marker.exists() or marker.read_text().strip() != context_key:
                return None
            written = [r for p in sorted(folder.glob("part-*.parquet")) for r in self._read_or_set_aside(p) or []]
            done = {r[key] for r in written if r.get(INPUT_DIGEST) and r[INPUT_DIGEST] == digests.get(r[key])}
            return f"half done: {len(done)} of {len(rows)} rows done"

        return self._verdict(name, components, lambda: self._read_or_set_aside(self._final(name)), progress)

    def _final(self, name: str) -> Path:
        return self.dir / "phases" / f"{name}.parquet"

    def block_phase(self, name, inputs, process, aligned=(), key="id", one_per_row=True, failed=None,
                    settings=None, context=None):  # fmt: skip
        if pending_in([inputs, list(aligned), settings, context]) is not None:
            found = {"inputs": inputs, "aligned": list(aligned), "settings": settings, "context": context}
            return self._verdict(name, found, lambda: None, lambda *_: None)
        folder = self.dir / "phases" / name
        components = block_phase_key(inputs, aligned, settings, context)

        def progress(phase: str, _components: dict) -> str | None:
            marker = folder / KEY_FILE
            if not marker.exists() or marker.read_text().strip() != phase:
                return None
            blocks = inputs.parts()
            done = 0
            for path in blocks:
                block_marker = folder / f".{part_name(int(path.stem.split('-')[1]))}.json"
                try:
                    done += json.loads(block_marker.read_text())["failed"] == {}
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            return f"half done: {done} of {len(blocks)} blocks done"

        return self._verdict(
            name, components, lambda: Blocks.of(folder) if (folder / KEY_FILE).exists() else None, progress
        )

    def once(self, name, fn, key, scratch=None):
        def progress(phase: str, _components: dict) -> str | None:
            started = self.state["started"].get(name)
            if started is None:
                return None
            if started != phase:
                return "never finished, and its inputs changed since it started"
            kept = scratch is not None and scratch.is_dir() and any(p.name != KEY_FILE for p in scratch.iterdir())
            return "half done: interrupted" + (" (resumes from the files it kept)" if kept else "")

        return self._verdict(name, key, lambda: self.result(name) if name in self.state["phases"] else None, progress)

    # -- the report --------------------------------------------------------------------------------

    def report(self, stopped: NeedsOutput | None) -> list[Verdict]:
        """Every verdict in the walk's order, then the folder's phases the walk did not reach (after ``stopped``)."""
        found = list(self.verdicts.values())
        if stopped is not None:
            known = [*self.state["phases"], *self.state["started"]]
            for name in dict.fromkeys(known):
                if name not in self.verdicts:
                    reason = f"upstream {stopped.phase} runs first (the job needs its output)"
                    found.append(Verdict(name, "run", reason))
        return found


def format_report(run: PlannedRun, verdicts: list[Verdict], stopped: NeedsOutput | None) -> str:
    lines = [f"dry run of {run.config.run.method} in {run.dir}: {len(run.state['phases'])} phases finished"]
    if run.config.run.fresh:
        lines.append("run.fresh=true: the folder is cleared first, every phase runs")
    if run.holder is not None:
        lines.append(f"a driver holds this folder now ({run.holder}): a rerun is refused until it ends; as of now:")
    width = max([len(v.phase) for v in verdicts] + [5])
    lines += [f"  {v.action:<5}  {v.phase:<{width}}  {v.reason}".rstrip() for v in verdicts]
    if stopped is not None:
        lines.append(
            f"  (the walk stops at {stopped.phase}: what the job does next depends on its new output; any phase "
            "after it not listed above runs too)"
        )
    reused = sum(v.action == "reuse" for v in verdicts)
    lines.append(f"{reused} reused, {len(verdicts) - reused} run")
    return "\n".join(lines)
