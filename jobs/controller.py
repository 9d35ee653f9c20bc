"""The single controller the four method drivers are written in: a thin facade over the run's phases.

``Controller`` owns the config, the checked inputs, the run folder and the Ray connection, and offers the few
operations every driver is written in: ``generate``, ``judge_equivalence``, ``per_block`` and ``train``, each a
resumable phase whose rows land in Parquet with lineage (source id, model, iteration, sampling settings,
verdict). The role pools (started lazily: a method that never needs a teacher never places one) live in
``jobs.roles``, evaluation (written in these phases) in ``jobs.evaluation``; the controller only hands drivers
on to them, so a driver still reads ``ctl.evaluate(...)``, ``ctl.pool(...)``, ``ctl.trainer``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from actors.chat import job_chat_formats
from actors.engine import Sampling
from actors.judge import Judge
from actors.llm_actor import EnginePool
from actors.teacher import Teacher
from cluster.connect import connect, joins_cluster
from cluster.environment import PROJECT_ROOT
from cluster.models import resolve_models
from configs.schema import TRAINING_PHASES, ConfigError, JobConfig, SamplingConfig, peft_key, phase_training
from data.rows import DataError, prepare
from jobs import evaluation, inputs, lm_eval_phase, mt_bench_phase
from jobs.cli import parse_job_args
from jobs.roles import POOLS_AT_START, PlannedPools, Pools
from runfolder.blocks import Blocks
from runfolder.dryrun import NeedsOutput, PlannedRun, format_report, is_pending
from runfolder.run import Run
from runfolder.state import LeaseLostError, RunFolderError, is_run_control
from training import adapters

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
    "llm2llm": [
        "augment_system",
        "augment_user",
        "augment_example_user",
        "augment_example_assistant",
        "augment_more_user",
    ],
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


def check_adapter_targets(config: JobConfig, model_path: str) -> None:
    """Every module the phases' adapters name (training.peft, training.<phase>.peft) exists in the model: checked on
    the model built from its config.json on the meta device, before Ray starts. Every trained model has the base
    model's modules, so the base model decides for all phases."""
    phases = {}
    for phase in TRAINING_PHASES:
        peft = phase_training(config, phase)["peft"]
        if peft["enabled"]:
            keys = {f: peft_key(config, phase, f) for f in ("target_modules", "modules_to_save")}
            phases[phase] = (peft, keys)
    try:
        adapters.check_targets(model_path, phases, config.model.trust_remote_code)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def keyed_training_settings(training: dict, native: str | None = None) -> dict:
    """The training settings a phase's key holds: every one that shapes the model, without the run controls, and
    without the settings of a feature the phase does not use, so folders trained before the feature existed resume
    (adapters when ``peft`` is off; the bf16 rounding when the phase is not in CPU bf16: 'auto' is fp32 on a CPU
    rank and DeepSpeed's own bf16 on a GPU, neither of which rounds as ``bf16_rounding`` says).

    ``native``: what bf16 'native' resolves to on the train pool where the driver can tell
    (``training.service.native_precision``). Where it is fp32 the key says so (``native_precision``), so a phase
    trained in fp32 on a CPU without bf16 is not reused where 'native' means bf16, nor the reverse; where it is
    bf16 the key is as before, so those folders resume."""
    settings = {k: v for k, v in training.items() if not is_run_control(f"training.{k}")}
    if not settings.get("peft", {}).get("enabled"):
        settings.pop("peft", None)
    ds = settings.get("deepspeed", {})
    if ds.get("bf16") == "native" and native == "fp32":
        settings["deepspeed"] = {**{k: v for k, v in ds.items() if k != "bf16_rounding"}, "native_precision": "fp32"}
    elif "deepspeed" in settings and ds.get("bf16") not in (True, "native"):
        settings["deepspeed"] = {k: v for k, v in settings["deepspeed"].items() if k != "bf16_rounding"}
    elif settings.get("deepspeed", {}).get("bf16_rounding") == "stochastic":
        # Since 2026-12-04 one draw per optimizer step, and frozen weights rounded once to nearest; since 2026-12-04 #2
        # the noise is a counter hash of (seed, step, layer, index), not torch's Mersenne Twister
        # (training/precision.py): each is another model than the draw before, so those folders train again.
        draw = "per_optimizer_step, counter hash, frozen nearest"
        settings["deepspeed"] = {**settings["deepspeed"], "bf16_rounding_draw": draw}
    return settings


