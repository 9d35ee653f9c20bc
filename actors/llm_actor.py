"""LLM roles as Ray actors, and a driver-side pool that spreads work across a role's replicas.

Design note: ``LLMActor`` is thin: it owns one engine (actors/engine.py), renders chat prompts in the
model's chat format (actors/chat.py: a configured template, the model's own, or the plain format), stops
generation where the format ends a turn, and times its own busy seconds. ``EnginePool`` is the driver's view of one pool
(generator, judge or teacher): it sends batches of rows to free replicas, yields results batch by batch
as they finish (so judging can start before generation ends), retries a batch once when its replica died
or ran past ``engine.batch_timeout_s`` (a hung replica is killed; Ray restarts the actor, max_restarts from
config; we reload the current weights into it), and reports rows whose batch failed twice, with the reason,
instead of failing the whole call. A replica whose restarts are used up leaves the rotation; with none left
the call raises ``PoolExhaustedError``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError
from tqdm import tqdm

from actors.chat import use_chat_template
from actors.engine import Sampling, build_engine, render_prompt, response_ids, row_seeds, with_format_stops
from cluster.pools import (
    PoolPlacementError,
    actor_options,
    check_pool_fits,
    missing_resources,
    node_labels,
    wait_ready,
)
from cluster.storage import check_storage
from configs.schema import EngineConfig, PoolConfig

log = logging.getLogger(__name__)


def count_cores(bind: str) -> int:
    """Cores in a VLLM_CPU_OMP_THREADS_BIND list such as '0-1', '0,2' or '0-3|4-7' (one TP rank's share)."""
    first_rank = bind.split("|")[0]
    total = 0
    for part in first_rank.split(","):
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1
    return total


def replica_binding(pool: PoolConfig, replica: int) -> dict[str, str]:
    """CPU thread binding of one replica. ``VLLM_CPU_OMP_THREADS_BIND: "0;1"`` gives replica 0 core 0 and
    replica 1 core 1 (one engine per core beats two engines sharing both). OMP_NUM_THREADS follows the
    binding: Ray sets it from num_cpus (often 1), and one thread on two bound cores measured ~6x slower."""
    bind = pool.env.get("VLLM_CPU_OMP_THREADS_BIND")
    if not bind:
        return {}
    per_replica = bind.split(";")
    mine = per_replica[replica % len(per_replica)]
    env = {"VLLM_CPU_OMP_THREADS_BIND": mine}
    if "OMP_NUM_THREADS" not in pool.env:
        env["OMP_NUM_THREADS"] = str(count_cores(mine))
    return env


class LLMActor:
    """One engine replica. Rows in: ``{"id", "messages"}``; dicts with text, token ids and log-probs out."""

    def __init__(
        self,
        role: str,
        model_path: str,
        engine: dict,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        trust_remote_code: bool = False,
        shared_paths: dict[str, list[str]] | None = None,
        chat_template: str | None = None,
    ):
        self.role = role
        self.node_id = ray.get_runtime_context().get_node_id()
        # From this replica's own node, before the engine build: a node without the shared volume fails here,
        # naming itself and the mount, not minutes later inside the engine or at the first weight reload.
        check_storage(f"pool {role}", self.node_id, **(shared_paths or {}))
        options = dict(engine)
        backend = options.pop("backend")
        for driver_side in ("batch_size", "batch_timeout_s"):  # how the pool feeds the engine, not engine options
            options.pop(driver_side, None)
        if backend == "hf":
            options = {"dtype": options["dtype"]}
        else:
            options.update(tensor_parallel_size=tensor_parallel_size, seed=seed)
        start = time.perf_counter()
        self.engine = build_engine(backend, model_path, trust_remote_code=trust_remote_code, **options)
        self.build_s = time.perf_counter() - start
        self.tokenizer = self.engine.tokenizer
        self.chat = use_chat_template(self.tokenizer, chat_template)  # checked on the driver before Ray started
        self.busy_s = 0.0

    def ready(self) -> dict:
        import os

        return {
            "role": self.role,
            "pid": os.getpid(),
            "node_id": self.node_id,
            "build_s": self.build_s,
            "model": self.engine.model_path,
        }

    def generate(self, rows: list[dict], sampling: dict) -> list[dict]:
        start = time.perf_counter()
        prompts = [render_prompt(self.tokenizer, row["messages"]) for row in rows]
        # One over-long prompt would fail the engine call for the whole batch: report it alone instead.
        limit = getattr(self.engine, "max_model_len", None)
        too_long = {i for i, p in enumerate(prompts) if limit and len(p) >= limit}
        results = [
            {"id": rows[i]["id"], "error": f"prompt of {len(prompts[i])} tokens >= engine.max_model_len {limit}"}
            for i in sorted(too_long)
        ]
        kept = [i for i in range(len(rows)) if i not in too_long]
        # Seeds follow the row, not its place in a batch: a resumed phase samples what the first run would have.
        seed = sampling.get("seed")
        seeds = row_seeds(seed, [rows[i]["id"] for i in kept])
        params = with_format_stops(Sampling(**sampling), self.tokenizer)
        outputs = self.engine.generate([prompts[i] for i in kept], params, seeds) if kept else []
        for row, prompt, completions in zip([rows[i] for i in kept], [prompts[i] for i in kept], outputs):
            results.append(
                {
                    "id": row["id"],
                    "prompt_tokens": len(prompt),
                    "samples": [
                        {
                            "text": self.chat.clean(c.text),
                            "token_ids": c.token_ids,
                            "logprobs": c.logprobs,
                            "finish_reason": c.finish_reason,
                            "truncated": c.truncated,
                        }
                        for c in completions
                    ],
                }
            )
        self.busy_s += time.perf_counter() - start
        return results

    def score(self, rows: list[dict], sampling: dict | None = None) -> list[dict]:
        """Per-token log-probs of ``row["response"]`` given ``row["messages"]``; over-long rows reported alone."""
        start = time.perf_counter()
        prompts = [render_prompt(self.tokenizer, row["messages"]) for row in rows]
        responses = [response_ids(self.tokenizer, row["response"]) for row in rows]
        limit = getattr(self.engine, "max_model_len", None)
        kept = [i for i in range(len(rows)) if not limit or len(prompts[i]) + len(responses[i]) <= limit]
        scores = dict(zip(kept, self.engine.score([prompts[i] for i in kept], [responses[i] for i in kept])))
        self.busy_s += time.perf_counter() - start
        return [
            {"id": row["id"], "logprobs": scores[i]}
            if i in scores
            else {"id": row["id"], "error": f"prompt + response > engine.max_model_len {limit}"}
            for i, row in enumerate(rows)
        ]

    def load_weights(self, path: str) -> float:
        return self.engine.load_weights(path)

    def call(self, fn, *args):
        """``fn(engine, *args)`` here, on the weights this replica holds (lm-eval's harness: actors.lm_eval_runner)."""
        start = time.perf_counter()
        try:
            return fn(self.engine, *args)
        finally:
            self.busy_s += time.perf_counter() - start

    def stats(self) -> dict:
        return {"busy_s": self.busy_s}


class PoolExhaustedError(RuntimeError):
    """Every replica of a pool is gone (restarts used up): no batch can run."""


@dataclass
class PoolStats:
    started: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0
    output_tokens: int = 0
    generate_s: float = 0.0
    failed_rows: list[str] = field(default_factory=list)
    retried_batches: int = 0
    weight_loads: list[float] = field(default_factory=list)

    def idle_s(self, replicas: int) -> float:
        return max(0.0, (time.monotonic() - self.started) * replicas - self.busy_s)


class EnginePool:
    """The driver's handle on one role's replicas."""

    def __init__(
        self,
        role: str,
        model_path: str,
        pool: PoolConfig,
        engine: EngineConfig,
        timeout_s: float,
        seed: int = 0,
        trust_remote_code: bool = False,
        shared_paths: dict[str, list[str]] | None = None,
        recovery_timeout_s: float | None = None,
        chat_template: str | None = None,
    ):
        """``shared_paths``: {"read": [...], "write": [...]} each replica checks from its node before it starts.
        ``chat_template``: the configured template its replicas render with (None: the model's own, or plain)."""
        check_pool_fits(role, pool)
        self.role, self.pool, self.batch_size = role, pool, engine.batch_size
        self.batch_timeout_s = engine.batch_timeout_s
        self.recovery_timeout_s = recovery_timeout_s or timeout_s
        self.model_path = model_path
        env: dict[str, str] = {}
        if engine.backend == "vllm" and pool.num_gpus == 0:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(engine.kv_cache_gib)))

        remote = ray.remote(LLMActor)
        engine_dict = {k: getattr(engine, k) for k in engine.__dataclass_fields__}
        self.actors = [
            remote.options(**actor_options(pool, extra_env={**env, **replica_binding(pool, i)})).remote(
                role,
                model_path,
                engine_dict,
                pool.tensor_parallel_size,
                seed + i,
                trust_remote_code,
                shared_paths,
                chat_template,
            )
            for i in range(pool.replicas)
        ]
        self.info = wait_ready(role, [a.ready.remote() for a in self.actors], timeout_s, pool)
        self.moves: dict[int, list[str]] = {}  # replica -> nodes it ran on before a restart moved it
        self.stats = PoolStats()
        self.alive = list(range(len(self.actors)))  # replicas in rotation
        self.gone: dict[int, str] = {}  # replicas out of it, with why

    # -- work ------------------------------------------------------------------------------------------

    def _batches(self, rows: list[dict]) -> list[list[dict]]:
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def map(
        self,
        method: str,
        rows: list[dict],
        args: dict | None = None,
        desc: str | None = None,
        progress: bool = True,
        failed: list[dict] | None = None,
    ) -> Iterator[list[dict]]:
        """Run ``actor.<method>(batch, args)`` over all rows; yield each finished batch's results.

        One batch in flight per replica keeps every replica busy without queueing work on a replica
        that might die. A batch whose replica died or timed out is retried once (on whichever replica is
        free); a row that cannot be produced (batch failed twice, over-long prompt) is appended to ``failed``
        as ``{"id", "reason"}`` (and to ``stats.failed_rows``) and skipped.
        """
        failed = failed if failed is not None else []
        pending = deque((batch, 0) for batch in self._batches(rows))
        in_flight: dict[Any, tuple[int, list[dict], int, float]] = {}
        free = list(self.alive)
        bar = tqdm(total=len(rows), desc=desc or f"{self.role}.{method}", disable=not progress, leave=False)
        start = time.perf_counter()
        tokens = 0
        try:
            while pending or in_flight:
                if not self.alive:
                    raise PoolExhaustedError(
                        f"pool {self.role}: no replica left; all {len(self.actors)} are gone after using up their "
                        f"restarts (pools.{self.role}.max_restarts={self.pool.max_restarts}): "
                        + "; ".join(f"replica {i}: {why}" for i, why in self.gone.items())
                    )
                while pending and free:
                    replica = free.pop(0)
                    batch, attempt = pending.popleft()
                    ref = getattr(self.actors[replica], method).remote(batch, args)
                    in_flight[ref] = (replica, batch, attempt, time.perf_counter())
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=self._wait_s(in_flight))
                if not done:  # some batch ran past engine.batch_timeout_s: its replica is hung
                    now = time.perf_counter()
                    for ref, (replica, batch, attempt, sent) in list(in_flight.items()):
                        if now - sent >= self.batch_timeout_s:
                            del in_flight[ref]
                            reason = f"batch timed out after {now - sent:.0f} s (engine.batch_timeout_s)"
                            log.warning("%s replica %d: %s; killing it so Ray restarts it", self.role, replica, reason)
                            ray.kill(self.actors[replica], no_restart=False)
                            self._batch_failed(replica, batch, attempt, reason, pending, free, failed)
                    continue
                ref = done[0]
                replica, batch, attempt, sent = in_flight.pop(ref)
                try:
                    results = ray.get(ref)
                except (RayActorError, RayTaskError) as err:
                    reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                    self._batch_failed(replica, batch, attempt, reason, pending, free, failed)
                    continue
                free.append(replica)
                self.stats.busy_s += time.perf_counter() - sent
                rejected = [r for r in results if "error" in r]
                if rejected:
                    self.stats.failed_rows.extend(r["id"] for r in rejected)
                    failed.extend({"id": r["id"], "reason": r["error"]} for r in rejected)
                    log.warning("%s: %d rows reported and skipped: %s", self.role, len(rejected), rejected[:3])
                    results = [r for r in results if "error" not in r]
                new_tokens = sum(len(s["token_ids"]) for r in results for s in r.get("samples", []))
                tokens += new_tokens
                self.stats.output_tokens += new_tokens
                bar.update(len(batch))
                elapsed = time.perf_counter() - start
                if tokens:
                    bar.set_postfix(tok_s=f"{tokens / elapsed:.0f}")
                yield results
        finally:
            bar.close()
            self.stats.generate_s += time.perf_counter() - start

    def _wait_s(self, in_flight: dict) -> float | None:
        """How long ray.wait may block before the oldest in-flight batch expires (None: no batch timeout)."""
        if not self.batch_timeout_s:
            return None
        oldest = min(sent for _, _, _, sent in in_flight.values())
        return max(0.0, self.batch_timeout_s - (time.perf_counter() - oldest))

    def _batch_failed(
        self, replica: int, batch: list[dict], attempt: int, reason: str, pending: deque, free: list, failed: list
    ) -> None:
        """A replica failed a batch: bring it back (or retire it), then retry the batch once or report its rows."""
        if self._recover(replica):
            free.append(replica)
        else:
            self.alive.remove(replica)
            self.gone[replica] = reason
            log.error("%s replica %d leaves the pool (%d left): %s", self.role, replica, len(self.alive), reason)
        if attempt == 0:
            self.stats.retried_batches += 1
            log.warning("%s replica %d failed a batch (%s); retrying it once", self.role, replica, reason)
            pending.appendleft((batch, 1))
        else:
            ids = [row["id"] for row in batch]
            self.stats.failed_rows.extend(ids)
            failed.extend({"id": i, "reason": f"batch failed twice, last: {reason}"} for i in ids)
            log.error("%s: batch failed twice, rows %s reported and skipped: %s", self.role, ids, reason)

    def generate(
        self, rows: list[dict], sampling: Sampling, desc: str | None = None, failed: list[dict] | None = None
    ) -> Iterator[list[dict]]:
        yield from self.map("generate", rows, sampling.as_dict(), desc, failed=failed)

    def generate_all(
        self, rows: list[dict], sampling: Sampling, desc: str | None = None, failed: list[dict] | None = None
    ) -> dict[str, dict]:
        return {r["id"]: r for batch in self.generate(rows, sampling, desc, failed) for r in batch}

    def score_all(self, rows: list[dict]) -> dict[str, list[float]]:
        return {r["id"]: r["logprobs"] for batch in self.map("score", rows, None, progress=False) for r in batch}

    def _recover(self, replica: int, timeout_s: float | None = None) -> bool:
        """After a failure: wait for Ray's restart (the engine rebuilds, on another node with the pool's labels
        when its node was lost), then put the current weights back. False when the replica is gone for good
        (restarts used up, or not back within ``timeout_s``, default cluster.recovery_timeout_s). Raises
        ``PoolPlacementError`` naming the pool when it is not back because no alive node can host the pool
        (its node lost, no spare with its labels): the job stops, and a rerun resumes once a node is back."""
        timeout_s = self.recovery_timeout_s if timeout_s is None else timeout_s
        actor = self.actors[replica]
        deadline = time.monotonic() + timeout_s
        ref = actor.ready.remote()
        while True:
            try:
                info = ray.get(ref, timeout=5.0)
                break
            except GetTimeoutError:  # pending: being rebuilt, or waiting for a node that can host it
                pass
            except ActorUnavailableError:  # restarting: the new process is still building its engine
                time.sleep(1.0)
                ref = actor.ready.remote()
            except Exception as err:  # restarts exhausted (ActorDiedError) or it cannot even answer
                log.error("%s replica %d did not come back: %s", self.role, replica, err)
                ray.kill(actor, no_restart=True)
                return False
            if time.monotonic() > deadline:
                ray.kill(actor, no_restart=True)
                lacking = missing_resources(self.pool)
                if lacking:
                    raise PoolPlacementError(
                        f"pool '{self.role}': replica {replica} was lost with its node and no alive node can host "
                        f"it ({'; '.join(f'{k}: {v}' for k, v in lacking.items())}) within {timeout_s:g} s "
                        "(cluster.recovery_timeout_s); start a node that can, then rerun the same command to resume"
                    )
                log.error("%s replica %d did not come back within %.0f s", self.role, replica, timeout_s)
                return False
        if info.get("node_id") != self.info[replica].get("node_id"):
            log.warning(
                "%s replica %d restarted on node %s (was %s)",
                self.role,
                replica,
                info.get("node_id"),
                self.info[replica].get("node_id"),
            )
            self.moves.setdefault(replica, []).append(self.info[replica].get("node_id"))
        self.info[replica] = info
        try:
            if info["model"] != self.model_path:
                ray.get(actor.load_weights.remote(self.model_path))
        except RayActorError as err:
            log.error("%s replica %d died reloading %s: %s", self.role, replica, self.model_path, err)
            return self._recover(replica, timeout_s)
        return True

    # -- lifecycle -------------------------------------------------------------------------------------

    def placement(self) -> list[dict]:
        """Where each replica runs: its node and that node's labels (and the nodes a restart moved it from)."""
        labels = node_labels()
        return [
            {
                "node_id": info.get("node_id"),
                "labels": labels.get(info.get("node_id"), {}),
                **({"previous_node_ids": self.moves[i]} if i in self.moves else {}),
            }
            for i, info in enumerate(self.info)
        ]

    def load_weights(self, path: str) -> float:
        """Load a new checkpoint into every replica in place; returns the slowest replica's seconds."""
        self.model_path = path
        refs = {replica: self.actors[replica].load_weights.remote(path) for replica in self.alive}
        seconds = 0.0
        for replica, ref in refs.items():
            try:
                seconds = max(seconds, ray.get(ref))
            except RayActorError as err:  # died while loading: wait for its restart, which then loads `path`
                if not self._recover(replica):
                    self.alive.remove(replica)
                    self.gone[replica] = f"died loading {path}: {type(err).__name__}"
        self.stats.weight_loads.append(seconds)
        return seconds

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
