"""No private API of Dagster or MLflow anywhere in the project: an upgrade must not break on internals.

Every Python file and the notebook's code cells are parsed; an import of ``dagster._...``,
``dagster_<lib>._...`` or ``mlflow._...`` (any depth), or an attribute ``_x`` read off a name bound to
one of those packages (``dg._core``), fails with the file and line.
"""

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("precompute", "assets", "resources", "pipelines", "tests", "benchmarks", "scripts", "examples")
PACKAGES = ("dagster", "mlflow")


def _guarded(module: str) -> bool:
    top = module.split(".")[0]
    return top in PACKAGES or top.startswith("dagster_")


def _private(module: str) -> bool:
    return _guarded(module) and any(part.startswith("_") for part in module.split(".")[1:])


def private_uses(source: str, where: str) -> list[str]:
    found, aliases = [], set()
    tree = ast.parse(source, where)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _private(a.name):
                    found.append(f"{where}:{node.lineno}: import {a.name}")
                elif _guarded(a.name):
                    aliases.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _private(node.module) or (_guarded(node.module) and any(a.name.startswith("_") for a in node.names)):
                found.append(f"{where}:{node.lineno}: from {node.module} import "
                             + ", ".join(a.name for a in node.names))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and _private(str(node.args[0].value)):
                found.append(f"{where}:{node.lineno}: import_module({node.args[0].value!r})")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in aliases):
            found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def project_sources():
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield str(path.relative_to(ROOT)), path.read_text()
        for path in sorted((ROOT / folder).rglob("*.ipynb")):
            cells = json.loads(path.read_text())["cells"]
            code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
            code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("!", "%")))
            yield str(path.relative_to(ROOT)), code


def test_no_private_dagster_or_mlflow_api():
    sources = list(project_sources())
    assert any(name == "pipelines/sharding.py" for name, _ in sources)  # the folders were found
    found = [hit for name, text in sources for hit in private_uses(text, name)]
    assert not found, "private Dagster/MLflow API used (use the public one, or say in an issue what is missing):\n" \
        + "\n".join(found)


def test_the_check_finds_private_uses():
    source = ("import dagster as dg\nfrom dagster._core.events import DagsterEvent\nimport mlflow._x\n"
              "from dagster_dask.executor import _f\nx = dg._core\nimport importlib\n"
              "importlib.import_module('mlflow._y')\nfrom dagster import asset\n")
    assert [hit.split(": ", 1)[1] for hit in private_uses(source, "f.py")] == [
        "from dagster._core.events import DagsterEvent", "import mlflow._x", "from dagster_dask.executor import _f",
        "import_module('mlflow._y')", "dg._core"]
