"""What addresses an entry of the activation cache: everything that determines the numbers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Iterable

from precompute.transform_spec import TransformSpec
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
    """Everything that determines the activations of one image. ``parts()`` is its JSON form
    (key.json, chunk attributes), ``from_parts`` reads it back; the digest of the parts names the entry."""

    arch: str
    weights_id: str
    xtra_cut: int
    cut_index: int  # body children kept: the arch's cut minus xtra_cut
    transform: TransformSpec
    pooled: bool = True
    dtype: str = "float32"  # float32 | float16 | bfloat16 (stored as its bits: store/dtypes.py)
    versions: dict = field(default_factory=library_versions, hash=False)
    decoder: str = "pil"  # "pil" (CPU) | "nvjpeg" (JPEGs decoded on the GPU): the pixels differ

    def __post_init__(self):
        if not isinstance(self.transform, TransformSpec):
            raise TypeError(f"CacheKey.transform is a TransformSpec, got {type(self.transform).__name__} "
                            f"{self.transform!r}: pass TransformSpec(...), or read a key.json with CacheKey.from_parts")
        object.__setattr__(self, "transform", self.transform.resolved())  # as the parts hold it

    def parts(self) -> dict:
        """Every part as JSON-able data (the transform as ``TransformSpec.key()``); ``decoder`` only
        when not the default, so entries made before it existed (all decoded with PIL) keep their
        digest and stay in use. The digest of these parts names the entry: never change their form."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(transform=self.transform.key(), versions=dict(self.versions))
        if d["decoder"] == "pil":
            del d["decoder"]
        return d

    @classmethod
    def from_parts(cls, parts: dict) -> "CacheKey":
        """The key from its ``parts()`` (a key.json, a chunk's attributes, an activations result)."""
        if not isinstance(parts, dict) or not isinstance(parts.get("transform"), dict):
            raise ValueError(f"not the parts of a cache key (a dict whose transform is a dict): {parts!r}")
        return cls(**{**parts, "transform": TransformSpec(**parts["transform"])})

    def digest(self) -> str:
        return digest(self.parts())[:24]

    def rel(self) -> str:
        """The entry's folder under the store root."""
        return f"{self.arch}/cut={self.xtra_cut}/{self.digest()}"


def view_key(key: CacheKey, image_ids: Iterable[str], labels: Iterable[str] | None = None) -> str:
    """Identity of one image set read through one entry: the data version downstream sees."""
    rows = list(zip(image_ids, labels)) if labels is not None else list(image_ids)
    return digest({"entry": key.digest(), "rows": rows})[:24]
