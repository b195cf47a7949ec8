"""The cut body a partition runs, checked before any work: an arch of ``ARCHS``, a cut within its
range and an image size that leaves at least a 1x1 feature map. Shapes come from a body on torch's
meta device, so nothing is computed, loaded or allocated (a resnet152 costs what a resnet18 does).

    BodySpec("resnet34", xtra_cut=0, size=224)   # ConfigError naming the fix when any part is off
    min_image_size("resnet18", 0)                 # 32
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from precompute.archs import ARCHS, ArchSpec, cut_body, max_xtra_cut
from precompute.errors import ConfigError

__all__ = ["BodySpec", "body_stride", "min_image_size"]


@dataclass(frozen=True)
class BodySpec:
    """The cut body a partition runs: an arch of ``ARCHS``, a cut within ``0..max_xtra_cut`` and an
    image size (None: the arch's) that leaves at least a 1x1 feature map; checked when built."""
    arch: str
    xtra_cut: int = 0
    size: int | None = None

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown arch {self.arch!r}: choose one of {', '.join(sorted(ARCHS))} "
                              "(the partition's arch: PRECOMPUTE_ARCHS or archs in precompute.yaml)")
        spec, cut, top = self.spec, self.xtra_cut, max_xtra_cut(self.spec)
        if isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut <= top:
            raise ConfigError(f"cut (xtra_cut) {cut!r} is out of range for {self.arch}: valid cuts are 0..{top} "
                              f"(0 = the table's cut of {spec.cut} children, each step one child earlier); "
                              f"set the partition's cut (PRECOMPUTE_CUTS or cuts in precompute.yaml) within 0..{top}")
        size = self.size
        if size is None:
            return
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ConfigError(f"image size {size!r} must be a positive integer (pixels); "
                              f"{spec.name}'s default is {_default_size(spec)}")
        smallest = min_image_size(self.arch, cut)
        if size < smallest:
            raise ConfigError(f"image size {size} is too small for {self.arch} at cut {cut}: its body downsamples "
                              f"{body_stride(self.arch, cut)}x, so the smallest size that leaves a 1x1 feature map "
                              f"is {smallest}; set size >= {smallest} (the arch's default is {_default_size(spec)})")

    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.arch]


_REF_SIZE = 512


@functools.lru_cache(maxsize=None)
def _shape_body(arch: str, xtra_cut: int, meta: bool = True) -> torch.nn.Module:
    """The cut body, by default with parameters on the meta device: shapes propagate, nothing is
    computed or allocated (a resnet152 costs what a resnet18 does)."""
    spec = ARCHS[arch]
    if meta:
        with torch.device("meta"):
            model = spec.build()
    else:
        model = spec.build()
    return cut_body(model, spec, xtra_cut).eval()


def _map_side(body: torch.nn.Module, size: int) -> int:
    """The smaller side of the body's output map for a size x size input; 0 if it has none."""
    p = next(body.parameters(), None)
    try:
        with torch.no_grad():
            out = body(torch.empty(1, 3, size, size, device=p.device if p is not None else "cpu"))
    except Exception:  # noqa: BLE001 - "output size is too small" from a conv or pool, or an op meta lacks
        return 0
    return int(min(out.shape[-2:]))


@functools.lru_cache(maxsize=None)
def _stride_and_min_size(arch: str, xtra_cut: int) -> tuple[int, int]:
    BodySpec(arch, xtra_cut)
    for meta in (True, False):  # a real (random, CPU) body only if the meta one cannot run
        body = _shape_body(arch, xtra_cut, meta)
        side = _map_side(body, _REF_SIZE)
        if side:
            break
    else:
        return 1, 1  # cannot tell: reject no size
    stride = math.ceil(_REF_SIZE / side)
    size = stride
    while size < _REF_SIZE and _map_side(body, size) < 1:  # unpadded convs or pools need a little more
        size += 1
    return stride, size


def body_stride(arch: str, xtra_cut: int = 0) -> int:
    """How many input pixels one cell of the body's output map spans (32 for a resnet at cut 0)."""
    return _stride_and_min_size(arch, xtra_cut)[0]


def min_image_size(arch: str, xtra_cut: int = 0) -> int:
    """The smallest image size whose output map is at least 1x1 with every cell fully inside the image."""
    return _stride_and_min_size(arch, xtra_cut)[1]


def _default_size(spec: ArchSpec) -> int:
    return spec.input_size if isinstance(spec.input_size, int) else spec.input_size[-1]
