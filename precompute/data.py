"""Image manifests, decoding and transforms.

A manifest is a pandas DataFrame with one row per image file found (``MANIFEST_COLUMNS``).
Rows are keyed by ``image_id``, the sha256 of the file bytes, which is what the activation
cache is addressed by. Files that cannot be used are rows with a ``status`` code and a
``reason``; nothing is dropped silently. Status codes:

- ``ok``            decodes fully; width/height are the EXIF-oriented size ``load_rgb`` returns
- ``missing``       a CSV row whose file does not exist
- ``empty``         zero bytes
- ``not_image``     PIL cannot identify the format (e.g. a text file named ``.jpg``)
- ``unreadable``    identified but fails to decode (truncated or corrupt)
- ``too_large``     more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression-bomb guard)
- ``outside_root``  a symlink resolving outside the root (never read)
- ``unknown_label`` no class: empty CSV label, or a file directly in a split folder
- ``unknown_split`` a CSV split value not in ``splits``
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode, v2

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image_id", "path", "relpath", "label", "split", "width", "height", "status", "reason"]
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
_HASH_BLOCK = 1 << 20
_EXIF_ORIENTATION = 0x0112


class ManifestError(ValueError):
    """The image source cannot be turned into a manifest; the message says how to fix it."""


# --------------------------------------------------------------------------- manifest


def build_manifest(
    source: str | Path,
    root: str | Path | None = None,
    splits: tuple[str, ...] = ("train", "valid"),
    valid_fraction: float = 0.2,
) -> pd.DataFrame:
    """One row per image file under ``source``, sorted by (split, label, relpath).

    ``source`` is either
    - a folder in ImageNet layout, ``<source>/<split>/<class>/<file>`` (files may sit in
      subfolders of a class folder); ``root`` defaults to ``source``; or
    - a ``.csv`` with columns ``path,label[,split]`` (other columns are ignored), paths relative
      to ``root`` (default: the CSV's folder); absolute paths must lie inside ``root``.

    Without a split column (or for an empty split cell) the split is derived from the content
    hash: an image goes to ``splits[1]`` when ``int(image_id[:8], 16) / 2**32 < valid_fraction``,
    else ``splits[0]``. It is deterministic, stable when images are added, and keeps byte-identical
    copies in the same split.

    Files without an image extension (and hidden files) are skipped and counted in the log.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise ManifestError(f"image source {source} does not exist: pass a folder (<split>/<class>/<file>) or a .csv")
    if source.is_dir():
        root = Path(root).expanduser().resolve() if root is not None else source.resolve()
        source = source.resolve()  # resolve folders once so relpaths are lexical; files stay unresolved
        if not _is_inside(source, root):
            raise ManifestError(f"folder {source} is not inside root {root}: pass a root that contains it, or no root")
        entries = _folder_entries(source, splits)
    elif source.suffix.lower() == ".csv":
        root = Path(root).expanduser().resolve() if root is not None else source.resolve().parent
        entries = _csv_entries(source, root)
    else:
        raise ManifestError(f"image source {source} is neither a folder nor a .csv file")

    rows = [_inspect(path, root, label, split, splits) for path, label, split in entries]
    for row in rows:
        if not row["split"]:  # files never read (missing, outside the root) split by their path instead
            key = row["image_id"] or hashlib.sha256(row["relpath"].encode()).hexdigest()
            row["split"] = _hash_split(key, splits, valid_fraction)

    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    df = df.astype({"width": "Int64", "height": "Int64"})
    df = df.sort_values(["split", "label", "relpath"], kind="stable", ignore_index=True)
    bad = df[df.status != "ok"]
    if len(bad):
        log.warning("%d of %d images are not usable: %s", len(bad), len(df), bad.status.value_counts().to_dict())
    return df


def class_names(manifest: pd.DataFrame) -> list[str]:
    """Sorted labels of usable rows; a label's index here is its class index."""
    return sorted(ok_rows(manifest)["label"].unique().tolist())


def ok_rows(manifest: pd.DataFrame, split: str | None = None) -> pd.DataFrame:
    mask = manifest["status"] == "ok"
    if split is not None:
        mask &= manifest["split"] == split
    return manifest[mask].reset_index(drop=True)


def _is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _under_root(path: Path, root: Path) -> Path | None:
    """``path`` (absolute) normalised, if it lies under ``root`` (resolved) without following the file itself."""
    lexical = Path(os.path.normpath(path))
    if _is_inside(lexical, root):
        return lexical
    # An absolute path may name the root through a symlinked folder (/tmp -> /private/tmp).
    canonical = Path(os.path.realpath(lexical.parent)) / lexical.name
    return canonical if _is_inside(canonical, root) else None


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _folder_entries(source: Path, splits) -> list[tuple[Path, str, str]]:
    split_dirs = [(s, source / s) for s in splits if (source / s).is_dir()]
    if not split_dirs:
        raise ManifestError(
            f"no split folders {list(splits)} in {source}: expected {source}/<split>/<class>/<image>; "
            "pass splits=... with the folder names you have, or give a CSV of path,label[,split]"
        )
    entries, skipped = [], 0
    for split, split_dir in split_dirs:
        for dirpath, dirnames, filenames in os.walk(split_dir):  # symlinked folders are not followed
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            here = Path(dirpath)
            # The class is the first folder below the split; files directly in the split have none.
            label = here.relative_to(split_dir).parts[0] if here != split_dir else ""
            for name in sorted(filenames):
                if _is_image_name(name):
                    entries.append((here / name, label, split))
                else:
                    skipped += 1
    if skipped:
        log.info("skipped %d non-image files under %s", skipped, source)
    if not entries:
        raise ManifestError(
            f"no image files under {source}/{{{','.join(splits)}}}/<class>/ "
            f"(extensions {' '.join(sorted(IMAGE_EXTENSIONS))}): check the layout and file names"
        )
    return entries


def _csv_entries(csv: Path, root: Path) -> list[tuple[Path, str, str]]:
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise ManifestError(
            f"{csv} lacks column(s) {sorted(missing)} (has {list(table.columns)}): "
            "it needs a header row with path,label and optionally split"
        )
    if extra := set(table.columns) - {"path", "label", "split"}:
        log.info("ignoring columns %s in %s", sorted(extra), csv)
    has_split = "split" in table.columns

    entries, skipped = [], 0
    for line, rec in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        raw = rec["path"].strip()
        if not raw:
            raise ManifestError(f"{csv} line {line}: empty path; every row needs the path of an image")
        # A path escaping the root is a broken CSV, not a broken image: refuse the whole file.
        path = _under_root(root / Path(raw).expanduser(), root)  # root / absolute == absolute
        if path is None:
            raise ManifestError(
                f"{csv} line {line}: path {raw!r} is outside the root {root}; "
                "move the image under the root or pass root=... that contains it"
            )
        if _is_image_name(path.name):
            entries.append((path, rec["label"].strip(), rec["split"].strip() if has_split else ""))
        else:
            skipped += 1
    if skipped:
        log.info("skipped %d CSV rows without an image extension in %s", skipped, csv)
    if not entries:
        raise ManifestError(f"{csv} lists no image files; paths must end in one of {' '.join(sorted(IMAGE_EXTENSIONS))}")
    return entries


def _inspect(path: Path, root: Path, label: str, split: str, splits) -> dict:
    """Hash and fully decode one file; any failure becomes a status, never an exception."""
    row = dict(image_id="", path=str(path), relpath=path.relative_to(root).as_posix(), label=label, split=split,
               width=None, height=None, status="ok", reason="")

    def fail(status: str, reason: str) -> dict:
        row.update(status=status, reason=reason)
        return row

    target = path.resolve()
    if not _is_inside(target, root):  # checked before reading: never open files outside the root
        return fail("outside_root", f"resolves to {target}, outside {root}; copy the file under the root")
    if not path.is_file():
        return fail("missing", "file not found; fix the path or remove the row")
    if path.stat().st_size == 0:
        row["image_id"] = hashlib.sha256(b"").hexdigest()
        return fail("empty", "file has zero bytes")
    row["image_id"] = _sha256(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > Image.MAX_IMAGE_PIXELS:  # PIL only warns up to 2x the limit; refuse before decoding
                return fail("too_large", f"{w}x{h} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}")
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            img.draft(img.mode, (1, 1))  # JPEG: decode at 1/8 scale; every byte is still read, so truncation shows
            img.load()
    except Image.DecompressionBombError as e:
        return fail("too_large", str(e))
    except UnidentifiedImageError:
        return fail("not_image", "not an image format PIL can identify")
    except Exception as e:  # truncated / corrupt data surfaces as OSError, SyntaxError, ValueError...
        return fail("unreadable", f"{type(e).__name__}: {e}")
    if orientation in (5, 6, 7, 8):  # these EXIF orientations swap width and height
        w, h = h, w
    row.update(width=w, height=h)
    if not label:
        return fail("unknown_label", "no class label: put the file in a class folder or fill the CSV's label")
    if split and split not in splits:
        return fail("unknown_split", f"split {split!r} is not one of {list(splits)}; fix it or pass splits=...")
    return row


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _hash_split(key: str, splits, valid_fraction: float) -> str:
    if len(splits) < 2:
        raise ManifestError(f"need two splits (train, valid) to split by hash, got {list(splits)}")
    return splits[1] if int(key[:8], 16) / 2**32 < valid_fraction else splits[0]


# --------------------------------------------------------------------------- decoding


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image as 8-bit RGB in its EXIF orientation.

    Alpha (RGBA, LA, transparent palettes) is composited onto white: transparent pixels often
    hold arbitrary colour (commonly black) that dropping alpha would expose. 16-bit images are
    scaled to 8 bits (65535 -> 255) instead of being clipped. CMYK is converted by PIL.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)  # returns a loaded copy, independent of the file
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64) / 257.0  # 16-bit range onto 8-bit, rounding
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------- transforms

