import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

DOGSCATS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dogscats"


@pytest.fixture(scope="session")
def dogscats() -> Path:
    if not (DOGSCATS / "train").is_dir():
        pytest.skip(f"real photos not found at {DOGSCATS} (the shared data folder beside the project)")
    return DOGSCATS


def copy_tree(src: Path, dst: Path, per_class: dict[str, int]) -> Path:
    """A small ImageNet-style tree with the first n photos of each split/class of ``src``."""
    for split, n in per_class.items():
        for cls_dir in sorted((src / split).iterdir()):
            out = dst / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                shutil.copy(f, out / f.name)
    return dst


@pytest.fixture
def tiny_tree(tmp_path, dogscats) -> Path:
    """8 train and 4 valid photos per class, copied into a temporary folder."""
    return copy_tree(dogscats, tmp_path / "images", {"train": 8, "valid": 4})
