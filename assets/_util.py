"""Small helpers shared by the assets: plots as Markdown the Dagster UI can show, and lazy imports
of the ML stack (the metadata types are in assets/metadata.py)."""

import base64
import importlib
from pathlib import Path


class LazyModule:
    """A library module imported on first attribute access (``cache_fill.fill_cache``), not when the
    Dagster definitions load: they must load without torch, matplotlib or mlflow (issue 20;
    tests/test_layers.py). An annotation that names a class in it must be a string."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def png_markdown(path: Path, caption: str = "") -> str:
    """A PNG inlined as a data URI: the Dagster UI renders it; a file path it could not reach."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{caption}](data:image/png;base64,{data})"


def inline_pngs(md: str, folder: Path) -> str:
    for png in Path(folder).glob("*.png"):
        md = md.replace(f"]({png.name})", "](" + png_markdown(png).split("](", 1)[1])
    return md
