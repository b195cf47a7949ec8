"""Contact sheets: one PNG per finding kind, the top findings as thumbnails with what was found.

Pairs (duplicates, leaks) side by side; a label issue with its given and suggested label; an
outlier or a drifted image with its score. Images are read with PIL's JPEG draft mode (a thumbnail
needs no full decode); an image that cannot be read is a grey tile saying so.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

THUMB, PAD, TEXT = 150, 8, 34
TITLES = {"leak": "train/valid leaks (copy | training image)", "duplicate": "duplicates within a split",
          "label_issue": "likely label errors (given -> suggested)", "outlier": "outliers",
          "drift": "new images far from the reference"}


def _thumb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.draft("RGB", (THUMB * 2, THUMB * 2))
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((THUMB, THUMB))
            return img
    except Exception as exc:  # noqa: BLE001 - a sheet shows what it could not read instead of failing
        tile = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
        ImageDraw.Draw(tile).text((4, 4), f"unreadable:\n{type(exc).__name__}", fill=(0, 0, 0))
        return tile


def _caption(row: pd.Series) -> str:
    if row["finding"] == "label_issue":
        return f"{row['label']} -> {row['suggested_label']}\n1-p(given) {row['score']:.2f}"
    if row["finding"] in ("leak", "duplicate"):
        return f"{row['split']}|{row['other_split']} cos {row['similarity']:.3f}\nz {row['score']:.1f}"
    if row["finding"] == "drift":
        return f"{row['split']}/{row['label']}\npercentile {row['score']:.0f}"
    return f"{row['split']}/{row['label']}\nz {row['score']:.1f}"


def contact_sheet(findings: pd.DataFrame, paths: dict[str, str], out: Path, title: str = "",
                  cols: int = 4) -> Path:
    """One sheet of ``findings`` (one kind); ``paths`` maps relpath -> a path PIL can open."""
    pair = findings["finding"].iloc[0] in ("leak", "duplicate")
    tile_w = (2 * THUMB + PAD) if pair else THUMB
    cols = max(1, cols - 1) if pair else cols
    n_rows = -(-len(findings) // cols)
    sheet = Image.new("RGB", (PAD + cols * (tile_w + PAD), 28 + n_rows * (THUMB + TEXT + PAD)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((PAD, 8), title, fill=(0, 0, 0), font=font)
    for n, (_, row) in enumerate(findings.iterrows()):
        x, y = PAD + (n % cols) * (tile_w + PAD), 28 + (n // cols) * (THUMB + TEXT + PAD)
        sheet.paste(_thumb(paths.get(row["relpath"], row["relpath"])), (x, y))
        if pair:
            sheet.paste(_thumb(paths.get(row["other_relpath"], row["other_relpath"])), (x + THUMB + PAD, y))
        name = row["relpath"] if not pair else f"{Path(row['relpath']).name} | {Path(row['other_relpath']).name}"
        draw.text((x, y + THUMB + 2), f"{name[-40:]}\n{_caption(row)}", fill=(0, 0, 0), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def contact_sheets(findings: pd.DataFrame, manifest: pd.DataFrame, folder: Path, top: int = 12) -> dict[str, Path]:
    """{kind: PNG} for each kind with findings, its ``top`` first (the table's order: worst first)."""
    paths = dict(zip(manifest["relpath"], manifest["path"]))
    sheets = {}
    for kind, title in TITLES.items():
        rows = findings[findings["finding"] == kind].head(top)
        if len(rows):
            sheets[kind] = contact_sheet(rows, paths, Path(folder) / f"{kind}.png",
                                         f"{title}: top {len(rows)} of {int((findings['finding'] == kind).sum())}")
    return sheets