def _generated_row(out: dict, iteration: int, model: str, settings: str) -> dict:
    """One generation output with its lineage: the first sample as the response, every sample in 'samples'."""
    first = out["samples"][0]
    return {
        "id": out["id"],
        "source_id": out["id"],
        "iteration": iteration,
        "model": model,
        "sampling": settings,
        "response": first["text"],
        "samples": [s["text"] for s in out["samples"]],
        "finish_reason": first["finish_reason"],
        "truncated": first["truncated"],
        "response_tokens": len(first["token_ids"]),
    }


class Controller:
    def __init__(self, config: JobConfig, planned: bool = False):
        """``planned``: a dry run (``--dry-run``, runfolder.dryrun): the run folder is only read, no Ray is started and
        no pool placed; each phase records whether a rerun would reuse it or run it, and why."""
        self.config = config
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        # Everything the user pointed at is resolved and checked first, before Ray starts and before the run
        # folder exists: a wrong model id, prompts folder or dataset is a config / data error naming its key,
        # not a failure minutes later inside an actor, with a half-made run folder left behind.
        self.model_paths = resolve_models(config)  # {config key: local folder}
        try:  # each model's chat format (actors/chat.py), logged once the run folder's log exists
            self.chat_formats = job_chat_formats(config, self.model_paths, PROJECT_ROOT)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.chat_templates = self.chat_formats.templates  # {config key: configured template or None}
        check_prompts_dir(config)
        check_adapter_targets(config, self.model_paths["model.name"])
        lm_eval_phase.check(config)  # every benchmark task exists and its data is here
        mt_bench_phase.check(config)  # MT-Bench's questions and FastChat's judge prompts are here
        self.data = prepare(config.data, config.run.seed, config.run.method)
        self.base_model = self.model_paths["model.name"]
        if planned:
            self.run = PlannedRun(config)
            if self.data.shards:  # its snapshot, when the folder has one under the same key
                self.data = inputs.ingest(self.run, config.data, self.data)
            self.pools = PlannedPools(config, self.model_paths, self.run, self.chat_templates)
            return
        self.run = Run(config)
        self.chat_formats.log(self.run)
        log.info("run folder %s", self.run.dir)
        self._ray: str | None = None  # where connect_ray connected, once it has
        if self.data.shards:  # a streamed data.train is read on the cluster: Ray first
            self.connect_ray()
            self.data = inputs.ingest(self.run, config.data, self.data)
        inputs.log_inputs(self.run, self.data, self.model_paths)
        inputs.record_input_lineage(self.run, self.data, self.base_model)
        self.pools = Pools(config, self.model_paths, self.run, self.chat_templates, connect_ray=self.connect_ray)

    def connect_ray(self) -> None:
        """Start (or join) Ray the first time the job needs it: a pool or the training ranks placed, a streamed
        data.train read. A rerun whose phases are all reused needs none, and starts none (~11 s here)."""
        if self._ray is None:
            self._ray = connect(self.config.cluster)
            log.info("Ray: %s", self._ray)

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

    def source(self, rows: list[dict] | Blocks) -> str | None:
        """The seed data file ``rows`` are (W&B lineage), or None for rows a phase made."""
        return inputs.source(self.run, self.data, rows)

    # -- pools (jobs.roles) ------------------------------------------------------------------------------

    def pool(self, role: str, model: str | None = None) -> EnginePool:
        return self.pools.pool(role, model)

    def serving(self, role: str) -> str:
        """The model ``role``'s pool serves, placed or not (keys and lineage)."""
        return self.pools.serving(role)

    def serving_pool(self, role: str) -> EnginePool:
        """``role``'s pool, placed now if it is not yet (inside a phase that runs)."""
        return self.pools.serving_pool(role)

    def start_pools(self, roles: Iterable[str]) -> None:
        """Place ``roles`` together; the judge pool only when the training rows need an LLM judge (a task whose
        verifier decides never places it)."""
        self.pools.start(roles, self.data.train if isinstance(self.data.train, list) else [])

    @property
    def generator(self) -> EnginePool:
        return self.pools.generator

    def use_generator_weights(self, model_path: str) -> None:
        self.pools.use_generator_weights(model_path)

    @property
    def judge(self) -> Judge:
        return self.pools.judge

    def teacher(self) -> Teacher:
        return self.pools.teacher()

    @property
    def trainer(self):
        return self.pools.trainer

    # -- operations ------------------------------------------------------------------------------------

    def sampling(self, section: SamplingConfig, salt: int = 0, **overrides) -> Sampling:
        return Sampling.from_config(section, seed=self.config.run.seed * 7919 + salt, **overrides)

    def generate(
        self,
        name: str,
        rows: list[dict] | Blocks,
        sampling: Sampling,
        iteration: int = 0,
        role: str = "generator",
    ) -> dict[str, dict] | Blocks:
        """A resumable generation phase on ``role``'s pool: {row id: {response, ...lineage}} (first sample; all in
        'samples'). On streamed rows: the Blocks of those outputs, block k made from block k of ``rows``. The pool
        is placed (and the generator's weights loaded) only when some rows are left to generate."""
        model_path = self.pools.serving(role)  # what the pool serves, placed or not: the key and lineage name it
        settings = json.dumps(sampling.as_dict())
        failed: list[dict] = []  # rows the pool could not produce, with the reason: stored by the phase

        def process(todo: list[dict]):
            pool = self.pools.serving_pool(role)
            for batch in pool.generate(todo, sampling, desc=name, failed=failed):
                yield [_generated_row(out, iteration, pool.model_path, settings) for out in batch]

        # The outputs depend on the rows, the sampling settings, the iteration (a lineage column) and the weights the
        # pool serves: the model is named by its key (the training phase that wrote it, or its content).
        context = {
            "model": self.run.model_key(model_path),
            "sampling": sampling.as_dict(),
            "iteration": iteration,
            "chat_templates": self.chat_templates,  # the resolved texts: a template file edited in place counts
        }
        if isinstance(rows, Blocks):  # one block of prompts in the driver at a time
            generated = self.run.block_phase(
                name, rows, lambda todo: [o for b in process(todo) for o in b], failed=failed, context=context
            )
        else:
            out = self.run.row_phase(name, rows, process, failed=failed, context=context)
            generated = out if is_pending(out) else {o["id"]: o for o in out}  # pending: a dry run's phase that runs
        self.run.record_lineage(name, "generate", [model_path, self.source(rows)], [self.run.phase_file(name)])
        return generated

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
            name,
            rows,
            block,
            aligned=aligned,
            key="source_id",
            one_per_row=False,
            settings=kwargs,
            context={"transform": f"{fn.__module__}.{fn.__qualname__}"},
        )

    def judge_equivalence(
        self, name: str, rows: list[dict], responses: dict[str, str], uses: list[str] | None = None
    ) -> dict[str, str]:
        """A resumable judging phase: {row id: yes/no/unknown}. ``uses``: the files rows and responses came from
        (W&B lineage). The judge pool is placed only when some rows are left to judge and need an LLM judge."""
        failed: list[dict] = []
        # The judged item is the row *and* the answer: an answer that changed (another model) is another input.
        if is_pending(responses):  # a dry run, the answers from a phase that runs: the verdicts run too
            return self.run.row_phase(name, responses, lambda todo: iter(()), context={"judge": self.judge_key(rows)})
        items = [{"id": r["id"], "row": r, "response": responses[r["id"]]} for r in rows if r["id"] in responses]

        def process(todo: list[dict]):
            self.pools.judge_pool_for([t["row"] for t in todo])
            verdicts = self.judge.equivalent(todo, failed=failed)
            yield [{"id": k, "verdict": v, "judge": self.config.judge.kind} for k, v in verdicts.items()]

        out = self.run.row_phase(name, items, process, failed=failed, context={"judge": self.judge_key(rows)})
        if is_pending(out):
            return out
        judge_model = [self.pools.serving("judge")] if self.judge.needs_llm(rows) else []
        self.run.record_lineage(
            name, "judge", [*(uses or [self.source(rows)]), *judge_model], [self.run.phase_file(name)]
        )
        verdicts = {o["id"]: o["verdict"] for o in out}
        unknown = sum(v == "unknown" for v in verdicts.values())
        if unknown:
            log.warning("%s: %d verdicts could not be parsed (counted as unknown)", name, unknown)
        self.run.metric(f"{name}/unknown_verdicts", unknown)
        return verdicts

    def judge_key(self, rows: list[dict]) -> dict:
        """What a verdict depends on besides its item: the judge's kind and, for an LLM judge, its model's key."""
        llm = self.judge.needs_llm(rows)
        return {
            "kind": self.config.judge.kind,
            "model": self.run.model_key(self.pools.serving("judge")) if llm else None,
            "prompt": self.judge.equivalence_prompt if llm else None,
            "chat_templates": self.chat_templates if llm else None,
        }

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
        training = training or phase_training(self.config, TRAINING_PHASE[kind])
        streamed = isinstance(examples, Blocks)  # the ranks read the parts themselves: no copy in one file
        spec = {
            "name": name,
            "kind": kind,
            "init_model": init_model,
            "data": None,  # written when the phase runs (_fit)
            "phase_dir": self.run.phase_dir(f"{name}-train"),
            "output": self.run.model_dir(name),
            "training": training,
            "seed": self.config.run.seed,
            "trust_remote_code": self.config.model.trust_remote_code,
            # what the generator renders with; saved with the checkpoint when configured
            "chat_template": self.chat_templates["model.name"],
            **extra,
        }
        from training.service import native_precision

        settings = keyed_training_settings(training, native_precision(self.config))
        # The key names the starting model by its key (not its path: models/sft retrained on other data is another
        # model), the examples by content, and every plan-shaping setting: the world size sets the global batch and
        # the micro-batch plan a half-done phase's step count is mapped onto.
        key = {
            "examples": examples.fingerprint() if streamed else examples,
            "init_model": self.run.model_key(init_model),
            "kind": kind,
            "extra": extra,
            "training": settings,
            "world_size": self.config.pools.train.replicas,
            **self._ranks_key(),
            "seed": self.config.run.seed,
            "chat_template": spec["chat_template"],
        }
        scratch = Path(spec["phase_dir"])  # checkpoints + reference log-probs: they belong to this key
        result = self.run.once(name, lambda: self._fit(spec, examples), key=key, scratch=scratch)
        if is_pending(result):  # a dry run: the model this phase would train
            return result
        self.run.register_model(result["output"], self.run.key_of(name))
        # W&B lineage: the examples (made from ``uses``), then model in + examples -> model out.
        example_files = list(examples.folders) if streamed else [self.run.phase_file(f"{name}-data")]
        self.run.record_lineage(name, f"{kind}-data", uses or [], example_files, label=f"{name}-data")
        # an adapter phase writes the merged model and its adapter: both are artifacts naming the base model
        outputs = [result["output"], *([result["adapter"]] if result.get("adapter") else [])]
        self.run.record_lineage(name, "train", [init_model, *example_files], outputs)
        if "trainable_parameters" in result:  # (a phase finished before the count existed has none)
            self.run.metric(f"{name}/parameters", {k: result[f"{k}_parameters"] for k in ("trainable", "total")})
        self.run.metric(f"{name}/steps", result["steps"])  # optimizer steps (LLM2LLM's matched-steps control)
        self.run.metric(f"{name}/train_tokens_per_s", round(result["train_tokens_per_s"], 1))
        if "layout" in result:  # how the train pool ran it (training.layout; a phase from before it has none)
            layout = result["layout"]
            shown = ("name", "ranks", "threads", "grad_accum", "zero_stage")
            self.run.metric(f"{name}/layout", {k: layout[k] for k in shown if k in layout})
        # sequences whose prompt or response was cut to fit, and AFT proposals cut to share the prompt budget
        self.run.metric(f"{name}/truncation", result["truncation"])
        return result["output"]

    def _ranks_key(self) -> dict:
        """The ranks a phase runs on, in its key where they differ from the pool's (training.layout one_rank): the
        steps are the pool's, but the float sums run in another order. A folder trained as the pool resumes."""
        from training.service import train_layout

        layout = train_layout(self.config)
        key = {} if layout.ranks == self.config.pools.train.replicas else {"ranks": layout.ranks}
        # auto's one rank runs stage 0 (training/layout.py): another engine step than the configured ZeRO stage
        return key if layout.zero_stage is None else {**key, "layout_zero_stage": layout.zero_stage}

    def _fit(self, spec: dict, examples: list[dict] | Blocks) -> dict:
        """Run a training phase on the train pool, its examples written for the ranks first."""
        name, minimum = spec["name"], self.config.training.min_examples
        if len(examples) < minimum:
            from training.service import TrainingError

            raise TrainingError(
                f"phase {name}: {len(examples)} training examples, fewer than training.min_examples={minimum}; "
                "nothing to train on (see the failed rows of the phases before it)"
            )
        data = examples.files() if isinstance(examples, Blocks) else self.run.write_rows(f"{name}-data", examples)
        result = self.trainer.train({**spec, "data": data})
        layout = result.get("layout") or {}
        log.info(
            "trained %s: %d steps, %.0f tok/s, truncation %s, layout %s (%s)",
            name,
            result["steps"],
            result["train_tokens_per_s"],
            result["truncation"],
            layout.get("name", "pool"),
            layout.get("reason", "before training.layout"),
        )
        return result

    def record_rows(self, name: str, rows_in: int, rows_out: int, unit_in: str, unit_out: str) -> None:
        """``<name>/rows``: what a step turned its inputs into and how many inputs it dropped (SPIN prompts -> pairs,
        AFT queries -> aggregation examples)."""
        self.run.metric(f"{name}/rows", {unit_in: rows_in, unit_out: rows_out, "dropped": rows_in - rows_out})
        if rows_out < rows_in:
            log.warning("%s: %d of %d %s gave no %s", name, rows_in - rows_out, rows_in, unit_in, unit_out)

    # -- evaluation (jobs.evaluation) --------------------------------------------------------------------

    def evaluate(self, name: str, rows: list[dict], model_path: str) -> float:
        accuracy = evaluation.evaluate(self, name, rows, model_path)
        lm_eval_phase.after_evaluation(self, name, model_path)  # evaluation.lm_eval.checkpoints: every: now
        mt_bench_phase.after_evaluation(self, name, model_path)  # evaluation.mt_bench: answers, pairs
        return accuracy

    def evaluate_loglik(self, name: str, rows: list[dict], model_path: str) -> float:
        return evaluation.evaluate_loglik(self, name, rows, model_path)

    def compare(self, name: str, baseline: str, method: str) -> tuple[float, float, float, int]:
        """Paired difference of two greedy evaluations on the same rows (method − baseline, 95% interval)."""
        return evaluation.record_difference(self, name, baseline, method)

    def record_accuracy(self, name: str, verdicts: dict[str, str], n: int) -> tuple[float, tuple[float, float]]:
        return evaluation.record_accuracy(self.run, name, verdicts, n)

    def close(self, error: BaseException | None = None) -> dict:
        idle, extra = self.pools.wind_down()
        try:
            return self.run.close(idle, extra, error)
        finally:
            self.pools.shutdown()


