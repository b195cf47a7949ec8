"""A pretrained body cut where the arch table says, with the identity of its weights; and a stage
record's network rebuilt (without loading pretrained weights again)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from precompute.archs import ArchSpec, body_output_shape, cut_body, get_arch, layer_groups
from precompute.heads import build_head
from precompute.transforms import TransformSpec
from precompute.weights import load_weights

if TYPE_CHECKING:
    from precompute.records import StageRecord


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


def rebuild(record: StageRecord, size: int) -> tuple[ArchSpec, nn.Sequential, list[nn.Module]]:
    """The network of a stage record, without loading pretrained weights again."""
    spec = get_arch(record.arch)
    body = cut_body(spec.build(), spec, record.xtra_cut)
    head = build_head(body_output_shape(body, size)[0], len(record.classes), **record.head_config)
    model = nn.Sequential(body, head)
    model.load_state_dict(record.state_dict)
    return spec, model, layer_groups(body, head, spec, record.xtra_cut)
