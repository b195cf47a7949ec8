"""Configuration checks that run before any work: each failure is a ``ConfigError`` that says what to change.

Every check is cheap: no weights are loaded, no image is read, nothing is created (no store folder,
no MLflow database, no run), and a probe of a remote endpoint gives up after ``PROBE_TIMEOUT_S``.
Each value is checked by the object that owns it (``BodySpec`` here: arch, cut, image size;
``cache_fill.CacheSettings``: dtype, weights; ``transforms.Augmentation``; ``heads.HeadConfig``; the
training values in ``precompute.train``). ``validate_run`` builds those objects from the values it
is given and reports every problem at once; the ``check_*`` functions, thin over the same objects,
raise on the first. The probes of the store and of MLflow are ``precompute.probes``, below the
store in the layers (``ActivationStore.check_reachable`` and ``Tracker.check_reachable`` call them);
they are re-exported here.

    from precompute.validate import validate_run
    validate_run(arch="resnet34", xtra_cut=0, size=224, lr=[1e-4, 1e-3, 1e-2],
                 store="s3://bucket/acts", storage_options={"endpoint_url": "http://minio:9000"},
                 tracking_uri="http://mlflow:5000")
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from precompute.archs import ARCHS, ArchSpec, cut_body, max_xtra_cut
from precompute.heads import HeadConfig
from precompute.probes import PROBE_TIMEOUT_S, check_store, check_tracking  # noqa: F401 - re-exported
from precompute.stages.cache_fill import CacheSettings
from precompute.train import (N_LAYER_GROUPS, ConfigError, check_batch_size, check_lrs,  # noqa: F401 - re-exported
                              check_precompute_augment)
from precompute.transforms import Augmentation

__all__ = [
    "ConfigError", "PROBE_TIMEOUT_S", "validate_run", "BodySpec", "check_arch", "check_cut", "body_stride", "min_image_size",
    "check_size", "check_lrs", "check_precompute_augment", "check_batch_size", "check_dtype", "check_weights",
    "check_custom_head", "check_head", "check_augmentation", "check_store", "check_tracking", "check_manifest",
]

DTYPES = CacheSettings.DTYPES


# --------------------------------------------------------------------------- the whole run


def validate_run(*, arch: str | None = None, xtra_cut: int = 0, size: int | None = None, lr=None,
                 n_groups: int = N_LAYER_GROUPS, frozen: int = 0, precompute: bool = False, augment: bool = False,
                 batch_size: int | None = None, dtype: str | None = None, weights: str | None = None,
                 weights_path: str | None = None, custom_head: str | None = None, ps=None, xtra_fc=None,
                 augmentation: str | None = None, max_zoom: float | None = None, store: str | None = None,
                 storage_options: dict | str | None = None, tracking_uri: str | None = None, manifest=None,
                 timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Build the object that owns each value given (None: not checked); one ConfigError lists every problem found."""
    errors: list[str] = []

    def run(build: Callable, *args, **kwargs) -> None:
        try:
            build(*args, **kwargs)
        except ConfigError as e:
            errors.append(str(e))

    run(check_precompute_augment, precompute, augment)
    if arch is not None:
        run(BodySpec, arch, xtra_cut, size)
    if lr is not None:
        run(check_lrs, lr, n_groups, frozen)
    if batch_size is not None:
        run(check_batch_size, batch_size)
    if dtype is not None:
        run(CacheSettings, dtype=dtype)
    if arch in ARCHS and (weights is not None or weights_path is not None):
        run(check_weights, arch, weights or "pretrained", weights_path)
    if custom_head is not None:
        run(HeadConfig, custom=custom_head)
    elif ps is not None or xtra_fc is not None:
        run(HeadConfig, ps=ps, xtra_fc=xtra_fc)
    if augmentation is not None or max_zoom is not None:
        run(Augmentation, augmentation, max_zoom)
    if manifest is not None:
        run(check_manifest, manifest)
    if store is not None:  # the probes last: they may take up to timeout_s each
        run(check_store, store, storage_options, timeout_s)
    if tracking_uri is not None:
        run(check_tracking, tracking_uri, timeout_s)
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} configuration errors, nothing was run:\n" + "\n".join(f"- {e}" for e in errors))


# --------------------------------------------------------------------------- arch, cut, size


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


def check_arch(arch: str) -> ArchSpec:
    return BodySpec(arch).spec


def check_cut(arch: str, xtra_cut) -> None:
    BodySpec(arch, xtra_cut)


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
    check_cut(arch, xtra_cut)
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


def check_size(arch: str, xtra_cut: int, size: int | None) -> None:
    BodySpec(arch, xtra_cut, size)


def _default_size(spec: ArchSpec) -> int:
    return spec.input_size if isinstance(spec.input_size, int) else spec.input_size[-1]


# --------------------------------------------------------------------------- training values


def check_dtype(dtype: str) -> None:
    CacheSettings(dtype=dtype)


def check_weights(arch: str, weights: str = "pretrained", weights_path: str | None = None) -> None:
    """The weights a run would load exist (or may be downloaded); nothing is loaded or downloaded."""
    check_arch(arch)
    CacheSettings(weights=weights, weights_path=weights_path).check_weights(arch)


def check_head(ps=None, xtra_fc=None) -> None:
    """fastai's head: one dropout per linear block (len(xtra_fc) + 1), each in [0, 1) (heads.HeadConfig)."""
    HeadConfig(ps=ps, xtra_fc=xtra_fc)


def check_augmentation(preset: str | None = None, max_zoom: float | None = None) -> None:
    Augmentation(preset, max_zoom)


def check_custom_head(dotted: str) -> None:
    """A registered head, or a 'package.module:function' allowed in PRECOMPUTE_ALLOWED_HEADS (heads.HeadConfig)."""
    HeadConfig(custom=dotted)


def check_manifest(manifest, train_split: str = "train", valid_split: str = "valid", require_valid: bool = True) -> None:
    """Enough usable images to train and to measure: 2+ classes with training images, 1+ validation image."""
    from precompute.manifest import ok_rows

    ok = ok_rows(manifest)
    train, valid = ok[ok["split"] == train_split], ok[ok["split"] == valid_split]
    skipped = {k: int(v) for k, v in manifest.loc[manifest["status"] != "ok", "status"].value_counts().items()}
    note = f" ({len(manifest) - len(ok)} rows not usable: {skipped}; their reasons are in the manifest)" if skipped else ""
    classes = sorted(train["label"].unique())
    if len(train) < 2 or len(classes) < 2:
        raise ConfigError(f"{len(train)} usable {train_split} images in {len(classes)} class(es) {classes}: training "
                          f"needs at least 2 classes with images; add images under {train_split}/<class>/{note}")
    if require_valid and valid.empty:
        raise ConfigError(f"no usable {valid_split} image, so accuracy cannot be measured: add images under "
                          f"{valid_split}/<class>/, or use a CSV without a split column (20% go to {valid_split}){note}")
