"""Loop machinery shared by the four method drivers: the single controller's handles on its pools.

``Controller`` owns the run folder, the Ray connection and the role pools (started lazily: a method that
never needs a teacher never places one), and offers the few operations every driver is written in:
``generate``, ``judge``, ``train`` and ``evaluate``, each a resumable phase whose rows land in Parquet
with lineage (source id, model, iteration, sampling settings, verdict).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

from actors.engine import Sampling
from actors.judge import Judge
from actors.llm_actor import EnginePool
from actors.teacher import Teacher
from cluster.config import ConfigError, JobConfig, SamplingConfig, load_config, to_dict
from cluster.connect import connect
from cluster.data import likelihood_question, load_dataset, split, take
from cluster.models import resolve_model
from cluster.runfolder import RunFolderError, inputs_fingerprint, is_run_control
from cluster.tracking import Run

log = logging.getLogger("selfimprove")


def parse_args(method: str, argv: list[str] | None = None) -> JobConfig:
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{method}", description=f"Run the {method} job. Overrides: section.key=value"
    )
    parser.add_argument("--config", default=f"configs/{method}.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, [f"run.method={method}", *args.overrides])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return config


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
        self.run = Run(config)
        where = connect(config.cluster)
        log.info("Ray: %s; run folder %s", where, self.run.dir)
        self.base_model = resolve_model(config.model.name, config.model.cache_dir)
        self._pools: dict[str, EnginePool] = {}
        self._trainer = None
        self._judge: Judge | None = None

    # -- data ------------------------------------------------------------------------------------------

    def datasets(self) -> tuple[list[dict], list[dict]]:
        """(train, eval) rows: deterministic in the seed; malformed rows reported and skipped."""
        c = self.config.data
        rows, report = load_dataset(c.train)
        log.info("data %s", report)
        self.run.metric("data/malformed_rows", report.malformed)
        if c.eval:
            train = rows
            eval_rows, eval_report = load_dataset(c.eval)
            log.info("data %s", eval_report)
        else:
            train, eval_rows = split(rows, self.config.run.seed, c.eval_fraction)
        train, eval_rows = take(train, c.n_train, self.config.run.seed), take(eval_rows, c.n_eval, self.config.run.seed)
        if not train:
            raise ValueError(f"data.train: {c.train!r} yielded no usable training rows ({report})")
        return train, eval_rows

    # -- pools -----------------------------------------------------------------------------------------

    def pool(self, role: str, model: str | None = None) -> EnginePool:
        if role not in self._pools:
            c = self.config
            path = resolve_model(model, c.model.cache_dir) if model else self.base_model
            self._pools[role] = EnginePool(
                role,
                path,
                getattr(c.pools, role),
                c.engine,
                c.cluster.ready_timeout_s,
                seed=c.run.seed,
                trust_remote_code=c.model.trust_remote_code,
            )
            log.info("pool %s ready: %s", role, self._pools[role].info)
        return self._pools[role]

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
                on_metrics=lambda m: self.run.log(
                    {f"train/{k}": v for k, v in m.items() if isinstance(v, (int, float))}
                ),
            )
        return self._trainer

    # -- operations ------------------------------------------------------------------------------------

    def sampling(self, section: SamplingConfig, salt: int = 0, **overrides) -> Sampling:
        return Sampling.from_config(section, seed=self.config.run.seed * 7919 + salt, **overrides)

    def generate(
        self, name: str, rows: list[dict], sampling: Sampling, iteration: int = 0, pool: EnginePool | None = None
    ) -> dict[str, dict]:
        """A resumable generation phase: {row id: {response, ...lineage}} (first sample; all in 'samples')."""
        pool = pool or self.generator
        settings = json.dumps(sampling.as_dict())
        failed: list[dict] = []  # rows the pool could not produce, with the reason: stored by the phase

        def process(todo: list[dict]):
            for batch in pool.generate(todo, sampling, desc=name, failed=failed):
                yield [
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

        outputs = self.run.row_phase(name, rows, process, failed=failed)
        return {o["id"]: o for o in outputs}

    def judge_equivalence(self, name: str, rows: list[dict], responses: dict[str, str]) -> dict[str, str]:
        """A resumable judging phase: {row id: yes/no/unknown}."""
        self.judge_pool_for(rows)
        by_id = {r["id"]: r for r in rows}

        failed: list[dict] = []

        def process(todo: list[dict]):
            items = [{"id": r["id"], "row": r, "response": responses[r["id"]]} for r in todo if r["id"] in responses]
            verdicts = self.judge.equivalent(items, failed=failed)
            yield [{"id": k, "verdict": v, "judge": self.config.judge.kind} for k, v in verdicts.items()]

        out = self.run.row_phase(name, [r for r in by_id.values() if r["id"] in responses], process, failed=failed)
        verdicts = {o["id"]: o["verdict"] for o in out}
        unknown = sum(v == "unknown" for v in verdicts.values())
        if unknown:
            log.warning("%s: %d verdicts could not be parsed (counted as unknown)", name, unknown)
        self.run.metric(f"{name}/unknown_verdicts", unknown)
        return verdicts

    def train(self, name: str, kind: str, init_model: str, examples: list[dict], **extra) -> str:
        """A training phase (SFT or SPIN) on the train pool; returns the HF folder it wrote."""
        output = self.run.model_dir(name)
        minimum = self.config.training.min_examples

        def run() -> dict:
            if len(examples) < minimum:
                from training.service import TrainingError

                raise TrainingError(
                    f"phase {name}: {len(examples)} training examples, fewer than training.min_examples={minimum}; "
                    "nothing to train on (see the failed rows of the phases before it)"
                )
            data = self.run.write_rows(f"{name}-data", examples)
            spec = {
                "name": name,
                "kind": kind,
                "init_model": init_model,
                "data": data,
                "phase_dir": self.run.phase_dir(f"{name}-train"),
                "output": output,
                "training": to_dict(self.config)["training"],
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

        training = extra.get("training", to_dict(self.config)["training"])
        settings = {k: v for k, v in training.items() if not is_run_control(f"training.{k}")}
        inputs = inputs_fingerprint(examples, {"kind": kind, "init_model": init_model, **extra, "training": settings})
        scratch = Path(self.run.phase_dir(f"{name}-train"))  # checkpoints + reference log-probs of these inputs
        result = self.run.once(name, run, inputs=inputs, scratch=scratch)
        self.run.metric(f"{name}/train_tokens_per_s", round(result["train_tokens_per_s"], 1))
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
        """Greedy answers from ``model_path`` on ``rows``, judged; accuracy with a 95% Wilson interval."""
        if not rows:
            return float("nan")
        self.use_generator_weights(model_path)
        outputs = self.generate(f"{name}-answers", rows, self.sampling(self.config.evaluation))
        verdicts = self.judge_equivalence(f"{name}-verdicts", rows, {k: v["response"] for k, v in outputs.items()})
        # A row never answered (or never judged) is a failed row, reported as such, not a wrong answer.
        self.run.metric(f"{name}/failed", len(rows) - len(verdicts))
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


def main(method: str, algorithm: Callable[[Controller], None], argv: list[str] | None = None) -> dict:
    config = parse_args(method, argv)
    try:
        controller = Controller(config)
    except RunFolderError as err:  # held by another driver, config changed, unreadable state: nothing was touched
        print(f"run folder error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    try:
        algorithm(controller)
    except BaseException as err:  # the summary says failed, with the error; the error still ends the job
        controller.close(error=err)
        raise
    summary = controller.close()
    Path(config.run_dir / "DONE").write_text("ok\n")
    return summary
