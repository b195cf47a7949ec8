"""Transforms and the dataset: the pixels the network sees.

``TransformSpec`` (precompute.transform_spec) is everything that determines them (part of the cache key):
``eval_transform`` is the deterministic transform whose outputs the cache stores,
``train_transform`` the random augmentation of fastai 0.7's presets (``AUGMENTATION_PRESETS``).
``ImageDataset`` pairs a manifest's usable rows, decoded by ``load_rgb``, with a transform;
``EncodedImageDataset`` hands JPEGs on undecoded, for the GPU's decoder (precompute.features).
Given the rows' ``image_ids``, both decode only bytes that hash to them (``images.read_checked``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torchvision.transforms import InterpolationMode, v2

from precompute.images import ImageLoadError, device_decodable, load_rgb, read_checked, shape_problem
from precompute.labels import class_names, is_multilabel, label_delim, multi_hot
from precompute.manifest import ok_rows
from precompute.settings import AugmentationPreset, AugmentationSettings, choices
from precompute.transform_spec import TransformSpec

_INTERPOLATIONS = {m.value: m for m in InterpolationMode}


def _to_normalized_tensor(ts: TransformSpec) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(ts.mean), list(ts.std))]


def eval_transform(ts: TransformSpec) -> v2.Compose:
    """Deterministic: the transform whose outputs the activation cache stores."""
    if ts.crop == "none":
        geometry = [v2.Resize((ts.size, ts.size), interpolation=ts.interpolation_mode, antialias=True)]
    else:
        geometry = [v2.Resize(ts.resize_to, interpolation=ts.interpolation_mode, antialias=True), v2.CenterCrop(ts.size)]
    return v2.Compose(geometry + _to_normalized_tensor(ts))


AUGMENTATION_PRESETS = {
    # fastai 0.7: transforms_side_on (photos of things seen from the side) ...
    "side_on": dict(flip=True, vflip=False, rot90=False, rotate=10, lighting=0.05),
    # ... transforms_top_down (satellite, microscopy: any orientation is valid) ...
    "top_down": dict(flip=True, vflip=True, rot90=True, rotate=10, lighting=0.05),
    # ... and no geometry but the zoom, for glyphs such as digits where a flip is another glyph.
    "basic": dict(flip=False, vflip=False, rot90=False, rotate=5, lighting=0.05),
}
assert set(AUGMENTATION_PRESETS) == set(choices(AugmentationPreset)), "a preset here is a choice in precompute.settings"


@dataclass(frozen=True)
class Augmentation:
    """A stage's augmentation: a preset of ``AUGMENTATION_PRESETS`` and the largest zoom (None: the
    default), checked when built (ConfigError says what to change)."""
    preset: str | None = None
    max_zoom: float | None = None

    def __post_init__(self):  # settings.AugmentationSettings decides what is valid
        given = {"augmentation": self.preset, "max_zoom": self.max_zoom}
        AugmentationSettings.checked(**{k: v for k, v in given.items() if v is not None})


def train_transform(
    ts: TransformSpec, flip: bool = True, rotate: float = 10, lighting: float = 0.05, max_zoom: float = 1.1,
    vflip: bool = False, rot90: bool = False, preset: str | None = None,
) -> v2.Compose:
    """Random augmentation as fastai 0.7's presets; ``preset`` fills the arguments it names.

    A zoom of up to ``max_zoom`` keeps at least ``1/max_zoom**2`` of the area.
    """
    if preset is not None:
        if preset not in AUGMENTATION_PRESETS:
            raise ValueError(f"augmentation preset {preset!r}: choose one of {sorted(AUGMENTATION_PRESETS)}")
        p = AUGMENTATION_PRESETS[preset]
        flip, vflip, rot90, rotate, lighting = p["flip"], p["vflip"], p["rot90"], p["rotate"], p["lighting"]
    if max_zoom < 1:
        raise ValueError(f"max_zoom must be >= 1 (1 = no zoom), got {max_zoom}")
    steps = [v2.RandomResizedCrop(ts.size, scale=(1 / max_zoom**2, 1.0), interpolation=ts.interpolation_mode, antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if vflip:
        steps.append(v2.RandomVerticalFlip())
    if rot90:
        steps.append(v2.RandomChoice([v2.RandomRotation((a, a)) for a in (0, 90, 180, 270)]))
    if rotate:
        steps.append(v2.RandomRotation(rotate, interpolation=ts.interpolation_mode))
    if lighting:
        steps.append(v2.ColorJitter(brightness=lighting, contrast=lighting))
    return v2.Compose(steps + _to_normalized_tensor(ts))


def _checked_ids(paths: list[str], image_ids) -> list[str] | None:
    if image_ids is None:
        return None
    image_ids = [str(i) for i in image_ids]
    if len(image_ids) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(image_ids)} image ids")
    return image_ids


class ImageDataset(torch.utils.data.Dataset):
    """(transformed image, label) pairs; label is -1 when unlabeled.

    ``labels`` are class indices, or a 2-d multi-hot array (one float32 vector per image) for
    multi-label targets. With ``image_ids`` (the manifest's, one per path) each image is read once,
    checked against its id and decoded from those bytes (``images.read_checked``): a file changed
    since the scan fails as ``ChangedSinceScan`` instead of giving another picture's pixels.
    """

    def __init__(self, paths, labels, transform, image_ids=None):
        self.paths = [str(p) for p in paths]
        self.image_ids = _checked_ids(self.paths, image_ids)
        if labels is not None and len(labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(labels)} labels")
        if labels is not None and np.ndim(labels) == 2:
            self.labels = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        else:
            self.labels = None if labels is None else [int(x) for x in labels]
        self.transform = transform

    @classmethod
    def from_manifest(cls, manifest: pd.DataFrame, split: str, transform, classes: list[str] | None = None):
        """Usable rows of ``split``, labels indexed into ``classes`` (default: ``class_names``)."""
        rows = ok_rows(manifest, split)
        classes = classes or class_names(manifest)
        if is_multilabel(manifest):
            return cls(rows["path"].tolist(), multi_hot(rows["label"], classes, label_delim(manifest)), transform)
        index = {c: i for i, c in enumerate(classes)}
        unknown = set(rows["label"]) - index.keys()
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} in split {split!r} are not in classes; pass the full class list")
        return cls(rows["path"].tolist(), [index[x] for x in rows["label"]], transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        data = None if self.image_ids is None else read_checked(self.paths[i], self.image_ids[i])
        x = decode_transform(self.paths[i], self.transform, data)
        return x, (self.labels[i] if self.labels is not None else -1)


def decode_transform(path: str, transform, data: bytes | None = None):
    """``transform`` of the image at ``path`` decoded by ``load_rgb`` (from ``data`` when its bytes are
    at hand); any failure is an ``ImageLoadError`` naming the file."""
    try:  # the file may have changed since the scan: fail naming it, never with a bare MemoryError
        img = load_rgb(path if data is None else io.BytesIO(data))
        if problem := shape_problem(*img.size):  # before the resize that would need the memory
            raise ValueError(problem)
        return transform(img)
    except Exception as e:  # noqa: BLE001 - decode errors are OSError, SyntaxError, ValueError, MemoryError ...
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e


class EncodedImageDataset(torch.utils.data.Dataset):
    """For decoding on the GPU: ``(tensor, encoded)`` per image. A JPEG the device decoder takes
    (``images.device_decodable``) comes as its file's bytes, a 1-d uint8 tensor, ``encoded=True``;
    any other image is decoded and transformed here on the CPU as ``ImageDataset`` does (``False``).
    ``image_ids``: as ``ImageDataset``'s, the bytes handed on are the bytes checked."""

    def __init__(self, paths, transform, image_ids=None):
        self.paths, self.transform = [str(p) for p in paths], transform
        self.image_ids = _checked_ids(self.paths, image_ids)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        data = read_checked(path, None if self.image_ids is None else self.image_ids[i])
        if device_decodable(data) is None:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), True
        return decode_transform(path, self.transform, data), False
