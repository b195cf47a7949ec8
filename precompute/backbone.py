"""A pretrained body cut where the arch table says, with the identity of its weights, and the
transform that goes with it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from precompute.archs import ArchSpec, cut_body, get_arch
from precompute.transforms import TransformSpec
from precompute.weights import load_weights


@dataclass
class Backbone:
    spec: ArchSpec
    body: nn.Sequential
    weights_id: str
    xtra_cut: int


def load_backbone(arch: str, xtra_cut: int = 0, weights: str = "pretrained",
                  weights_path: str | None = None) -> Backbone:
    spec = get_arch(arch)
    model, weights_id = load_weights(spec, weights, weights_path)
    return Backbone(spec, cut_body(model, spec, xtra_cut), weights_id, xtra_cut)


def transform_for(spec: ArchSpec, size: int | None = None) -> TransformSpec:
    return TransformSpec.for_arch(spec, size=size)


def with_size(ts: TransformSpec, size: int | None) -> TransformSpec:
    """The transform at another image size (progressive resizing: same weights, new input size);
    the resize side follows the size, as the arch's default does."""
    if not size or size == ts.size:
        return ts
    return TransformSpec(**{**ts.key(), "size": size, "resize": None})
