"""Faults planted in a copy of an image folder, to see that data_quality finds them (tests, benchmark).

``plant_faults`` copies a ``<split>/<class>/`` tree and adds near-duplicates across splits
(copies of training photos, resized and re-encoded, slightly cropped or colour-jittered, placed in
valid under the same class) and flipped training labels (a photo moved to another class folder).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

KINDS = ("resized+re-encoded", "cropped", "colour-jittered", "cropped+jittered+resized")


def near_copy(src: Path, kind: int, rng: np.random.Generator) -> bytes:
    """A JPEG near-copy of ``src``, ``KINDS[kind % 4]``."""
    kind %= 4
    with Image.open(src) as img:
        img = img.convert("RGB")
    w, h = img.size
    if kind in (1, 3):
        f = rng.uniform(0.88, 0.95)  # keep 88-95% of each side
        cw, ch = int(w * f), int(h * f)
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        img = img.crop((x, y, x + cw, y + ch))
    if kind in (2, 3):
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.8, 1.2))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.85, 1.15))
    if kind in (0, 3):
        s = rng.uniform(0.5, 0.8)
        img = img.resize((max(32, int(img.width * s)), max(32, int(img.height * s))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(60, 85)))
    return buf.getvalue()


def copy_tree(src: Path, dst: Path, per_split: dict[str, int] | None = None) -> Path:
    """``src`` copied to ``dst`` (``per_split``: only the first n files of each class folder)."""
    if dst.exists():
        shutil.rmtree(dst)
    if per_split is None:
        shutil.copytree(src, dst)
        return dst
    for split, n in per_split.items():
        for cls in sorted(p for p in (src / split).iterdir() if p.is_dir()):
            (dst / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, dst / split / cls.name / f.name)
    return dst


def plant_faults(folder: Path, n_dup: int, n_flip: int, seed: int = 0, kinds=(0, 1, 2, 3)) -> dict:
    """Plant faults in ``folder`` (a copy): returns {"pairs": [(train relpath, valid relpath)],
    "flips": [relpath after the move], "flipped_from": {relpath: original class}}; the copies cycle
    through ``kinds`` (indices into ``KINDS``)."""
    rng = np.random.default_rng(seed)
    train = sorted(p.relative_to(folder).as_posix() for p in folder.glob("train/*/*") if p.is_file())
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    picked = rng.choice(len(train), n_dup + n_flip, replace=False)
    pairs, flips, was = [], [], {}
    for i, k in enumerate(picked[:n_dup]):
        src = folder / train[k]
        copy = f"valid/{src.parent.name}/planted_dup_{i:02d}_{src.stem}.jpg"
        (folder / copy).parent.mkdir(parents=True, exist_ok=True)
        (folder / copy).write_bytes(near_copy(src, kinds[i % len(kinds)], rng))
        pairs.append((train[k], copy))
    for k in picked[n_dup:]:
        src = folder / train[k]
        others = [c for c in classes if c != src.parent.name]
        moved = f"train/{others[int(rng.integers(len(others)))]}/{src.name}"
        src.rename(folder / moved)
        flips.append(moved)
        was[moved] = src.parent.name
    return {"pairs": pairs, "flips": flips, "flipped_from": was}