_INTERPOLATIONS = {m.value: m for m in InterpolationMode}


@dataclass(frozen=True)
class TransformSpec:
    """Everything that determines the pixels fed to the network (part of the cache key)."""

    size: int = 224
    resize: int | None = None  # shorter side before the crop; None -> int(size * 256 / 224), 256 for 224
    crop: str = "center"  # "center" | "none" (squish the whole image to size x size)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self):
        # Lists from configs become tuples so the spec stays hashable and its key stable.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.crop not in ("center", "none"):
            raise ValueError(f"crop must be 'center' or 'none', got {self.crop!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        if self.size <= 0 or (self.resize is not None and self.resize < self.size):
            raise ValueError(f"need 0 < size <= resize, got size={self.size} resize={self.resize}")

    @property
    def resize_to(self) -> int:
        # torchvision's 256/224 ratio; fastai's 1.14 gives int(224 * 1.14) == 255 in floating point
        return self.resize if self.resize is not None else int(self.size * 256 / 224)

    @property
    def interpolation_mode(self) -> InterpolationMode:
        return _INTERPOLATIONS[self.interpolation]

    def key(self) -> dict:
        """JSON-able dict of every field; resize is resolved so equivalent specs share a key."""
        d = asdict(self)
        d.update(resize=self.resize_to, mean=list(self.mean), std=list(self.std))
        return d

    @classmethod
    def for_arch(cls, spec, size: int | None = None, **overrides) -> "TransformSpec":
        """Normalization and input size from an arch record (``mean``, ``std``, ``input_size``).

        ``input_size`` may be an int or a timm-style ``(C, H, W)`` tuple (square assumed).
        """
        default = spec.input_size if isinstance(spec.input_size, int) else spec.input_size[-1]
        fields = dict(size=size or default, mean=tuple(spec.mean), std=tuple(spec.std))
        return cls(**{**fields, **overrides})


def _to_normalized_tensor(ts: TransformSpec) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(ts.mean), list(ts.std))]


