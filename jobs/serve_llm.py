"""Serving on ``ray.serve.llm`` (``serve.backend: ray_serve_llm``, the GPU profiles' choice).

``build_openai_app`` makes the application: ray.serve.llm's ``LLMServer`` deployment (upstream vLLM, its
tensor-parallel workers in a Ray placement group) behind an OpenAI ingress that streams (SSE) and lists
``/v1/models``. The ingress class is ours, ``AggregatingIngress``: ray.serve.llm's ``OpenAiIngress`` plus what
jobs.serve's own server (``serve.backend: chat_server``) offers, so a client sees one API on both backends:

- the API key (``serve.api_key_env``; the ingress gets its SHA-256 only) on every route, 401 otherwise;
- the ``serve`` caps on ``n`` and ``max_tokens``, and ``serve.default_max_tokens`` when a request sets none;
- AFT propose-and-aggregate (``"aggregate": {"n_proposals": 5, "layers": 2}``, checked by the same
  ``parse_request``), run by the pure ``methods.aft.propose_and_aggregate`` through the LLM server's deployment
  handle: the ingress composes that handle, as OpenAiIngress does for plain requests.

Everything else comes from the config: the model folder is ``model_source``, engine settings are
``engine_kwargs``, and ``pools.generator`` gives the replicas and what each engine worker needs (its CPUs, GPUs
and custom resources split over the tensor-parallel workers; ray.serve.llm infers GPU or CPU placement from
them). Nothing here branches on the hardware.

    python -m jobs.serve --config configs/gpu-1node-8xh100.yaml --model runs/aft/h100x8/models/aft
    # KubeRay: cluster/kuberay/rayservice.yaml imports jobs.serve_llm:app_builder with the same arguments
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
import uuid
from dataclasses import asdict

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS  # the routes build_openai_app makes
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest

from actors.engine import Sampling
from actors.judge import load_prompt
from cluster.config import JobConfig, ServeConfig
from cluster.pools import replica_resources
from jobs.serve import (
    UNAUTHORIZED,
    BadRequest,
    aggregate,
    authorized,
    error,
    key_digest,
    parse_request,
    serving_model,
    sse_chunk,
)

log = logging.getLogger(__name__)


def llm_config(model_path: str, config: JobConfig, env: dict[str, str] | None = None):
    """ray.serve.llm's LLMConfig for serving ``model_path`` with ``config``'s engine, pools.generator and serve
    sections; ``env``: extra environment of the replicas and engine workers."""
    from ray.serve.llm import LLMConfig

    pool, engine, serving = config.pools.generator, config.engine, config.serve
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
        },
        accelerator_type=serving.accelerator_type,
        placement_group_config={"bundle_per_worker": {k: v / tp for k, v in replica_resources(pool).items()}},
        deployment_config=deployment,
        runtime_env={"env_vars": env_vars},
    )


def build_app(model_path: str, config: JobConfig, api_key: str | None = None, env: dict[str, str] | None = None):
    """build_openai_app over ``llm_config``, with AggregatingIngress as the ingress."""
    from ray.serve.llm import build_openai_app

    return build_openai_app(
        {
            "llm_configs": [llm_config(model_path, config, env)],
            "ingress_cls_config": {
                "ingress_cls": AggregatingIngress,
                "ingress_extra_kwargs": {
                    "limits": asdict(config.serve),
                    "api_key_sha256": key_digest(api_key) if api_key else None,
                },
            },
        }
    )


def app_builder(args: dict):
    """Serve application builder (``import_path: jobs.serve_llm:app_builder``, e.g. a RayService's serveConfigV2).
    ``args``: {config: <yaml>, model: <model or run folder>, overrides: [dotted overrides]}. The API key is read
    from the environment variable ``serve.api_key_env`` where the application is built."""
    from cluster.config import load_config
    from cluster.connect import worker_env

    unknown = set(args) - {"config", "model", "overrides"}
    if unknown:
        raise ValueError(f"app_builder: unknown args {sorted(unknown)} (valid: config, model, overrides)")
    config = load_config(args.get("config"), list(args.get("overrides", [])))
    model = args.get("model") or config.model.name
    api_key = os.environ.get(config.serve.api_key_env) or None
    if api_key is None:
        log.warning("no API key (%s is not set): anyone who reaches the endpoint may use it", config.serve.api_key_env)
    # A joined cluster: the application's working_dir brings the code; nothing points into this node's paths.
    return build_app(serving_model(model, config.model.cache_dir), config, api_key, worker_env(joined=True))


def _guarded(endpoint):
    """An OpenAiIngress route that answers 401 without the API key. FastAPI reads the route's parameters from its
    signature: a ``request: Request`` is added where the route has none."""
    signature = inspect.signature(endpoint)
    has_request = "request" in signature.parameters

    @functools.wraps(endpoint)
    async def route(self, *args, **kwargs):
        request = kwargs["request"] if has_request else kwargs.pop("request")
        if not authorized(request, self.api_key_sha256):
            return error(401, UNAUTHORIZED)
        return await endpoint(self, *args, **kwargs)

    if not has_request:
        extra = inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        route.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])
    return route


class AggregatingIngress(OpenAiIngress):
    """ray.serve.llm's OpenAI ingress with the API key, the caps and propose-and-aggregate of jobs.serve."""

    def __init__(self, llm_deployments, model_cards, *, limits: dict, api_key_sha256: str | None = None, **kwargs):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self.limits = ServeConfig(**limits)
        self.api_key_sha256 = api_key_sha256
        self.template = load_prompt("actors/prompts", "aggregate_system")

    async def chat(self, body: ChatCompletionRequest, request: Request):
        try:
            if (body.model_extra or {}).get("aggregate") not in (None, False):
                return await self._aggregate(body, await request.body())
            n, max_tokens = body.n or 1, body.max_completion_tokens or body.max_tokens
            if n > self.limits.max_n:
                raise BadRequest(f"'n' must be in [1, {self.limits.max_n}], got {n}")
            if max_tokens is not None and max_tokens > self.limits.max_tokens:
                raise BadRequest(f"'max_tokens' must be in [1, {self.limits.max_tokens}], got {max_tokens}")
            if max_tokens is None:
                body.max_tokens = self.limits.default_max_tokens
        except BadRequest as err:
            return error(err.status, str(err))
        return await super().chat(body, request)

    async def _aggregate(self, body: ChatCompletionRequest, raw: bytes):
        parsed = parse_request(raw, self.limits)  # the chat_server's checks and 400s
        model_id = await self._get_model_id(body.model)
        handle = self._get_configured_serve_handle(model_id)  # the LLM server's deployment handle, streaming
        usage = {"prompt_tokens": 0, "completion_tokens": 0}

        async def sample(messages: list[dict], sampling: Sampling, what: str) -> list[str]:
            request = ChatCompletionRequest(
                model=model_id,
                messages=messages,
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=sampling.seed,
                stop=sampling.stop or None,
                stream=False,
            )
            response = await handle.chat.remote(request, None).__anext__()  # not streamed: one response
            failure = getattr(response, "error", None)  # an ErrorResponse (the engine refused the request)
            if failure is not None:
                raise BadRequest(f"{what}: {failure.message}", failure.code)
            usage["prompt_tokens"] += response.usage.prompt_tokens
            usage["completion_tokens"] += response.usage.completion_tokens or 0
            return [choice.message.content or "" for choice in response.choices]

        result = await aggregate(parsed, self.template, sample)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        if parsed.stream:  # the final answer as one chunk, as chat_server streams an aggregation

            def events():
                yield sse_chunk(completion_id, created, model_id, 0, {"role": "assistant", "content": ""})
                yield sse_chunk(completion_id, created, model_id, 0, {"content": result["answer"]})
                yield sse_chunk(completion_id, created, model_id, 0, {}, "stop")
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        message = {"role": "assistant", "content": result["answer"]}
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model_id,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
                "aggregation": {"layers": result["layers"]},
            }
        )


for _name in DEFAULT_ENDPOINTS:  # every route build_openai_app exposes asks for the key
    setattr(AggregatingIngress, _name, _guarded(getattr(AggregatingIngress, _name)))
del _name
