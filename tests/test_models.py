"""Models by hub id or path, resolved on the driver before anything starts; the user's HF env reaches workers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
import ray

from cluster.models import resolve_model, resolve_models
from configs.schema import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
REVISION = conftest.HUB_REVISION


@pytest.fixture
def hub_cache(tmp_path, tiny_model) -> Path:
    return conftest.hub_cache(tiny_model, tmp_path / "hub")


def test_a_hub_id_resolves_offline_from_the_cache_to_its_snapshot(hub_cache):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # no network here: the id must come from the cache
    snapshot = str((hub_cache / "models--acme--tiny-chat" / "snapshots" / REVISION).resolve())
    assert resolve_model("acme/tiny-chat", str(hub_cache)) == snapshot
    assert resolve_model(f"acme/tiny-chat@{REVISION}", str(hub_cache)) == snapshot
    with pytest.raises(
        FileNotFoundError, match=r"judge.model: could not get 'acme/other'.*offline \(HF_HUB_OFFLINE=1\)"
    ):
        resolve_model("acme/other", str(hub_cache), key="judge.model")
    with pytest.raises(FileNotFoundError, match="model.name: .* is a local path without config.json"):
        resolve_model(str(hub_cache), str(hub_cache))
    with pytest.raises(FileNotFoundError, match="neither a known model"):
        resolve_model("/no/such/model", str(hub_cache))


# In a fresh process, as a user's shell starts a job: huggingface_hub reads HF_HUB_CACHE / HF_HOME when imported.
RESOLVE_IN_A_FRESH_PROCESS = """
import json, sys
from configs.schema import ConfigError, load_config
from cluster.models import resolve_models
config = load_config(sys.argv[1], sys.argv[2:])
try:
    print(json.dumps({"paths": resolve_models(config), "cache_dir": config.model.cache_dir}))
except ConfigError as err:
    print(json.dumps({"error": str(err)}))