def eval_transform(ts: TransformSpec) -> v2.Compose:
    """Deterministic: the transform whose outputs the activation cache stores."""
    if ts.crop == "none":
        geometry = [v2.Resize((ts.size, ts.size), interpolation=ts.interpolation_mode, antialias=True)]
    else:
        geometry = [v2.Resize(ts.resize_to, interpolation=ts.interpolation_mode, antialias=True), v2.CenterCrop(ts.size)]
    return v2.Compose(geometry + _to_normalized_tensor(ts))


def train_transform(
    ts: TransformSpec, flip: bool = True, rotate: float = 10, lighting: float = 0.05, max_zoom: float = 1.1
) -> v2.Compose:
    """Random augmentation in the spirit of fastai 0.7's ``transforms_side_on``.

    A zoom of up to ``max_zoom`` keeps at least ``1/max_zoom**2`` of the area.
    """
    if max_zoom < 1:
        raise ValueError(f"max_zoom must be >= 1 (1 = no zoom), got {max_zoom}")
    steps = [v2.RandomResizedCrop(ts.size, scale=(1 / max_zoom**2, 1.0), interpolation=ts.interpolation_mode, antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if rotate:
        steps.append(v2.RandomRotation(rotate, interpolation=ts.interpolation_mode))
    if lighting:
        steps.append(v2.ColorJitter(brightness=lighting, contrast=lighting))
    return v2.Compose(steps + _to_normalized_tensor(ts))


class ImageDataset(torch.utils.data.Dataset):
    """(transformed image, label) pairs; label is -1 when unlabeled."""

    def __init__(self, paths, labels: list[int] | None, transform):
        self.paths = [str(p) for p in paths]
        if labels is not None and len(labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(labels)} labels")
        self.labels = None if labels is None else [int(x) for x in labels]
        self.transform = transform

    @classmethod
    def from_manifest(cls, manifest: pd.DataFrame, split: str, transform, classes: list[str] | None = None):
        """Usable rows of ``split``, labels indexed into ``classes`` (default: ``class_names``)."""
        rows = ok_rows(manifest, split)
        index = {c: i for i, c in enumerate(classes or class_names(manifest))}
        unknown = set(rows["label"]) - index.keys()
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} in split {split!r} are not in classes; pass the full class list")
        return cls(rows["path"].tolist(), [index[x] for x in rows["label"]], transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x = self.transform(load_rgb(self.paths[i]))
        return x, (self.labels[i] if self.labels is not None else -1)
