"""Assets stay short calls into the library (DESIGN.md, issue 20): every @asset, @multi_asset,
@op, @graph_asset and @asset_check body in assets/ and pipelines/ is under 25 lines, docstring not
counted. Read with ``ast``, so it costs no import and catches a new module too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 25  # a body must be shorter than this
DECORATORS = {"asset", "multi_asset", "op", "graph_asset", "graph_multi_asset", "asset_check", "multi_asset_check"}


def _decorator_name(node: ast.expr) -> str:
    node = node.func if isinstance(node, ast.Call) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def body_lines(fn: ast.FunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the last one."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def orchestrated_functions(source: str) -> list[ast.FunctionDef]:
    return [node for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and any(_decorator_name(d) in DECORATORS for d in node.decorator_list)]


def test_every_asset_and_op_body_is_under_25_lines():
    found, too_long = [], []
    for path in sorted([*(ROOT / "assets").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]):
        for fn in orchestrated_functions(path.read_text()):
            found.append(fn.name)
            if body_lines(fn) >= MAX_LINES:
                too_long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name}: {body_lines(fn)} lines")
    assert {"activations", "head_on_cache", "data_quality", "head_sweep", "precompute_shards"} <= set(found)
    assert not too_long, ("asset/op bodies of 25 lines or more (move the logic into the library or a small "
                          "helper):\n" + "\n".join(too_long))


def test_the_count_skips_the_docstring_and_sees_every_decorator_form():
    source = '''
import dagster as dg
from dagster import asset

@dg.asset(group_name="x")
def a():
    """Doc
    string."""
    x = 1
    return (x,
            x)

@asset
def b():
    return 1

@dg.op
def c():
    pass

def plain():
    pass
'''
    fns = {fn.name: body_lines(fn) for fn in orchestrated_functions(source)}
    assert fns == {"a": 3, "b": 1, "c": 1}
    long = "@dg.asset\ndef d():\n" + "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    (fn,) = orchestrated_functions(long)
    assert body_lines(fn) == MAX_LINES  # the limit: a body this long fails the test above
