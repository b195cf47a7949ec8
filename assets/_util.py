"""Small helpers shared by the assets: plots as Markdown the Dagster UI can show."""

import base64
from pathlib import Path


def png_markdown(path: Path, caption: str = "") -> str:
    """A PNG inlined as a data URI: the Dagster UI renders it; a file path it could not reach."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{caption}](data:image/png;base64,{data})"


def inline_pngs(md: str, folder: Path) -> str:
    for png in Path(folder).glob("*.png"):
        md = md.replace(f"]({png.name})", "](" + png_markdown(png).split("](", 1)[1])
    return md
