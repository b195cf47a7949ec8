"""What a source lists, before any file is read: which names are images, which paths lie inside a
root, how an undecodable name is shown, and the error for a source that cannot be listed.

The bottom of the data layer: ``sources`` (object storage), ``scan_index`` (the incremental scan)
and ``manifest`` (the rows) all build on it, so none of them imports another one upwards.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
     ".apng", ".avif", ".heic", ".heif"}  # phone formats: a row either way (not_image where PIL lacks the codec)
)


class ManifestError(ValueError):
    """The image source cannot be turned into a manifest; the message says how to fix it."""


def is_image_name(name: str) -> bool:
    # Path(name).suffix's answer without building a Path: called once per file of a scan
    dot = name.rfind(".")
    return dot > 0 and not name.startswith(".") and name[dot:].lower() in IMAGE_EXTENSIONS


def is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def printable(text: str) -> str:
    """``text`` as valid UTF-8: undecodable bytes of a file name shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
