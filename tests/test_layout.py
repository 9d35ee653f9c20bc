"""The layout as a checked rule: imports point down the layers, no modules import each other in a circle, and
every package that imports Ray sets the process environment first. Pure Python (ast), no project module imported.

The layers, bottom to top, as the packages' design notes (their ``__init__.py``) state them. A module may import
from its own package and from packages of a lower layer; two packages of one layer are independent.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LAYERS = [
    ["configs"],  # the typed config and the shipped YAML files: imports nothing of the project
    ["cluster", "runfolder"],  # the Ray cluster; the run record
    ["data"],  # datasets -> rows (streaming writes into the run folder)
    ["methods"],  # pure method logic over rows
    ["actors"],  # the LLMs on Ray
    ["training"],  # Ray Train + DeepSpeed
    ["serving"],  # the Ray Serve app
    ["jobs"],  # the commands and the Controller
    ["bench"],  # benchmarks
]
LAYER = {package: i for i, packages in enumerate(LAYERS) for package in packages}
ENVIRONMENT = "cluster.environment"  # Ray reads RAY_DEDUP_LOGS_SKIP_REGEX when it is imported
RAY_LIKE = ("ray", "vllm", "deepspeed")


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path, packages) -> dict[str, Path]:
    return {module_name(root, p): p for package in packages for p in sorted((root / package).rglob("*.py"))}


def imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(project modules ``path`` imports, third-party top-level names it imports): every import statement,
    the lazy ones inside functions and the ``TYPE_CHECKING`` ones included. ``from pkg import name`` names the
    module ``pkg.name`` when there is one, else ``pkg``."""
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            ]
        else:
            continue
        for name in names:
            if name in modules:
                ours.add(name)
            elif name.split(".")[0] in {m.split(".")[0] for m in modules}:
                ours.add(max((m for m in modules if name.startswith(m + ".")), key=len, default=name))
            else:
                theirs.add(name.split(".")[0])
    return ours, theirs


def graph(root: Path, packages) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    return {name: imports(path, modules)[0] - {name} for name, path in modules.items()}


def upward_imports(edges: dict[str, set[str]], layer: dict[str, int]) -> list[str]:
    bad = []
    for module, targets in sorted(edges.items()):
        package = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other != package and layer[other] >= layer[package]:
                where = "a layer above it" if layer[other] > layer[package] else "its own layer"
                bad.append(f"{module} imports {target}: {other} is {where} ({package} is layer {layer[package]})")
    return bad


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def on_disk_packages(root: Path) -> set[str]:
    return {p.parent.name for p in root.glob("*/__init__.py") if p.parent.name != "tests"}


def test_every_package_has_a_layer_and_ships():
    packages = on_disk_packages(ROOT)
    assert packages == set(LAYER), (
        f"packages without a layer here: {packages - set(LAYER)}; gone: {set(LAYER) - packages}"
    )
    shipped = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert set(LAYER) <= shipped, f"not in pyproject.toml's packages: {set(LAYER) - shipped}"


def test_every_package_opens_with_a_design_note_naming_what_it_may_import():
    for package in LAYER:
        note = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
        assert "May import:" in note, f"{package}/__init__.py: no design note saying what it may import"


def test_imports_point_down_the_layers():
    assert upward_imports(graph(ROOT, LAYER), LAYER) == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(graph(ROOT, LAYER)) == []


def test_every_package_that_imports_ray_sets_the_environment_first():
    """Ray reads RAY_DEDUP_LOGS_SKIP_REGEX at import: a package whose modules import ray, vllm or deepspeed
    imports cluster.environment in its __init__ before anything else, so every entry point (python -m jobs.spin,
    a worker unpickling an actor) runs it first whatever its own import order."""
    modules = project_modules(ROOT, LAYER)
    for package in LAYER:
        uses_ray = any(imports(p, modules)[1] & set(RAY_LIKE) for m, p in modules.items() if m.split(".")[0] == package)
        if not uses_ray:
            continue
        body = ast.parse((ROOT / package / "__init__.py").read_text()).body
        first = next((n for n in body if isinstance(n, ast.Import | ast.ImportFrom)), None)
        assert isinstance(first, ast.Import) and [a.name for a in first.names] == [ENVIRONMENT], (
            f"{package}/__init__.py must `import {ENVIRONMENT}` as its first import: {package} imports Ray"
        )
    environment_imports = imports(modules[ENVIRONMENT], modules)
    assert environment_imports[0] == set(), "cluster.environment imports nothing of the project"
    assert not environment_imports[1] & set(RAY_LIKE), "cluster.environment must not import Ray itself"


# The checker itself, on a small tree: it finds what it is there to find.
@pytest.fixture
def toy(tmp_path: Path) -> Path:
    for name, text in {
        "low/__init__.py": "",
        "low/a.py": "import os\n",
        "high/__init__.py": "",
        "high/b.py": "from low.a import x\nfrom high import c\n",
        "high/c.py": "def f():\n    from high.b import y  # lazy, still a circle\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_checker_finds_an_upward_import_and_a_circle(toy: Path):
    layer = {"low": 0, "high": 1}
    edges = graph(toy, layer)
    assert edges["high.b"] == {"low.a", "high.c"}
    assert upward_imports(edges, layer) == []
    assert circles(edges) == [["high.b", "high.c"]]
    (toy / "low/a.py").write_text("from high.b import y\n")
    edges = graph(toy, layer)
    assert upward_imports(edges, layer) == ["low.a imports high.b: high is a layer above it (low is layer 0)"]
    assert circles(edges) == [["high.b", "high.c", "low.a"]]
    assert upward_imports(graph(toy, {"low": 0, "high": 0}), {"low": 0, "high": 0})[0].endswith(
        "its own layer (high is layer 0)"
    )
