"""What addresses an entry of the activation cache: everything that determines the numbers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Iterable

from precompute.versions import CODE_VERSION  # noqa: F401 - part of every key; bump it there


def library_versions() -> dict[str, str]:
    import timm
    import torch
    import torchvision
    import zarr

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "zarr": zarr.__version__, "precompute_code": CODE_VERSION}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines the activations of one image."""

    arch: str
    weights_id: str
    xtra_cut: int
    cut_index: int  # body children kept: the arch's cut minus xtra_cut
    transform: dict = field(hash=False)
    pooled: bool = True
    dtype: str = "float32"  # float32 | float16 | bfloat16 (stored as its bits: store/dtypes.py)
    versions: dict = field(default_factory=library_versions, hash=False)
    decoder: str = "pil"  # "pil" (CPU) | "nvjpeg" (JPEGs decoded on the GPU): the pixels differ

    def parts(self) -> dict:
        """Every part; ``decoder`` only when not the default, so entries made before it existed
        (all decoded with PIL) keep their digest and stay in use."""
        d = asdict(self)
        if d["decoder"] == "pil":
            del d["decoder"]
        return d

    def digest(self) -> str:
        return digest(self.parts())[:24]

    def rel(self) -> str:
        """The entry's folder under the store root."""
        return f"{self.arch}/cut={self.xtra_cut}/{self.digest()}"


def view_key(key: CacheKey, image_ids: Iterable[str], labels: Iterable[str] | None = None) -> str:
    """Identity of one image set read through one entry: the data version downstream sees."""
    rows = list(zip(image_ids, labels)) if labels is not None else list(image_ids)
    return digest({"entry": key.digest(), "rows": rows})[:24]
