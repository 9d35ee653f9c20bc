"""The single controller's pools: which worker group serves each role, placed the first time it is needed.

``Pools`` owns the role -> ``EnginePool`` map (a role is data: its name picks its ``pools.<role>`` config
section), the lazily made Judge, Teacher and training service, where their replicas and ranks ran, and their
idle time and shutdown at the end of the job. It runs no phase and writes no rows: what runs on a pool is the
controller's (``jobs.controller``) decision, this module only gets the pool there and takes it down.

Nothing is placed before a phase has work for it: ``use_generator_weights`` only records which weights the
generator serves next, and ``serving(role)`` names that model (placed or not) for the phase's key and lineage; the
phase's own work calls ``serving_pool(role)``, which places the pool, starts Ray (``connect_ray``) and loads the
weights. A rerun whose phases are all reused so starts no Ray and no engine: measured on the lm-eval tiny job's
rerun, 11 s of Ray start and 23 s of generator placement saved (NOTES.md "Test suite time (session 2026-12-03)").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from actors.judge import Judge
from actors.llm_actor import EnginePool
from actors.teacher import Teacher
from cluster.models import resolve_model
from configs.schema import JobConfig
from runfolder.run import Run

log = logging.getLogger("selfimprove")

# The pools each method uses from its first phases on (cluster.start_pools_together places them at the start).
POOLS_AT_START = {
    "spin": ("generator", "train"),
    "s3ft": ("generator", "judge", "train"),  # the judge from the second phase on, when the rows need an LLM judge
    "llm2llm": ("generator", "teacher", "train"),
    "aft": ("generator", "train"),
}


# The config key whose model (and chat template) a role's pool runs; every other role runs model.name's.
ROLE_MODEL_KEY = {"judge": "judge.model", "teacher": "teacher.model"}


class Pools:
    def __init__(
        self,
        config: JobConfig,
        model_paths: dict[str, str],
        run: Run,
        chat_templates: dict[str, str | None] | None = None,
        connect_ray: Callable[[], None] = lambda: None,
    ):
        self.config = config
        self.model_paths = model_paths  # {config key: local folder}, resolved before Ray started
        # {config key: configured chat template or None}, checked before Ray started (actors.chat.job_chat_templates)
        self.chat_templates = chat_templates or {}
        self.run = run
        self.connect_ray = connect_ray  # called before anything is placed: Ray starts on first need
        self.engines: dict[str, EnginePool] = {}
        self._trainer = None
        self._judge: Judge | None = None
        # The weights the generator serves from its next use on (use_generator_weights): loaded only when a phase
        # runs on it, so a rerun whose phases are all reused places no pool and loads nothing.
        self._generator_weights: str | None = None

    def model_path(self, role: str, model: str | None) -> str:
        """The local folder a role's pool loads: ``model`` (a config's ref) or model.name's."""
        c = self.config
        base = self.model_paths["model.name"]
        # Resolved before Ray started (resolve_models); a ref no config key names is resolved now.
        known = {c.model.name: base, c.judge.model: self.model_paths["judge.model"]}
        known[c.teacher.model] = self.model_paths["teacher.model"]
        return (known.get(model) or resolve_model(model, c.model.cache_dir, role)) if model else base

    def pool(self, role: str, model: str | None = None) -> EnginePool:
        if role not in self.engines:
            self.connect_ray()
            c = self.config
            path = self.model_path(role, model)
            self.engines[role] = EnginePool(
                role,
                path,
                getattr(c.pools, role),
                c.engine,
                c.cluster.ready_timeout_s,
                recovery_timeout_s=c.cluster.recovery_timeout_s,
                seed=c.run.seed,
                trust_remote_code=c.model.trust_remote_code,
                shared_paths=self.shared_paths(path),
                chat_template=self.chat_templates.get(ROLE_MODEL_KEY.get(role, "model.name")),
            )
            log.info("pool %s ready: %s", role, self.engines[role].info)
        return self.engines[role]

    def start(self, roles: Iterable[str], rows: list[dict]) -> None:
        """Place these pools concurrently: the train pool's ranks start in the background (its fit() thread) while
        the engine pools build, each in its own thread; returns when the engine pools are ready. The judge pool
        is placed only when ``rows`` need an LLM judge (``judge_pool_for``)."""
        start = time.perf_counter()
        self.connect_ray()  # once, before the threads below place pools
        if "train" in roles:
            self.trainer  # noqa: B018 (starting it is the point: TrainingService starts its ranks at once)

        def place(role: str) -> None:
            if role == "judge":
                self.judge_pool_for(rows)
            else:
                self.pool(role, self.config.teacher.model if role == "teacher" else None)

        engines = [role for role in roles if role != "train" and role not in self.engines]
        if engines:
            with ThreadPoolExecutor(len(engines)) as threads:
                list(threads.map(place, engines))
        placed = [role for role in roles if role == "train" or role in self.engines]
        log.info(
            "pools %s placed together; engine pools ready after %.1f s", ", ".join(placed), time.perf_counter() - start
        )

    @property
    def generator(self) -> EnginePool:
        """The generator pool, placed now if it is not yet, holding the weights last asked for."""
        pool = self.pool("generator")
        wanted = self._generator_weights
        if wanted is not None and pool.model_path != wanted:
            seconds = pool.load_weights(wanted)
            log.info("generator loaded %s in %.1f s", wanted, seconds)
            self.run.log({"weight_load_s": seconds})
        return pool

    def use_generator_weights(self, model_path: str) -> None:
        """The generator serves ``model_path`` from its next use on (``generator``); nothing is placed or loaded
        now: a phase reused from the run folder needs neither."""
        self._generator_weights = model_path

    def serving(self, role: str) -> str:
        """The model folder ``role``'s pool serves, placed or not: what a phase's key and lineage name before the
        phase decides whether it runs."""
        if role == "generator" and self._generator_weights is not None:  # a dry run's pending model too
            return self._generator_weights
        return self.model_path(role, {"judge": self.config.judge.model, "teacher": self.config.teacher.model}.get(role))

    def serving_pool(self, role: str) -> EnginePool:
        """``role``'s pool, placed now if it is not yet: the generator with the weights asked for, the judge's
        pool shared with the Judge, the teacher with teacher.model."""
        if role == "generator":
            return self.generator
        if role == "judge":
            if self.judge.pool is None:
                self.judge.pool = self.pool("judge", self.config.judge.model)
            return self.judge.pool
        return self.pool(role, self.config.teacher.model)

    @property
    def judge(self) -> Judge:
        if self._judge is None:
            c = self.config.judge
            self._judge = Judge(c.kind, c.prompts_dir, c.max_tokens)
        return self._judge

    def judge_pool_for(self, rows: list[dict]) -> None:
        """Place the judge pool only when some rows need an LLM judge."""
        if self.judge.pool is None and self.judge.needs_llm(rows):
            self.serving_pool("judge")

    def teacher(self) -> Teacher:
        c = self.config.teacher
        return Teacher(
            self.pool("teacher", c.model),
            self.config.judge.prompts_dir,
            c.k,
            c.temperature,
            c.top_p,
            c.max_tokens,
            c.rouge_threshold,
            c.max_attempts,
            self.config.run.seed,
        )

    @property
    def trainer(self):
        if self._trainer is None:
            from training.service import TrainingService

            self.connect_ray()
            self._trainer = TrainingService(
                self.config,
                on_metrics=self.run.log_training,
                shared_paths=self.shared_paths(self.model_paths["model.name"]),
            )
        return self._trainer

    def shared_paths(self, model_path: str) -> dict[str, list[str]]:
        """What every replica / rank must see from its own node: the model it loads, the run folder it writes
        (and the checkpoints the generator reloads from it)."""
        return {"read": [model_path], "write": [str(Path(self.run.dir).resolve())]}

    def placement(self) -> dict[str, list[dict]]:
        """{pool: [{node_id, labels}, ...]}: where each replica and training rank of the pools used ran."""
        from cluster.pools import node_labels

        placement = {role: p.placement() for role, p in self.engines.items()}
        if self._trainer is not None:
            labels = node_labels()
            placement["train"] = [{**r, "labels": labels.get(r["node_id"], {})} for r in self._trainer.placement()]
        return placement

    def wind_down(self) -> tuple[dict[str, float], dict]:
        """(idle seconds per pool, the summary's pool figures), recording the placement; the train pool stops here.
        The engine pools stay up until ``shutdown`` so that the summary is written before they go."""
        idle = {role: round(p.stats.idle_s(len(p.actors)), 1) for role, p in self.engines.items()}
        extra = {"judge_counts": dict(self.judge.counts) if self._judge else {}}
        try:
            extra["placement"] = self.placement()
            self.run.record_placement(extra["placement"])
        except Exception as err:  # Ray already gone (the error being reported): the summary must still be written
            log.warning("placement not recorded: %s", err)
        if self._trainer is not None:
            idle["train"] = round(self._trainer.idle_s(), 1)
            self._trainer.shutdown()
        tok = {
            role: p.stats.output_tokens / p.stats.generate_s for role, p in self.engines.items() if p.stats.generate_s
        }
        extra["generation_tokens_per_s"] = {k: round(v, 1) for k, v in tok.items()}
        return idle, extra

    def shutdown(self) -> None:
        for pool in self.engines.values():
            pool.shutdown()


class PlannedPool:
    """A dry run's stand-in for a role's pool (runfolder.dryrun): only which model it would hold, nothing placed."""

    def __init__(self, role: str, model_path: str):
        self.role, self.model_path = role, model_path


class PlannedPools(Pools):
    """``Pools`` of a dry run: a phase's key reads which model each pool holds; no replica is started."""

    def pool(self, role: str, model: str | None = None) -> PlannedPool:
        if role not in self.engines:
            self.engines[role] = PlannedPool(role, self.model_path(role, model))
        return self.engines[role]

    @property
    def generator(self) -> PlannedPool:
        pool = self.pool("generator")
        pool.model_path = self.serving("generator")  # a pending model (one a phase would train) too
        return pool
