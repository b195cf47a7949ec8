"""fastai's head: concat of adaptive max and avg pooling, then BatchNorm/Dropout/Linear blocks.

The same module takes a spatial map (N, C, H, W) from the body or a pooled vector (N, 2C) from
the cache, so a head trained on pooled activations is put on top of the body unchanged.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import torch
from torch import nn


class AdaptiveConcatPool2d(nn.Module):
    """cat([max pool, avg pool]) over the spatial dims: 2C features, as fastai did."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([nn.functional.adaptive_max_pool2d(x, 1), nn.functional.adaptive_avg_pool2d(x, 1)], 1)


def concat_pool(x: torch.Tensor) -> torch.Tensor:
    return AdaptiveConcatPool2d()(x).flatten(1)


def _expand_ps(ps: float | Sequence[float] | None, n_blocks: int) -> list[float]:
    if ps is None:  # fastai 0.7: 0.25 before hidden layers, 0.5 before the last
        return [0.25] * (n_blocks - 1) + [0.5]
    if isinstance(ps, (int, float)):
        return [float(ps)] * n_blocks
    ps = list(ps)
    if len(ps) != n_blocks:
        raise ValueError(f"ps has {len(ps)} values for {n_blocks} linear blocks (xtra_fc + 1); "
                         "give one dropout per block or a single float")
    return ps


class Head(nn.Module):
    def __init__(self, in_channels: int, n_classes: int, ps=None, xtra_fc: Sequence[int] = (512,),
                 classifier: nn.Module | None = None):
        super().__init__()
        self.pool = AdaptiveConcatPool2d()
        if classifier is None:
            sizes = [2 * in_channels, *xtra_fc, n_classes]
            drops = _expand_ps(ps, len(sizes) - 1)
            layers: list[nn.Module] = []
            for i, (ni, nf, p) in enumerate(zip(sizes[:-1], sizes[1:], drops)):
                layers += [nn.BatchNorm1d(ni), nn.Dropout(p), nn.Linear(ni, nf)]
                if i < len(drops) - 1:
                    layers.append(nn.ReLU(inplace=True))
            classifier = nn.Sequential(*layers)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = self.pool(x).flatten(1)
        return self.classifier(x)


def load_factory(dotted: str) -> Callable[[int, int], nn.Module]:
    """'package.module:function' -> a callable (in_features, n_classes) -> nn.Module."""
    module, _, name = dotted.partition(":")
    if not name:
        raise ValueError(f"custom head {dotted!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def build_head(in_channels: int, n_classes: int, ps=None, xtra_fc: Sequence[int] = (512,),
               custom: str | Callable[[int, int], nn.Module] | None = None) -> Head:
    """fastai's head, or a user module that maps the pooled 2C vector to class scores."""
    if custom is None:
        return Head(in_channels, n_classes, ps, xtra_fc)
    factory = load_factory(custom) if isinstance(custom, str) else custom
    return Head(in_channels, n_classes, classifier=factory(2 * in_channels, n_classes))
