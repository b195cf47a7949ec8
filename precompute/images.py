"""Decoding: an image file as 8-bit RGB, and the shapes the network cannot take.

``load_rgb`` is what every stage reads images with; the manifest scan (``precompute.manifest``)
decodes each file the same way (``to_rgb``) and refuses shapes ``shape_problem`` names, so an
``ok`` row is an image that loads. ``ImageLoadError`` names a file that failed later anyway.

``read_checked`` is how the precompute reads an image: its bytes once, hashed with the manifest's
hash (``image_hash``) and compared with the row's ``image_id``, then decoded from those very bytes.
A file replaced after the scan is ``ChangedSinceScan``, never a row under the old image's hash.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Transforms resize the shorter side to ``resize`` (256 for 224 px) and keep the aspect ratio, so a
# 200000x2 image of 1 KB would become 25.6M x 256 pixels (20 GB as RGB bytes) before the crop.
# Bounding the ratio bounds that resized image at MAX_ASPECT_RATIO * resize**2 pixels: 3.3M (10 MB)
# at 256, 68M at 1170 (size 1024). Real photos and panoramas stay well under 50:1.
MAX_ASPECT_RATIO = 50


class ImageLoadError(RuntimeError):
    """One image failed to decode or transform after the scan said ``ok``; names the file and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)  # both in args: the error pickles across DataLoader workers
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


CHANGED_SINCE_SCAN = "changed_since_scan"  # the reason's first word: a failed row whose file changed after the scan


class ChangedSinceScan(ImageLoadError):
    """The bytes read now do not hash to the manifest's ``image_id``: the file changed after the scan."""

    @classmethod
    def of(cls, path: str, expected: str, found: str) -> "ChangedSinceScan":
        return cls(path, f"{CHANGED_SINCE_SCAN}: its bytes now hash to {found[:16]}, not to the manifest's image_id "
                         f"{expected[:16]} (replaced or edited after the scan); nothing is stored for it. Scan again "
                         "(build_manifest, or materialize image_manifest) to compute the image as it is now; a file "
                         "rewritten with the same size and modification time needs a full rescan (the images "
                         "resource's full_rescan, or Scan(full_rescan=True))")


def image_hash():
    """The hash a manifest keys an image's bytes by (its ``image_id``, hex): sha256. The scan and
    ``read_checked`` both use this one, so a row's id is the hash of the bytes decoded for it."""
    return hashlib.sha256()


def image_id_of(data: bytes) -> str:
    h = image_hash()
    h.update(data)
    return h.hexdigest()


def _read_local(path: str) -> bytes:
    """A local file's bytes, refusing anything but a regular file: a file swapped for a pipe or a
    device after the scan must not block or stream forever (opened non-blocking, checked before reading)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("no longer a regular file (a folder, pipe, socket or device)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes, from a local path (a regular file only) or an object-storage URL (precompute/sources.py)."""
    if isinstance(path, str) and "://" in path:
        from precompute.sources import open_image

        return open_image(path).getvalue()
    return _read_local(path)


def read_checked(path: str, image_id: str | None) -> bytes:
    """The bytes of the image at ``path`` (a local path, following symlinks, or a URL), read once and
    checked against the manifest's ``image_id`` (unless None): ``ChangedSinceScan`` when they hash to
    something else, ``ImageLoadError`` naming the file when it cannot be read. Decode from what this returns."""
    try:
        data = read_bytes(path)
    except Exception as e:  # noqa: BLE001 - missing, unreadable, a network error: this file's failure, named
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e
    if image_id is None:
        return data
    found = image_id_of(data)
    if found != image_id:
        raise ChangedSinceScan.of(path, image_id, found)
    return data


def shape_problem(width: int, height: int) -> str | None:
    """Why an image of this size cannot be resized for the network (see MAX_ASPECT_RATIO); None if it can."""
    short, long = sorted((width, height))
    if long <= MAX_ASPECT_RATIO * short:
        return None
    return (f"{width}x{height} pixels: aspect ratio {long / max(short, 1):.0f}:1 exceeds {MAX_ASPECT_RATIO}:1, and "
            f"resizing its shorter side to 256 would make it {long * 256 // max(short, 1):,} pixels long; "
            "crop or pad it to a saner shape")


def load_rgb(path: str | Path | io.BytesIO) -> Image.Image:
    """Decode an image (a path, a URL, or its bytes in a BytesIO) as 8-bit RGB in its EXIF orientation.

    Alpha (RGBA, LA, transparent palettes) is composited onto white: transparent pixels often
    hold arbitrary colour (commonly black) that dropping alpha would expose. 16-bit images are
    scaled to 8 bits (65535 -> 255) instead of being clipped. CMYK is converted by PIL.
    """
    if isinstance(path, str) and "://" in path:  # an image in object storage (precompute/sources.py)
        from precompute.sources import open_image

        path = open_image(path)
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


EXIF_ORIENTATION = 0x0112


def device_decodable(data: bytes) -> str | None:
    """None when the GPU's JPEG decoder (nvjpeg, via torchvision) gives the pixels ``load_rgb`` means:
    a baseline or progressive JPEG of 3 colour components with no EXIF rotation and a sane shape.
    Otherwise why not, and the image is decoded on the CPU instead: other formats, greyscale and
    CMYK JPEGs (their colour conversion is load_rgb's), EXIF orientation (torchvision applies it on
    the CPU only) and shapes ``shape_problem`` refuses (so they fail as they do on the CPU).
    Reads the header only (PIL opens lazily): no pixel is decoded here."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                return f"{img.format or 'unknown format'}, not a JPEG"
            if img.mode != "RGB":
                return f"a {img.mode} JPEG"
            if img.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
                return "EXIF orientation to apply"
            if shape_problem(*img.size):
                return "aspect ratio"
    except Exception as e:  # noqa: BLE001 - the CPU path decodes it, or says why it cannot
        return f"header does not parse ({type(e).__name__})"
    return None
