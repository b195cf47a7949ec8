"""Which files a source names, before any is read: the folder layout (``train/<class>/*``) and the
rows of a CSV (``path,label[,split]``), with a row for every folder or CSV line that cannot give an
image (empty class folders, names that are not UTF-8, symlinks out of the root, CSV rows without an
image extension, duplicates). ``precompute.manifest`` then reads and checks the files.
"""

from __future__ import annotations

import csv as _csv
import io
import logging
import os
from pathlib import Path

import pandas as pd

from precompute.labels import _canonical_tags
from precompute.paths import IMAGE_EXTENSIONS, ManifestError
from precompute.paths import is_image_name as _is_image_name
from precompute.paths import is_inside as _is_inside
from precompute.paths import printable as _printable

log = logging.getLogger("precompute.manifest")


def _under_root(path: Path, root: Path) -> Path | None:
    """``path`` (absolute) normalised, if it lies under ``root`` (resolved) without following the file itself."""
    lexical = Path(os.path.normpath(path))
    if _is_inside(lexical, root):
        return lexical
    # An absolute path may name the root through a symlinked folder (/tmp -> /private/tmp).
    canonical = Path(os.path.realpath(lexical.parent)) / lexical.name
    return canonical if _is_inside(canonical, root) else None


def _is_utf8(text: str) -> bool:
    """False for names with bytes that are not UTF-8 (Python keeps them as surrogate escapes)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _folder_row(folder: Path, root: Path, label: str, split: str, status: str, reason: str) -> dict:
    return dict(image_id="", path=_printable(str(folder)), relpath=_printable(folder.relative_to(root).as_posix()) + "/",
                label=_printable(label), split=split, width=None, height=None, status=status, reason=reason)


def _folder_entries(source: Path, root: Path, splits) -> tuple[list[tuple[Path, str, str]], list[dict]]:
    """(files to inspect, rows for folders: empty class folders, unlistable folders, folder
    symlinks leaving the root). Folder symlinks inside the root are followed, each real folder once."""
    split_dirs = [(s, source / s) for s in splits if (source / s).is_dir()]
    if not split_dirs:
        raise ManifestError(
            f"no split folders {list(splits)} in {source}: expected {source}/<split>/<class>/<image>; "
            "pass splits=... with the folder names you have, or give a CSV of path,label[,split]"
        )
    entries, folders, skipped = [], [], 0
    for split, split_dir in split_dirs:
        seen = {os.path.realpath(split_dir)}
        images_in_class: dict[str, int] = {}
        unlisted: set[str] = set()  # classes with a folder that could not be listed: not "empty"

        def unlistable(exc: OSError, split=split, split_dir=split_dir, unlisted=unlisted) -> None:
            folder = Path(exc.filename)
            parts = folder.relative_to(split_dir).parts
            unlisted.update(parts[:1])
            folders.append(_folder_row(folder, root, parts[0] if parts else "", split, "unreadable",
                                       f"cannot list this folder ({exc.strerror or exc}): its images are not in "
                                       "the manifest; fix its permissions"))

        for dirpath, dirnames, filenames in os.walk(split_dir, onerror=unlistable, followlinks=True):
            here = Path(dirpath)
            parts = here.relative_to(split_dir).parts
            # The class is the first folder below the split; files directly in the split have none.
            label = parts[0] if parts else ""
            keep = []
            for d in sorted(dirnames):
                if d.startswith("."):
                    continue
                real = os.path.realpath(here / d)
                if not _is_inside(Path(real), root):  # only a symlink can lead out of the root
                    folders.append(_folder_row(here / d, root, label or d, split, "outside_root",
                                               f"folder symlink to {_printable(real)}, outside {root}: its files are "
                                               "never read; copy them under the root"))
                elif real in seen:  # a second way into a folder already walked (or a symlink loop)
                    log.info("not walking %s again: it is %s, already in the manifest", here / d, real)
                else:
                    seen.add(real)
                    keep.append(d)
            dirnames[:] = keep
            if not parts:
                images_in_class.update({d: 0 for d in keep})
            folder = dirpath + os.sep
            for name in sorted(filenames):
                if _is_image_name(name):
                    entries.append((folder + name, label, split))  # a str: 5x cheaper than a Path
                    if label:
                        images_in_class[label] += 1
                else:
                    skipped += 1
        for cls, n in images_in_class.items():
            if n == 0 and cls not in unlisted:
                folders.append(_folder_row(split_dir / cls, root, cls, split, "empty_class",
                                           f"class folder has no image file ({' '.join(sorted(IMAGE_EXTENSIONS))}): "
                                           "add images or remove the folder"))
    if skipped:
        log.info("skipped %d non-image files under %s", skipped, source)
    if not entries:
        raise ManifestError(
            f"no image files under {source}/{{{','.join(splits)}}}/<class>/ "
            f"(extensions {' '.join(sorted(IMAGE_EXTENSIONS))}): check the layout and file names"
        )
    for row in folders:
        log.warning("%s %s: %s", row["status"], row["relpath"], row["reason"])
    return entries, folders


def _read_csv(csv: Path) -> pd.DataFrame:
    """The CSV as strings, strictly: UTF-8, one field per header column (a short row is padded)."""
    data = csv.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a BOM (Excel's "CSV UTF-8") is dropped
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ManifestError(f"{csv} line {line} is not UTF-8 (byte {data[e.start]:#04x}): save the CSV as UTF-8, "
                            "and rename files whose names are not UTF-8") from None
    reader = _csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header:
            raise ManifestError(f"{csv} is empty: it needs a header row path,label[,split] and one row per image")
        records = []
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue  # blank line
            if len(fields) > len(header):  # pandas would silently shift such a row into an index
                raise ManifestError(f"{csv} line {reader.line_num} has {len(fields)} fields but the header has "
                                    f"{len(header)}: quote paths or labels that contain commas")
            records.append(fields + [""] * (len(header) - len(fields)))
    except _csv.Error as e:
        raise ManifestError(f"{csv} line {reader.line_num} cannot be parsed ({e}): fix its quoting") from None
    return pd.DataFrame(records, columns=header, dtype=object)


def _csv_entries(csv: Path, root: Path, delim: str | None = None) -> tuple[list[tuple[Path, str, str]], list[dict]]:
    """(files to inspect, rows made without a read): a path listed again with the same label is a
    ``duplicate`` row and counts once; a path without an image extension is a ``not_image`` row (never read)."""
    table = _read_csv(csv)
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

    entries, skipped, duplicates = [], [], []
    first_line: dict[tuple[Path, str], int] = {}  # (path, label) -> the line that lists it first
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
        label, split = rec["label"].strip(), rec["split"].strip() if has_split else ""
        if not _is_image_name(path.name):  # listed on purpose, so a row says why it is not used
            skipped.append(_unread_row(path, root, label, split, "not_image",
                                       f"line {line}: extension {path.suffix or '(none)'!r} is not an image type "
                                       f"({' '.join(sorted(IMAGE_EXTENSIONS))}); never read: convert the file to "
                                       "JPEG or PNG, fix the path, or remove the row"))
            continue
        # Same path, other label: both are inspected and become conflicting_label (no copy can be right).
        same = (path, label if delim is None else _canonical_tags(label, delim))
        if same in first_line:
            duplicates.append(_unread_row(path, root, label, split, "duplicate",
                                          f"line {line} repeats line {first_line[same]} (same path and label): the "
                                          "image counts once, from that line; remove this row"))
            continue
        first_line[same] = line
        entries.append((path, label, split))
    if skipped:
        log.warning("%d CSV rows of %s name a file without an image extension: rows with status 'not_image', "
                    "never read", len(skipped), csv)
    if duplicates:
        log.warning("%d CSV rows of %s repeat the path and label of an earlier row: each image counts once; "
                    "remove the repeated rows (status 'duplicate')", len(duplicates), csv)
    if not entries:
        raise ManifestError(f"{csv} lists no image files; paths must end in one of {' '.join(sorted(IMAGE_EXTENSIONS))}")
    return entries, duplicates + skipped


def _unread_row(path: Path, root: Path, label: str, split: str, status: str, reason: str) -> dict:
    """The row of a CSV line whose file is never read (a repeat, or no image extension)."""
    return dict(image_id="", path=_printable(str(path)), relpath=_printable(path.relative_to(root).as_posix()),
                label=_printable(label), split=split, width=None, height=None, status=status, reason=reason)
