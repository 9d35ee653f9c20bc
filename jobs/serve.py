"""Serve a trained checkpoint with Ray Serve behind an OpenAI-compatible ``/v1/chat/completions``.

Besides the usual fields (messages, max_tokens, temperature, top_p, n, seed, stop) a request may ask for
AFT propose-and-aggregate with ``"aggregate": {"n_proposals": 5, "layers": 2}``: the answer is the final
aggregation, and the intermediate drafts come back under ``aggregation.layers``.

    python -m jobs.serve --model runs/aft/main/models/aft --port 8000
    curl -s 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from fastapi import FastAPI, HTTPException
from ray import serve

from actors.engine import Sampling
from actors.judge import load_prompt
from actors.llm_actor import LLMActor
from methods.aft import propose_and_aggregate

api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class ChatServer:
    def __init__(self, model_path: str, engine: dict, model_name: str = "selfimprove"):
        self.llm = LLMActor("serve", model_path, engine)  # the same engine wrapper the pools use, in-process
        self.model_name = model_name
        self.template = load_prompt("actors/prompts", "aggregate_system")
        self.lock = asyncio.Lock()  # one engine call at a time; the engine batches inside a call

    def _generate(self, requests: list[dict], sampling: Sampling) -> dict[str, dict]:
        return {r["id"]: r for r in self.llm.generate(requests, sampling.as_dict())}

    @api.post("/v1/chat/completions")
    async def chat(self, body: dict) -> dict:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPException(status_code=400, detail="'messages' must be a non-empty list")
        sampling = Sampling(
            temperature=float(body.get("temperature", 0.7)),
            top_p=float(body.get("top_p", 1.0)),
            max_tokens=int(body.get("max_tokens", 256)),
            n=int(body.get("n", 1)),
            seed=body.get("seed"),
            stop=body.get("stop") or [],
        )
        aggregate = body.get("aggregate")
        async with self.lock:
            if aggregate:
                result = await asyncio.to_thread(self._aggregate, messages, sampling, aggregate)
                choices = [
                    {"index": 0, "message": {"role": "assistant", "content": result["answer"]}, "finish_reason": "stop"}
                ]
                extra = {"aggregation": {"layers": result["layers"]}}
                prompt_tokens = completion_tokens = 0
            else:
                out = (await asyncio.to_thread(self._generate, [{"id": "0", "messages": messages}], sampling))["0"]
                choices = [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": s["text"]},
                        "finish_reason": s["finish_reason"],
                    }
                    for i, s in enumerate(out["samples"])
                ]
                extra = {}
                prompt_tokens = out["prompt_tokens"]
                completion_tokens = sum(len(s["token_ids"]) for s in out["samples"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            **extra,
        }

    def _aggregate(self, messages: list[dict], sampling: Sampling, options: dict) -> dict:
        def generate(requests: list[dict], n: int, temperature: float) -> dict[str, list[str]]:
            params = Sampling(
                temperature=temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                n=n,
                seed=sampling.seed,
                stop=sampling.stop,
            )
            return {k: [s["text"] for s in v["samples"]] for k, v in self._generate(requests, params).items()}

        rows = [{"id": "0", "messages": messages}]
        return propose_and_aggregate(
            rows,
            generate,
            self.template,
            int(options.get("n_proposals", 5)),
            int(options.get("layers", 2)),
            sampling.temperature,
            sampling.temperature,
        )["0"]


def build_app(model_path: str, engine: dict, num_cpus: float = 1.0, env: dict | None = None):
    options = {"num_cpus": num_cpus}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return ChatServer.options(ray_actor_options=options).bind(model_path, engine)


def main(argv: list[str] | None = None) -> None:
    from dataclasses import asdict

    from cluster.config import ClusterConfig, EngineConfig
    from cluster.connect import connect, worker_env
    from cluster.models import resolve_model

    parser = argparse.ArgumentParser(prog="python -m jobs.serve")
    parser.add_argument("--model", required=True, help="HF folder or model reference")
    parser.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    connect(ClusterConfig())
    serve.start(http_options={"host": args.host, "port": args.port})
    engine = asdict(EngineConfig(backend=args.backend))
    serve.run(build_app(resolve_model(args.model), engine, env=worker_env()), route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
