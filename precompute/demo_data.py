"""Demo data that works offline: scikit-learn's digits written out as an image folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

MARKER = ".digits_complete.json"  # written last: its presence means the tree is complete


def write_digits_folder(
    root: str | Path,
    size: int = 64,
    valid_fraction: float = 0.2,
    seed: int = 0,
    limit_per_class: int | None = None,
) -> Path:
    """Write ``load_digits()`` (1797 8x8 images, 10 classes) as ``<root>/{train,valid}/<digit>/<i>.png``.

    Images are grayscale PNGs (mode L, ink bright on black) upscaled to ``size`` px; ``i`` is the
    index in ``load_digits()``. The split is stratified and fixed by ``seed``: each class keeps
    ``round(n * valid_fraction)`` images for valid, at least one of each split when it has two
    or more. ``limit_per_class`` keeps only the first n images of each digit (tiny sets for tests).
    Idempotent: a second call with the same arguments does nothing.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    root = Path(root)
    params = dict(size=size, valid_fraction=valid_fraction, seed=seed, limit_per_class=limit_per_class)
    marker = root / MARKER
    if marker.exists():
        if json.loads(marker.read_text()) == params:
            return root
        raise ValueError(
            f"{root} already holds digits written with {marker.read_text()}, not {params}: "
            "use another root or delete that folder"
        )
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for digit in range(10):
        idx = np.flatnonzero(digits.target == digit)[:limit_per_class]
        n_valid = int(round(len(idx) * valid_fraction))
        if len(idx) >= 2 and valid_fraction > 0:
            n_valid = min(max(n_valid, 1), len(idx) - 1)
        valid = set(rng.permutation(idx)[:n_valid].tolist())
        for i in idx.tolist():
            split, other = ("valid", "train") if i in valid else ("train", "valid")
            (root / other / str(digit) / f"{i}.png").unlink(missing_ok=True)  # left by an interrupted other split
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # values are 0..16
            Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{i}.png")
    marker.write_text(json.dumps(params))
    return root
