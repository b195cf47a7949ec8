"""fastai's head: concat of adaptive max and avg pooling, then BatchNorm/Dropout/Linear blocks.

The same module takes a spatial map (N, C, H, W) from the body or a pooled vector (N, 2C) from
the cache, so a head trained on pooled activations is put on top of the body unchanged.

A custom head is named, never imported by whatever name a file holds: model files, cached head
results and run configs are data, and a name in them that imported a module would let that data
run code. ``load_factory`` accepts a head registered in code (``@register_head("name")``, the
``HEADS`` registry) or a ``package.module:function`` the operator lists in the environment variable
``PRECOMPUTE_ALLOWED_HEADS`` (comma-separated); any other name is refused before anything is imported.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from precompute.errors import ConfigError
from precompute.settings import check_head_shape


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


HeadFactory = Callable[[int, int], nn.Module]  # (in_features, n_classes) -> module giving class scores
HEADS: dict[str, HeadFactory] = {}
ALLOWED_HEADS_ENV = "PRECOMPUTE_ALLOWED_HEADS"


class UnknownHead(ValueError):
    """A head name that is neither registered in code nor allowed by the operator; nothing was imported."""


def register_head(name: str) -> Callable[[HeadFactory], HeadFactory]:
    """Decorator: make ``factory`` available as ``custom_head: name`` (in code, so data cannot add one)."""
    def add(factory: HeadFactory) -> HeadFactory:
        if name in HEADS and HEADS[name] is not factory:
            raise ValueError(f"head {name!r} is already registered ({HEADS[name]!r})")
        HEADS[name] = factory
        return factory
    return add


register_head("linear")(nn.Linear)  # one linear layer on the pooled vector: logistic regression


def allowed_heads() -> set[str]:
    """The 'package.module:function' names the operator allows in ``PRECOMPUTE_ALLOWED_HEADS``."""
    return {n.strip() for n in os.environ.get(ALLOWED_HEADS_ENV, "").split(",") if n.strip()}


def check_head_name(name) -> None:
    """Refuse a head name from a config, model file or cache before anything is imported."""
    if not isinstance(name, str):
        raise UnknownHead(f"custom head {name!r} is not a name: give a registered head or 'package.module:function'")
    if name in HEADS or name in allowed_heads():
        return
    raise UnknownHead(f"custom head {name!r} is refused, nothing was imported: a head named by a config, model file "
                      f"or cached result must be registered in code ({', '.join(sorted(HEADS))}) or listed in "
                      f"{ALLOWED_HEADS_ENV}. Register it (@precompute.heads.register_head({name!r}) on its factory, "
                      f"in a module imported before the run) or, for a 'package.module:function', add that name to "
                      f"{ALLOWED_HEADS_ENV} (comma-separated) on the machine that loads it")


def check_head_config(head_config) -> None:
    """The head part of a stage record read from a file or the cache: only known heads."""
    if not isinstance(head_config, dict):
        raise UnknownHead(f"head_config {head_config!r} is not a dict of ps, xtra_fc and custom")
    if head_config.get("custom") is not None:
        check_head_name(head_config["custom"])


def load_factory(name: str) -> HeadFactory:
    """A registered head, or an allowed 'package.module:function' -> a callable (in_features, n_classes) -> nn.Module."""
    check_head_name(name)  # before any import
    if name in HEADS:
        return HEADS[name]
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise ValueError(f"custom head {name!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class HeadConfig:
    """What a new head is: fastai's (``ps`` dropout per linear block, ``xtra_fc`` hidden sizes) or
    a ``custom`` one by name. Checked when made, before anything is built: a ConfigError says what
    to change (and a custom name is refused before anything is imported)."""

    ps: float | Sequence[float] | None = None
    xtra_fc: Sequence[int] | None = (512,)
    custom: str | None = None

    def __post_init__(self):
        # sequences from configs and files become tuples: the config stays hashable and compares equal
        if self.xtra_fc is not None and not isinstance(self.xtra_fc, (str, bytes)):
            object.__setattr__(self, "xtra_fc", tuple(self.xtra_fc))
        if self.ps is not None and not isinstance(self.ps, (int, float, str)):
            object.__setattr__(self, "ps", tuple(self.ps))
        if self.custom is not None:
            self._check_custom()
        else:  # the shape rules live in precompute.settings (HeadSettings checks the same)
            check_head_shape(self.ps, self.xtra_fc)

    def _check_custom(self) -> None:
        try:
            factory = load_factory(self.custom)
        except UnknownHead as e:  # never imported: the message says how to register or allow it
            raise ConfigError(str(e)) from None
        except (ValueError, ImportError, AttributeError) as e:
            raise ConfigError(f"custom_head {self.custom!r} cannot be loaded ({type(e).__name__}: {e}): give "
                              "'package.module:function' importable here, the function taking (in_features, n_classes)") from None
        if not callable(factory):
            raise ConfigError(f"custom_head {self.custom!r} is not callable: name a function (in_features, n_classes) "
                              "-> nn.Module")

    def as_dict(self) -> dict:
        """As stage records keep it on disk (``head_config``: plain lists, numbers and a name)."""
        return {"ps": list(self.ps) if isinstance(self.ps, tuple) else self.ps,
                "xtra_fc": None if self.xtra_fc is None else list(self.xtra_fc), "custom": self.custom}

    @classmethod
    def from_dict(cls, d) -> "HeadConfig":
        """A head config read from a model file, a cached result or an MLflow artifact (``as_dict``'s
        form, the same in every version): a custom name is refused before anything is imported."""
        check_head_config(d)
        return cls(ps=d.get("ps"), xtra_fc=d.get("xtra_fc", (512,)), custom=d.get("custom"))

    def build(self, in_channels: int, n_classes: int) -> "Head":
        """The head for a body giving ``in_channels`` channels (``xtra_fc`` None: fastai's one hidden 512)."""
        return build_head(in_channels, n_classes, self.ps, (512,) if self.xtra_fc is None else self.xtra_fc,
                          self.custom)


def build_head(in_channels: int, n_classes: int, ps=None, xtra_fc: Sequence[int] = (512,),
               custom: str | Callable[[int, int], nn.Module] | None = None) -> Head:
    """fastai's head, or a user module that maps the pooled 2C vector to class scores."""
    if custom is None:
        return Head(in_channels, n_classes, ps, xtra_fc)
    factory = load_factory(custom) if isinstance(custom, str) else custom
    return Head(in_channels, n_classes, classifier=factory(2 * in_channels, n_classes))
