"""Loop machinery shared by the four method drivers: the single controller's handles on its pools.

``Controller`` owns the run folder, the Ray connection and the role pools (started lazily: a method that
never needs a teacher never places one), and offers the few operations every driver is written in:
``generate``, ``judge``, ``train`` and ``evaluate``, each a resumable phase whose rows land in Parquet
with lineage (source id, model, iteration, sampling settings, verdict).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from actors.engine import Sampling
from actors.judge import Judge
from actors.llm_actor import EnginePool
from actors.teacher import Teacher
from cluster.blocks import Blocks
from cluster.cli import parse_job_args
from cluster.config import ConfigError, JobConfig, SamplingConfig, phase_training
from cluster.connect import PROJECT_ROOT, connect, joined_cluster
from cluster.data import DataError, likelihood_question, prepare, reworded
from cluster.models import resolve_model, resolve_models
from cluster.runfolder import RunFolderError, inputs_fingerprint, is_run_control
from cluster.tracking import Run

log = logging.getLogger("selfimprove")


def parse_args(method: str, argv: list[str] | None = None) -> JobConfig:
    """``--help`` lists every config key with type, default and doc; ``--print-config`` prints and exits."""
    return parse_job_args(method, argv)


# The phase group whose settings (training.sft / training.preference) a kind of training phase runs with.
TRAINING_PHASE = {"sft": "sft", "spin": "preference"}

# Prompt templates each job reads (the judge's two for every job): a missing one is found before Ray starts.
REQUIRED_PROMPTS = {
    "s3ft": ["paraphrase"],
    "aft": ["aggregate_system"],
    "llm2llm": ["augment_system", "augment_user", "augment_example_user", "augment_example_assistant"],
}


def check_prompts_dir(config: JobConfig) -> Path:
    """judge.prompts_dir resolved as actors.judge.load_prompt resolves it, with every template the job reads."""
    folder = Path(config.judge.prompts_dir).expanduser()
    folder = folder if folder.is_absolute() else PROJECT_ROOT / folder
    if not folder.is_dir():
        raise ConfigError(f"judge.prompts_dir: folder {folder} does not exist")
    names = ["equivalence", "pairwise", *REQUIRED_PROMPTS.get(config.run.method, [])]
    missing = [f"{n}.txt" for n in names if not (folder / f"{n}.txt").is_file()]
    if missing:
        raise ConfigError(f"judge.prompts_dir: {folder} lacks {', '.join(missing)}")
    return folder


def wilson_ci95(correct: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    z, p = 1.96, correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


class Controller:
    def __init__(self, config: JobConfig):
        self.config = config
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        # Everything the user pointed at is resolved and checked first, before Ray starts and before the run
        # folder exists: a wrong model id, prompts folder or dataset is a config / data error naming its key,
        # not a failure minutes later inside an actor, with a half-made run folder left behind.
        self.model_paths = resolve_models(config)  # {config key: local folder}
        check_prompts_dir(config)
        self.data = prepare(config.data, config.run.seed, config.run.method)
        self.base_model = self.model_paths["model.name"]
        self.run = Run(config)
        if self.data.shards:  # a streamed data.train is read on the cluster: Ray first
            where = connect(config.cluster)
            self._ingest()
        self._log_inputs()
        self._record_input_lineage()
        if not self.data.shards:
            where = connect(config.cluster)
        log.info("Ray: %s; run folder %s", where, self.run.dir)
        self._pools: dict[str, EnginePool] = {}
        self._trainer = None
        self._judge: Judge | None = None

    def _ingest(self) -> None:
        """Read the streamed data.train into the run folder. Its data errors end the job as prepare's do; with no
        phase done yet, the run folder keeps no state, so a rerun with the fix is not 'another config'."""
        from cluster.streaming import ingest

        try:
            self.data = ingest(self.run, self.config.data, self.data)
        except DataError as err:
            self.run.close(error=err)
            if not self.run.state["phases"]:
                for name in ("state.json", "state.json.bak"):
                    (self.run.dir / name).unlink(missing_ok=True)
            raise

    def _log_inputs(self) -> None:
        for key, path in self.model_paths.items():
            log.info("%s: %s", key, path)
        for report in self.data.reports:
            log.info("data %s", report)
        log.info("eval rows from %s; overlap with training data: %s", self.data.eval_source, self.data.overlap)
        # Every skipped row with its reason (the log line quotes only the first few).
        (Path(self.run.dir) / "data_report.json").write_text(
            json.dumps([r.as_dict() for r in self.data.reports], indent=1, ensure_ascii=False)
        )
        self.run.metric("data/malformed_rows", sum(r.malformed for r in self.data.reports))
        self.run.metric("data/rows", {"train": len(self.data.train), "eval": len(self.data.eval)})
        if self.data.overlap:  # only reachable with data.allow_overlap=true
            log.warning("evaluation prompts in the training data (data.allow_overlap=true): %s", self.data.overlap)
            self.run.metric(
                "data/overlap", {"by_id": len(self.data.overlap.by_id), "by_text": len(self.data.overlap.by_text)}
            )

    def _record_input_lineage(self) -> None:
        """The job's inputs as W&B artifacts, the roots of its lineage graph: the seed data splits (written as
        ``phases/data-<split>.parquet``) and the base model."""
        if self.run.lineage is None:
            return
        splits = {"train": self.data.train, "eval": self.data.eval, "general": self.data.general}
        try:
            paths = [
                self.run.write_rows(f"data-{split}", rows) if isinstance(rows, list) else self.source(rows)
                for split, rows in splits.items()
                if rows
            ]
        except Exception as err:  # rows Arrow cannot hold in one table: the graph loses its roots, the job goes on
            log.warning("W&B lineage: seed data not written: %s", err)
            return
        self.run.record_lineage("inputs", "inputs", [], [*paths, self.base_model], always=True)

    def source(self, rows: list[dict] | Blocks) -> str | None:
        """The seed data file ``rows`` are (W&B lineage; a streamed data.train's folder of parts), or None for rows
        a phase made."""
        for split, known in (("train", self.data.train), ("eval", self.data.eval), ("general", self.data.general)):
            if rows is known:
                return self.run.phase_file(f"data-{split}")
        return None

    # -- data ------------------------------------------------------------------------------------------

    def datasets(self) -> tuple[list[dict] | Blocks, list[dict]]:
        """(train, eval) rows, loaded and checked before the job started: deterministic in the seed, every
        row with a gold answer, no eval prompt in the training data (unless data.allow_overlap). A streamed
        data.train (data.streaming) is the Blocks of its snapshot: ``generate``, ``per_block`` and ``train``
        take it as they take a list, a block at a time."""
        return self.data.train, self.data.eval

    def general_eval(self) -> list[dict]:
        """data.general_eval's rows (S3FT's forgetting benchmark), checked against the training data too."""
        return self.data.general

    # -- pools -----------------------------------------------------------------------------------------

    def pool(self, role: str, model: str | None = None) -> EnginePool:
        if role not in self._pools:
            c = self.config
            # Resolved before Ray started (resolve_models); a ref no config key names is resolved now.
            known = {c.model.name: self.base_model, c.judge.model: self.model_paths["judge.model"]}
            known[c.teacher.model] = self.model_paths["teacher.model"]
            path = (known.get(model) or resolve_model(model, c.model.cache_dir, role)) if model else self.base_model
            self._pools[role] = EnginePool(
                role,
                path,
                getattr(c.pools, role),
                c.engine,
                c.cluster.ready_timeout_s,
                seed=c.run.seed,
                trust_remote_code=c.model.trust_remote_code,
                shared_paths=self.shared_paths(path),
            )
            log.info("pool %s ready: %s", role, self._pools[role].info)
        return self._pools[role]

    def start_pools(self, roles: Iterable[str]) -> None:
        """Place these pools concurrently: the train pool's ranks start in the background (its fit() thread) while
        the engine pools build, each in its own thread; returns when the engine pools are ready."""
        start = time.perf_counter()
        if "train" in roles:
            self.trainer  # noqa: B018 (starting it is the point: TrainingService starts its ranks at once)
        models = {"judge": self.config.judge.model, "teacher": self.config.teacher.model}
        engines = [role for role in roles if role != "train" and role not in self._pools]
        if engines:
            with ThreadPoolExecutor(len(engines)) as threads:
                list(threads.map(lambda role: self.pool(role, models.get(role)), engines))
        log.info(
            "pools %s placed together; engine pools ready after %.1f s", ", ".join(roles), time.perf_counter() - start
        )

    @property
    def generator(self) -> EnginePool:
        return self.pool("generator")

    def use_generator_weights(self, model_path: str) -> None:
        pool = self.generator
        if pool.model_path != model_path:
            seconds = pool.load_weights(model_path)
            log.info("generator loaded %s in %.1f s", model_path, seconds)
            self.run.log({"weight_load_s": seconds})

    @property
    def judge(self) -> Judge:
        if self._judge is None:
            c = self.config.judge
            self._judge = Judge(c.kind, c.prompts_dir, c.max_tokens)
        return self._judge

    def judge_pool_for(self, rows: list[dict]) -> None:
        """Place the judge pool only when some rows need an LLM judge."""
        if self.judge.pool is None and self.judge.needs_llm(rows):
            self.judge.pool = self.pool("judge", self.config.judge.model)

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

            self._trainer = TrainingService(
                self.config,
                on_metrics=self.run.log_training,
                shared_paths=self.shared_paths(self.base_model),
            )
        return self._trainer

    def shared_paths(self, model_path: str) -> dict[str, list[str]]:
        """What every replica / rank must see from its own node: the model it loads, the run folder it writes
        (and the checkpoints the generator reloads from it)."""
        return {"read": [model_path], "write": [str(Path(self.run.dir).resolve())]}

    def placement(self) -> dict[str, list[dict]]:
        """{pool: [{node_id, labels}, ...]}: where each replica and training rank of the pools used ran."""
        from cluster.pools import node_labels

        placement = {role: p.placement() for role, p in self._pools.items()}
        if self._trainer is not None:
            labels = node_labels()
            placement["train"] = [{**r, "labels": labels.get(r["node_id"], {})} for r in self._trainer.placement()]
        return placement

    # -- operations ------------------------------------------------------------------------------------

    def sampling(self, section: SamplingConfig, salt: int = 0, **overrides) -> Sampling:
        return Sampling.from_config(section, seed=self.config.run.seed * 7919 + salt, **overrides)

    def generate(
        self,
        name: str,
        rows: list[dict] | Blocks,
        sampling: Sampling,
        iteration: int = 0,
        pool: EnginePool | None = None,
    ) -> dict[str, dict] | Blocks:
        """A resumable generation phase: {row id: {response, ...lineage}} (first sample; all in 'samples'). On
        streamed rows: the Blocks of those outputs, block k made from block k of ``rows``."""
        pool = pool or self.generator
        settings = json.dumps(sampling.as_dict())
        failed: list[dict] = []  # rows the pool could not produce, with the reason: stored by the phase

        def lineage(batch: list[dict]) -> list[dict]:
            return [
                {
                    "id": out["id"],
                    "source_id": out["id"],
                    "iteration": iteration,
                    "model": pool.model_path,
                    "sampling": settings,
                    "response": out["samples"][0]["text"],
                    "samples": [s["text"] for s in out["samples"]],
                    "finish_reason": out["samples"][0]["finish_reason"],
                    "truncated": out["samples"][0]["truncated"],
                    "response_tokens": len(out["samples"][0]["token_ids"]),
                }
                for out in batch
            ]

        if isinstance(rows, Blocks):  # one block of prompts in the driver at a time
            generated = self.run.block_phase(
                name,
                rows,
                lambda todo: [
                    o for batch in pool.generate(todo, sampling, desc=name, failed=failed) for o in lineage(batch)
                ],
                failed=failed,
            )
            self.run.record_lineage(name, "generate", [pool.model_path, self.source(rows)], [self.run.phase_file(name)])
            return generated

        def process(todo: list[dict]):
            for batch in pool.generate(todo, sampling, desc=name, failed=failed):
                yield lineage(batch)

        outputs = self.run.row_phase(name, rows, process, failed=failed)
        self.run.record_lineage(name, "generate", [pool.model_path, self.source(rows)], [self.run.phase_file(name)])
        return {o["id"]: o for o in outputs}

    def per_block(self, name: str, fn: Callable[..., list[dict]], rows: list[dict] | Blocks, *aligned, **kwargs):
        """``fn(rows, *aligned, **kwargs)``: a pure row transform of methods/ (SPIN's pairs, its SFT targets). On
        streamed rows it runs block by block as the resumable phase ``name``, each aligned input (a streamed
        ``generate``'s Blocks) given as {row id: output} of the same block, as ``generate`` returns it in memory;
        the outputs name their input row in ``source_id``."""
        if not isinstance(rows, Blocks):
            return fn(rows, *aligned, **kwargs)

        def block(todo: list[dict], *aligned_rows: list[dict]) -> list[dict]:
            return fn(todo, *({r["id"]: r for r in a} for a in aligned_rows), **kwargs)

        return self.run.block_phase(
            name, rows, block, aligned=aligned, key="source_id", one_per_row=False, settings=kwargs
        )

    def judge_equivalence(
        self, name: str, rows: list[dict], responses: dict[str, str], uses: list[str] | None = None
    ) -> dict[str, str]:
        """A resumable judging phase: {row id: yes/no/unknown}. ``uses``: the files rows and responses came from
        (W&B lineage)."""
        self.judge_pool_for(rows)
        by_id = {r["id"]: r for r in rows}

        failed: list[dict] = []

        def process(todo: list[dict]):
            items = [{"id": r["id"], "row": r, "response": responses[r["id"]]} for r in todo if r["id"] in responses]
            verdicts = self.judge.equivalent(items, failed=failed)
            yield [{"id": k, "verdict": v, "judge": self.config.judge.kind} for k, v in verdicts.items()]

        out = self.run.row_phase(name, [r for r in by_id.values() if r["id"] in responses], process, failed=failed)
        judge_model = [self.judge.pool.model_path] if self.judge.pool is not None else []
        self.run.record_lineage(
            name, "judge", [*(uses or [self.source(rows)]), *judge_model], [self.run.phase_file(name)]
        )
        verdicts = {o["id"]: o["verdict"] for o in out}
        unknown = sum(v == "unknown" for v in verdicts.values())
        if unknown:
            log.warning("%s: %d verdicts could not be parsed (counted as unknown)", name, unknown)
        self.run.metric(f"{name}/unknown_verdicts", unknown)
        return verdicts

    def train(
        self,
        name: str,
        kind: str,
        init_model: str,
        examples: list[dict] | Blocks,
        training: dict | None = None,
        uses: list[str] | None = None,
        **extra,
    ) -> str:
        """A training phase (SFT or SPIN) on the train pool; returns the HF folder it wrote. ``training``: the
        resolved settings (``phase_training``); None: those of the kind's phase group (sft, or preference for
        SPIN), which is what the ranks receive."""
        output = self.run.model_dir(name)  # ``uses``: files the examples were made from (W&B lineage)
        training = training or phase_training(self.config, TRAINING_PHASE[kind])
        minimum = self.config.training.min_examples
        streamed = isinstance(examples, Blocks)  # the ranks read the parts themselves: no copy in one file

        def run() -> dict:
            if len(examples) < minimum:
                from training.service import TrainingError

                raise TrainingError(
                    f"phase {name}: {len(examples)} training examples, fewer than training.min_examples={minimum}; "
                    "nothing to train on (see the failed rows of the phases before it)"
                )
            data = examples.files() if streamed else self.run.write_rows(f"{name}-data", examples)
            spec = {
                "name": name,
                "kind": kind,
                "init_model": init_model,
                "data": data,
                "phase_dir": self.run.phase_dir(f"{name}-train"),
                "output": output,
                "training": training,
                "seed": self.config.run.seed,
                "trust_remote_code": self.config.model.trust_remote_code,
                **extra,
            }
            result = self.trainer.train(spec)
            log.info(
                "trained %s: %d steps, %.0f tok/s, truncation %s",
                name,
                result["steps"],
                result["train_tokens_per_s"],
                result["truncation"],
            )
            return result

        settings = {k: v for k, v in training.items() if not is_run_control(f"training.{k}")}
        described = {"kind": kind, "init_model": init_model, **extra, "training": settings}
        inputs = inputs_fingerprint(examples.fingerprint() if streamed else examples, described)
        scratch = Path(self.run.phase_dir(f"{name}-train"))  # checkpoints + reference log-probs of these inputs
        result = self.run.once(name, run, inputs=inputs, scratch=scratch)
        # W&B lineage: the examples (made from ``uses``), then model in + examples -> model out.
        example_files = list(examples.folders) if streamed else [self.run.phase_file(f"{name}-data")]
        self.run.record_lineage(name, f"{kind}-data", uses or [], example_files, label=f"{name}-data")
        self.run.record_lineage(name, "train", [init_model, *example_files], [result["output"]])
        self.run.metric(f"{name}/steps", result["steps"])  # optimizer steps (LLM2LLM's matched-steps control)
        self.run.metric(f"{name}/train_tokens_per_s", round(result["train_tokens_per_s"], 1))
        # sequences whose prompt or response was cut to fit, and AFT proposals cut to share the prompt budget
        self.run.metric(f"{name}/truncation", result["truncation"])
        return result["output"]

    def record_rows(self, name: str, rows_in: int, rows_out: int, unit_in: str, unit_out: str) -> None:
        """``<name>/rows``: what a step turned its inputs into and how many inputs it dropped (SPIN prompts -> pairs,
        AFT queries -> aggregation examples)."""
        self.run.metric(f"{name}/rows", {unit_in: rows_in, unit_out: rows_out, "dropped": rows_in - rows_out})
        if rows_out < rows_in:
            log.warning("%s: %d of %d %s gave no %s", name, rows_in - rows_out, rows_in, unit_in, unit_out)

    def record_accuracy(self, name: str, verdicts: dict[str, str], n: int) -> tuple[float, tuple[float, float]]:
        """Log ``<name>/accuracy``, ``/ci95`` (Wilson) and ``/n`` from judge verdicts over ``n`` rows."""
        correct = sum(v == "yes" for v in verdicts.values())
        accuracy, ci95 = correct / max(n, 1), wilson_ci95(correct, n)
        self.run.metric(f"{name}/accuracy", accuracy)
        self.run.metric(f"{name}/ci95", [round(x, 4) for x in ci95])
        self.run.metric(f"{name}/n", n)
        return accuracy, ci95

    def evaluate(self, name: str, rows: list[dict], model_path: str) -> float:
        """Greedy answers from ``model_path`` on ``rows``, judged; accuracy with a 95% Wilson interval. With
        data.eval_reworded the rows are scored again under the task's reworded instruction (``<name>_reworded``),
        with data.eval_loglik classification rows also by label log-likelihood (``<name>_loglik``, and
        ``<name>_reworded_loglik``). Returns the accuracy under the rows' own wording."""
        accuracy = self.evaluate_greedy(name, rows, model_path)
        variants = [(name, rows)]
        if self.config.data.eval_reworded:
            other = [w for r in rows if (w := reworded(r)) is not None]
            if len(other) < len(rows):
                log.warning("%s: %d rows have no reworded instruction and are left out", name, len(rows) - len(other))
            if other:
                self.evaluate_greedy(f"{name}_reworded", other, model_path)
                variants.append((f"{name}_reworded", other))
        if self.config.data.eval_loglik:
            for variant, variant_rows in variants:
                labelled = [r for r in variant_rows if r["task"] == "classification"]
                if labelled:
                    self.evaluate_loglik(f"{variant}_loglik", labelled, model_path)
        return accuracy

    def evaluate_greedy(self, name: str, rows: list[dict], model_path: str) -> float:
        """Greedy answers from ``model_path`` on ``rows``, judged: ``<name>/accuracy``, ``/ci95`` (Wilson),
        ``/n``, ``/failed``, ``/unknown`` (answers the verifier could not read: no label, number or letter) and
        ``/truncated`` (answers cut at evaluation.max_tokens, which may have lost their final answer)."""
        if not rows:
            return float("nan")
        self.use_generator_weights(model_path)
        outputs = self.generate(f"{name}-answers", rows, self.sampling(self.config.evaluation))
        answers = {k: v["response"] for k, v in outputs.items()}
        verdicts = self.judge_equivalence(
            f"{name}-verdicts", rows, answers, uses=[self.source(rows), self.run.phase_file(f"{name}-answers")]
        )
        # A row never answered (or never judged) is a failed row, reported as such, not a wrong answer.
        self.run.metric(f"{name}/failed", len(rows) - len(verdicts))
        self.run.metric(f"{name}/unknown", sum(v == "unknown" for v in verdicts.values()))
        self.run.metric(f"{name}/truncated", sum(bool(o.get("truncated")) for o in outputs.values()))
        accuracy, (low, high) = self.record_accuracy(name, verdicts, len(verdicts))
        self.run.table(
            f"samples/{name}",
            [
                {
                    "id": r["id"],
                    "prompt": r["messages"][-1]["content"],
                    "reference": r["reference"],
                    "response": outputs.get(r["id"], {}).get("response"),
                    "verdict": verdicts.get(r["id"]),
                }
                for r in rows
            ],
            ["id", "prompt", "reference", "response", "verdict"],
        )
        log.info("eval %s: accuracy %.3f (95%% CI %.3f-%.3f, n=%d)", name, accuracy, low, high, len(verdicts))
        return accuracy

    def evaluate_loglik(self, name: str, rows: list[dict], model_path: str) -> float:
        """Log-likelihood multiple choice: each row's candidate answers scored by ``model_path`` after the
        chat-templated question; correct when the gold one has the highest log-prob per character (acc_norm)."""
        scorable = [(r, found) for r in rows if (found := likelihood_question(r))]
        if len(scorable) < len(rows):
            log.warning("%s: %d rows have no candidate answers and are left out", name, len(rows) - len(scorable))
        if not scorable:
            return float("nan")
        self.use_generator_weights(model_path)

        def score() -> dict[str, str]:
            requests = [
                {"id": f"{r['id']}#{i}", "messages": messages, "response": text}
                for r, (messages, candidates, _) in scorable
                for i, text in enumerate(candidates)
            ]
            logprobs = self.generator.score_all(requests)
            verdicts = {}
            for r, (_, candidates, gold) in scorable:
                keys = [f"{r['id']}#{i}" for i in range(len(candidates))]
                if not all(k in logprobs for k in keys):  # a candidate the engine could not score: failed, not wrong
                    continue
                per_char = [sum(logprobs[k]) / max(1, len(text)) for k, text in zip(keys, candidates)]
                verdicts[r["id"]] = "yes" if per_char.index(max(per_char)) == gold else "no"
            return verdicts

        verdicts = self.run.once(f"{name}-loglik", score)
        self.run.metric(f"{name}/failed", len(scorable) - len(verdicts))
        accuracy, (low, high) = self.record_accuracy(name, verdicts, len(verdicts))
        log.info("loglik eval %s: accuracy %.3f (95%% CI %.3f-%.3f, n=%d)", name, accuracy, low, high, len(verdicts))
        return accuracy

    def close(self, error: BaseException | None = None) -> dict:
        idle = {role: round(p.stats.idle_s(len(p.actors)), 1) for role, p in self._pools.items()}
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
            role: p.stats.output_tokens / p.stats.generate_s for role, p in self._pools.items() if p.stats.generate_s
        }
        extra["generation_tokens_per_s"] = {k: round(v, 1) for k, v in tok.items()}
        try:
            summary = self.run.close(idle, extra, error)
        finally:
            for pool in self._pools.values():
                pool.shutdown()
        return summary


# The pools each method uses from its first phases on (cluster.start_pools_together places them at the start).
POOLS_AT_START = {
    "spin": ("generator", "train"),
    "s3ft": ("generator", "train"),
    "llm2llm": ("generator", "teacher", "train"),
    "aft": ("generator", "train"),
}


def main(method: str, algorithm: Callable[[Controller], None], argv: list[str] | None = None) -> dict:
    config = parse_args(method, argv)
    try:
        controller = Controller(config)
    except (ConfigError, DataError) as err:  # found before Ray started: no run folder was made
        kind = "config" if isinstance(err, ConfigError) else "data"
        print(f"{kind} error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunFolderError as err:  # held by another driver, config changed, unreadable state: nothing was touched
        print(f"run folder error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    try:
        together = config.cluster.start_pools_together
        if method in POOLS_AT_START and (joined_cluster() if together is None else together):
            controller.start_pools(POOLS_AT_START[method])
        algorithm(controller)
    except BaseException as err:  # the summary says failed, with the error; the error still ends the job
        controller.close(error=err)
        raise
    summary = controller.close()
    Path(config.run_dir / "DONE").write_text("ok\n")
    return summary