"""


def resolve_in_a_fresh_process(hf_env: dict[str, str], *overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HUB_OFFLINE": "1", **hf_env}
    done = subprocess.run(
        [sys.executable, "-c", RESOLVE_IN_A_FRESH_PROCESS, str(ROOT / "configs/spin-tiny.yaml"), *overrides],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_with_model_cache_dir_unset_a_hub_id_resolves_where_hugging_face_keeps_its_cache(tmp_path, tiny_model):
    """`hf download acme/tiny-chat` then HF_HUB_OFFLINE=1: the id is found in the cache HF_HUB_CACHE alone names
    (then HF_HOME/hub), as transformers finds it; model.cache_dir, when set, is the cache instead."""
    hub = conftest.hub_cache(tiny_model, tmp_path / "named-by-hf-hub-cache")
    snapshot = str((hub / "models--acme--tiny-chat" / "snapshots" / REVISION).resolve())
    found = resolve_in_a_fresh_process({"HF_HUB_CACHE": str(hub)}, "model.name=acme/tiny-chat")
    assert found["cache_dir"] is None  # the default: nothing but Hugging Face's variable points at the cache
    assert found["paths"]["model.name"] == snapshot
    assert found["paths"]["judge.model"] == snapshot  # judge.model unset: the base model
    # The built-in models are no hub repos: still built in (and read from) the checkout's .cache/models.
    built = resolve_in_a_fresh_process({"HF_HUB_CACHE": str(hub)}, "judge.model=tiny-random")
    assert built["paths"]["judge.model"] == str(ROOT / ".cache/models/tiny-random") == tiny_model

    home = tmp_path / "hf-home"
    conftest.hub_cache(tiny_model, home / "hub")
    by_home = resolve_in_a_fresh_process({"HF_HOME": str(home)}, "model.name=acme/tiny-chat")
    assert by_home["paths"]["model.name"] == str((home / "hub/models--acme--tiny-chat/snapshots" / REVISION).resolve())

    missing = resolve_in_a_fresh_process({"HF_HUB_CACHE": str(tmp_path / "empty")}, "model.name=acme/tiny-chat")
    assert "model.name: could not get 'acme/tiny-chat'" in missing["error"]
    assert f"it must already be in {tmp_path / 'empty'}/models--acme--tiny-chat (HF_HUB_CACHE" in missing["error"]
    # An explicit model.cache_dir overrides Hugging Face's cache (the id is not in it, so it is not found).
    overridden = resolve_in_a_fresh_process(
        {"HF_HUB_CACHE": str(hub)}, "model.name=acme/tiny-chat", f"model.cache_dir={tmp_path / 'empty'}"
    )
    assert "(model.cache_dir)" in overridden["error"]


def test_every_configured_model_is_resolved_and_a_missing_one_names_its_key(hub_cache, tiny_model):
    config = load_config(
        ROOT / "configs/spin-tiny.yaml",
        [f"model.cache_dir={hub_cache}", "model.name=acme/tiny-chat", f"judge.model={tiny_model}"],
    )
    paths = resolve_models(config)
    assert paths["model.name"] == paths["teacher.model"]  # teacher.model unset: the base model
    assert paths["model.name"].endswith(REVISION) and paths["judge.model"] == str(Path(tiny_model).resolve())
    config.teacher.model = "acme/missing"
    with pytest.raises(ConfigError, match="teacher.model: could not get 'acme/missing'"):
        resolve_models(config)


def run_spin(tmp_path: Path, *overrides: str) -> dict:
    from jobs.controller import main
    from jobs.spin import spin

    return main("spin", spin, ["--config", str(ROOT / "configs/spin-tiny.yaml"), f"run.dir={tmp_path}", *overrides])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.name=acme/not-in-cache", "config error: model.name: could not get 'acme/not-in-cache'"),
        (
            "judge.prompts_dir=/no/such/prompts",
            "config error: judge.prompts_dir: folder /no/such/prompts does not exist",
        ),
        ("data.train=/no/such/data.jsonl", "data error: data.train: '/no/such/data.jsonl' is neither a built-in"),
    ],
)
def test_a_missing_input_stops_with_exit_2_before_ray_or_the_run_folder(tmp_path, capsys, override, message):
    ray_was_up = ray.is_initialized()
    with pytest.raises(SystemExit) as exit_info:
        run_spin(tmp_path, override)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "spin").exists()  # no run folder was made
    assert ray.is_initialized() == ray_was_up  # and Ray was not started for it


def test_an_adapter_target_the_model_lacks_stops_with_exit_2_naming_the_key_and_the_models_layers(tmp_path, capsys):
    # training.peft on for every phase, SPIN's iterations naming a module the tiny Llama does not have (a fused
    # projection of another architecture): found on the meta-device model before Ray or the run folder.
    ray_was_up = ray.is_initialized()
    with pytest.raises(SystemExit) as exit_info:
        run_spin(tmp_path, "training.peft.enabled=true", "training.preference.peft.target_modules=[q_proj,qkv_proj]")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "config error: training.preference.peft.target_modules: the model " in err and "no module 'qkv_proj'" in err
    layers = "down_proj, embed_tokens, gate_proj, input_layernorm, k_proj, lm_head, norm, o_proj, "
    assert f"its layer names: {layers}post_attention_layernorm, q_proj, up_proj, v_proj (or 'all-linear')" in err
    assert not (tmp_path / "spin").exists() and ray.is_initialized() == ray_was_up


@ray.remote
class EnvProbe:
    def hf_env(self) -> dict:
        return {k: v for k, v in os.environ.items() if k.startswith("HF_")}


def test_hf_settings_reach_workers_only_as_the_user_set_them(ray_session, monkeypatch):
    from cluster.connect import worker_env
    from cluster.pools import actor_options
    from configs.schema import PoolConfig

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"} & set(worker_env())  # not forced
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.invalid")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_stays_on_the_driver")

    actor = EnvProbe.options(**actor_options(PoolConfig(num_cpus=0.1))).remote()  # as a pool places its actors
    seen = ray.get(actor.hf_env.remote(), timeout=120)
    ray.kill(actor)
    assert seen["HF_ENDPOINT"] == "http://hub.example.invalid" and seen["HF_HUB_OFFLINE"] == "1"
    assert "HF_TOKEN" not in seen


def test_the_submitted_spin_job_runs_from_a_model_given_by_hub_id(spin_job):
    # conftest.spin_job: model.name is acme/tiny-chat, found in a hub cache on every node of the cluster
    run = spin_job
    snapshot = str((run.parent.parent / "hub" / "models--acme--tiny-chat" / "snapshots" / REVISION).resolve())
    log = (run / "driver.log").read_text()
    assert f"model.name: {snapshot}" in log
    assert f"'model': '{snapshot}'" in log  # the generator engine loaded the snapshot
    assert (run / "models/iter1/spin/config.json").exists()  # test_wandb's lineage: training started from it too