def dry_run(algorithm: Callable[[Controller], None], config: JobConfig) -> int:
    """``--dry-run``: walk the job's phases over its run folder without running any (runfolder.dryrun); print each
    phase's verdict. 0, or 3 when the rerun would stop on a changed config."""
    try:
        controller = Controller(config, planned=True)
    except (ConfigError, DataError, RunFolderError) as err:
        print(f"{type(err).__name__.removesuffix('Error').lower()} error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, RunFolderError) else 3
    run = controller.run
    if run.stop_reason is not None:
        print(f"run folder error: {run.stop_reason}", file=sys.stderr)
        return 3
    stopped = None
    with contextlib.redirect_stdout(io.StringIO()):  # what the job prints of reused outputs is not the plan
        try:
            algorithm(controller)
        except NeedsOutput as need:
            stopped = need
    print(format_report(run, run.report(stopped), stopped))
    return 0


def main(method: str, algorithm: Callable[[Controller], None], argv: list[str] | None = None) -> dict:
    config = parse_job_args(method, argv, dry_run=lambda config: dry_run(algorithm, config))
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
        if method in POOLS_AT_START and (joins_cluster(config.cluster) if together is None else together):
            controller.start_pools(POOLS_AT_START[method])
        algorithm(controller)
    except BaseException as err:  # the summary says failed, with the error; the error still ends the job
        try:
            controller.close(error=err)
        except Exception as close_error:  # never let a failure while closing mask the error that ended the run
            log.error("closing after %s failed: %s", type(err).__name__, close_error)
        lost = controller.run.lease.lost
        if lost is not None and isinstance(err, (LeaseLostError, KeyboardInterrupt)):
            print(f"run folder error: {lost}", file=sys.stderr)
            raise SystemExit(3) from None
        raise
    summary = controller.close()
    Path(config.run_dir / "DONE").write_text("ok\n")
    return summary
