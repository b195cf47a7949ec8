"""The import contract (DESIGN.md, issue 20): dependencies point one way, and nothing hides a cycle.

Read from the source with ``ast``, every import counted, those inside functions too (a function-level
import hides a cycle from Python, not from this check); only ``if TYPE_CHECKING:`` blocks are left
out, since they never run. Part of ``make test`` and ``make test-fast``, so an upward import or a
cycle fails CI. A new library module must be placed in ``LAYERS``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("pipelines", "assets", "resources", "dagster", "dagster_dask", "dagster_postgres", "dagster_k8s")

# The library's layers, lowest first; a module imports only from its own layer and those below.
LAYERS = {
    # what everything builds on: errors, code versions, the stage settings (pydantic), the probes of outside services, the cut table,
    # weights, heads, the Task (with labels, its tag helpers) and the one fit loop
    "core": ["errors", "versions", "settings", "probes", "labels", "archs", "body_spec", "weights", "heads", "metrics",
             "transform_spec", "task", "train", "callbacks", "lr_find"],
    # images and their manifests: names and roots, decoding, object storage, the scan index, transforms
    "data": ["paths", "images", "sources", "scan_index_file", "scan_index", "listing", "manifest", "transforms",
             "demo_data"],
    "store": ["store"],  # the Zarr activation cache, every module of precompute/store/
    # what the Learner stands on: the cut body, the cache fill, rows from the manifest, the cache or image
    # files, predictions, typed records, metrics, the sweep and the data-quality findings
    "cache": ["features", "backbone", "records", "migrate", "rows", "inference", "evaluate", "interpret", "sweep", "quality",
              "stages.cache_fill", "stages.common", "learner_settings", "learner_io"],
    # the one training engine (DESIGN.md's face, split here because the stage adapters build it)
    "engine": ["learner", "learner_preds"],
    # adapters that build a Learner and call its verbs: head and image stages, report, run validation,
    # prediction, the leaderboard
    "stages": ["stages", "validate", "predict", "leaderboard"],
    # what a user calls besides the Learner: the package itself, the CLI, serving, MLflow tracking
    "face": ["", "cli", "serving", "tracking"],
}

# Imports that break the contract today, each with the change that removes it. Keep this short:
# an entry here is a debt, not a permission.
ALLOWED: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(*packages: str) -> dict[str, Path]:
    return {_module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module ``name`` imports at run time (resolved to a known module where one matches)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import mod` imports pkg.mod
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found - {name}


def _graph(*packages: str) -> dict[str, set[str]]:
    modules = _modules(*packages)
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


LIBRARY = _graph("precompute")


def _layer(module: str) -> int:
    short = module[len("precompute."):] if module != "precompute" else ""
    head = short.split(".")[0]
    for rank, names in enumerate(LAYERS.values()):
        if short in names or head in names:
            return rank
    raise AssertionError(f"{module} has no layer: place it in LAYERS in tests/test_layers.py")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                connect(w)
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

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_library_imports_no_orchestration():
    bad = sorted(f"{m} imports {i}" for m, imports in LIBRARY.items() for i in imports
                 if i.split(".")[0] in ORCHESTRATION)
    assert not bad, "the library (precompute/) must not import Dagster or pipelines/assets/resources:\n" + "\n".join(bad)


def test_every_library_module_imports_only_its_layer_and_below():
    bad = []
    for module, imports in LIBRARY.items():
        for target in imports:
            if target in LIBRARY and (module, target) not in ALLOWED and _layer(target) > _layer(module):
                names = list(LAYERS)
                bad.append(f"{module} ({names[_layer(module)]}) imports {target} ({names[_layer(target)]})")
    assert not bad, "upward imports (layers: " + " <- ".join(LAYERS) + "):\n" + "\n".join(sorted(bad))


def test_no_import_cycles_in_the_library():
    graph = {m: {i for i in imports if (m, i) not in ALLOWED} for m, imports in LIBRARY.items()}
    assert not _cycles(graph), f"import cycles (function-level imports count): {_cycles(graph)}"


def test_allow_list_entries_are_still_needed():
    """A debt paid is struck off: an allowed import that no longer exists fails here."""
    stale = sorted(f"{m} -> {t}" for m, t in ALLOWED if t not in LIBRARY.get(m, ()))
    assert not stale, f"remove from ALLOWED, the import is gone: {stale}"


def test_orchestration_points_one_way():
    """pipelines -> assets -> resources -> precompute: never the other way."""
    graph = _graph("pipelines", "assets", "resources")
    below = {"pipelines": ("assets", "resources"), "assets": ("resources",), "resources": ()}
    order = ("pipelines", "assets", "resources")
    bad = sorted(f"{m} imports {i}" for m, imports in graph.items() for i in imports
                 if i.split(".")[0] in order and i.split(".")[0] != m.split(".")[0]
                 and i.split(".")[0] not in below[m.split(".")[0]])
    assert not bad, "\n".join(bad)


def test_the_contract_sees_function_level_imports_and_cycles(tmp_path):
    """The check itself: an import inside a function is an edge, one under TYPE_CHECKING is not, and
    a cycle closed by a function-level import is found."""
    path = tmp_path / "a.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n\n\n"
                    "def f():\n    from precompute import b\n")
    assert _imports(path, "precompute.a", {"precompute.a", "precompute.b"}) == {"precompute.b", "typing"}
    assert _cycles({"precompute.a": {"precompute.b"}, "precompute.b": {"precompute.a"}}) == [["precompute.a",
                                                                                            "precompute.b"]]


@pytest.mark.parametrize("heavy", [("torch", "torchvision", "matplotlib", "mlflow")])
def test_the_dagster_definitions_load_without_the_ml_stack(heavy):
    """`dagster dev`, `dg check defs` and every code-location reload import the definitions: the ML
    stack loads when a step runs, not then (issue 20; the load time is in README's tests section)."""
    probe = ("import sys, pipelines.definitions; "
             f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"loaded with the definitions: {done.stdout.strip()}"
