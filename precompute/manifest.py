"""Image manifests: one row per image file, and a status for every file that cannot be used.

A manifest is a pandas DataFrame with one row per image file found (``MANIFEST_COLUMNS``), plus
one row per class folder that holds no image file. Rows are keyed by ``image_id``, the sha256 of
the file bytes, which is what the activation cache is addressed by. Files that cannot be used are
rows with a ``status`` code and a ``reason`` that says what to do; nothing is dropped silently.
Status codes (``STATUSES``):

- ``ok``            decodes fully and converts to RGB; width/height are the EXIF-oriented size ``load_rgb`` returns
- ``missing``       a CSV row whose file does not exist, or a broken symlink
- ``empty``         zero bytes
- ``not_image``     PIL cannot identify the format (e.g. a text file named ``.jpg``), or a CSV row whose path has no
                    image extension (never read)
- ``unreadable``    identified but fails to decode (truncated or corrupt), cannot be opened (permissions),
                    is not a regular file (a pipe, a device), or a folder that cannot be listed
- ``too_large``     more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression-bomb guard; never decoded)
- ``bad_shape``     one side more than ``MAX_ASPECT_RATIO`` times the other (e.g. 200000x2): resizing its shorter
                    side to the network's would need gigabytes (never decoded)
- ``duplicate``     a CSV row repeating the path and label of an earlier row: the image counts once, from the
                    first row (the reason names its line); the same path under another label is ``conflicting_label``
- ``failed``        not set here: an ``ok`` image that failed to decode or transform when its activations were
                    computed (changed since the scan, out of memory); downstream stages leave it out
- ``outside_root``  a symlink (file or folder) resolving outside the root (never read)
- ``bad_name``      a file or folder name that is not valid UTF-8 (never read; path shown with \\xNN escapes)
- ``unknown_label`` no class: empty CSV label, a file directly in a split folder, or a label not in ``classes``
- ``unknown_split`` a CSV split value not in ``splits``
- ``empty_class``   a class folder with no image file (the row is the folder: relpath ends in ``/``)
- ``unseen_class``  a validation image whose class has no usable training image: the model cannot
                    predict it, so it is left out of training and of the accuracy (logged as a warning)
- ``conflicting_label``  identical bytes under two or more labels: every copy is left out
- ``excluded``      not set here: dropped by a user's override CSV (``precompute.quality.overrides``); the file stays

Multi-label manifests (``build_manifest(csv, label_delim=" ")``, fastai's planet-style CSV with
several tags per image) keep one row per image; ``label`` holds its tags, sorted, without
duplicates, joined by the delimiter, and ``manifest.attrs["label_delim"]`` says how to split them.
``class_names`` is then the set of tags, ``multi_hot`` the targets; a tag no training image has
makes its validation images ``unseen_class`` (``precompute.labels``).

A file is checked by decoding it as ``precompute.images.load_rgb`` would; ``scan_images`` checks a
folder of any layout the same way, for prediction.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from precompute import scan_index, sources  # below the manifest in the data layer (tests/test_layers.py)
from precompute.images import image_hash, image_id_of, shape_problem, to_rgb
from precompute.labels import _canonical_tags, _tags_of, class_names, is_multilabel, label_delim, split_tags
from precompute.listing import _csv_entries, _folder_entries, _is_utf8
from precompute.paths import IMAGE_EXTENSIONS, ManifestError  # noqa: F401 - re-exported
from precompute.paths import is_image_name as _is_image_name
from precompute.paths import is_inside as _is_inside
from precompute.paths import printable as _printable

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image_id", "path", "relpath", "label", "split", "width", "height", "status", "reason"]
STATUSES = ("ok", "missing", "empty", "not_image", "unreadable", "too_large", "bad_shape", "outside_root", "bad_name",
            "unknown_label", "unknown_split", "empty_class", "unseen_class", "conflicting_label", "duplicate", "failed",
            "excluded")
_HASH_BLOCK = 1 << 20
_EXIF_ORIENTATION = 0x0112


def build_manifest(
    source: str | Path,
    root: str | Path | None = None,
    splits: tuple[str, ...] = ("train", "valid"),
    valid_fraction: float = 0.2,
    classes: list[str] | tuple[str, ...] | None = None,
    label_delim: str | None = None,
    *,
    storage_options: dict | None = None,
    scan=None,
) -> pd.DataFrame:
    """One row per image file under ``source``, sorted by (split, label, relpath).

    ``source`` is either
    - a folder in ImageNet layout, ``<source>/<split>/<class>/<file>`` (files may sit in
      subfolders of a class folder); ``root`` defaults to ``source``; or
    - a UTF-8 ``.csv`` with columns ``path,label[,split]`` (other columns are ignored), paths
      relative to ``root`` (default: the CSV's folder); absolute paths must lie inside ``root``.

    Without a split column (or for an empty split cell) the split is derived from the content
    hash: an image goes to ``splits[1]`` when ``int(image_id[:8], 16) / 2**32 < valid_fraction``,
    else ``splits[0]``. It is deterministic, stable when images are added, and keeps byte-identical
    copies in the same split.

    ``classes``, when given, is the full list of labels: any other label is ``unknown_label``
    (catches typos in a CSV). Validation images of a class without a usable training image are
    ``unseen_class``; identical bytes under different labels are ``conflicting_label``.

    ``label_delim`` (a CSV only) makes the manifest multi-label: each label cell holds several
    tags separated by it (``" "`` for fastai's planet CSV), ``classes`` then lists tags.

    In a folder, files without an image extension (and hidden files) are skipped and counted in the
    log; a CSV row naming such a file is a ``not_image`` row (the CSV asked for it).

    ``source`` may also be an fsspec URL (``s3://bucket/prefix/`` or ``s3://bucket/labels.csv``), read
    with ``storage_options`` (default ``$PRECOMPUTE_DATA_OPTIONS``): see ``precompute.sources``.
    ``scan`` (a ``precompute.scan_index.Scan``) names the scan index, so unchanged files are not
    read again, and receives the scan's counts in ``scan.stats``.
    """
    if sources.is_url(source):  # object storage: one listing, the same statuses (precompute/sources.py)
        entries, extra, root = sources.remote_entries(source, root, splits, label_delim, storage_options, _csv_entries)
    else:
        entries, extra, root = _local_entries(sources.local_path(source), root, splits, label_delim)

    rows = scan_index.scan_rows(source, entries, root, splits,  # reads only what the scan index lacks
                                lambda path, root, label, split: _inspect(path, root, label, split, splits), scan)
    del entries  # the listing (a path string a file) is done with: memory at ImageNet size, see _frame
    for row in rows + extra:
        if not row["split"]:  # files never read (missing, outside the root, duplicates) split by their path instead
            key = row["image_id"] or hashlib.sha256(row["relpath"].encode()).hexdigest()
            row["split"] = _hash_split(key, splits, valid_fraction)
    if classes is not None:
        _mark_unknown_labels(rows, classes, label_delim)
    _mark_conflicting_labels(rows)
    _mark_unseen_classes(rows, splits[0], label_delim)

    rows += extra
    df = _frame(rows)
    df.attrs["label_delim"] = label_delim or None  # pandas carries attrs through filters and pickling
    df.attrs["source"] = str(source)  # where the images came from: a tracked run names it (its dataset input)
    bad = df[df.status != "ok"]
    if len(bad):
        log.warning("%d of %d manifest rows are not usable: %s", len(bad), len(df), bad.status.value_counts().to_dict())
    return df


def _frame(rows: list[dict]) -> pd.DataFrame:
    """The manifest's DataFrame from its rows (emptied on the way), sorted by (split, label, relpath).

    Sorted as rows, then built column by column, each row's dict freed as soon as its values are in the
    columns: at 1,281,167 images the rows are ~270 bytes a file as dicts, and building from records then
    sorting the frame held the dicts, pandas' intermediate copies and two frames at once (issue 21: the
    scan's peak memory)."""
    rows.sort(key=lambda r: (r["split"], r["label"], r["relpath"]))  # stable, as sort_values(kind="stable")
    columns: dict[str, list] = {c: [None] * len(rows) for c in MANIFEST_COLUMNS}
    for i in range(len(rows)):
        row, rows[i] = rows[i], None
        for c, values in columns.items():
            values[i] = row[c]
    rows.clear()
    df = pd.DataFrame(columns, columns=MANIFEST_COLUMNS)
    columns.clear()
    return df.astype({"width": "Int64", "height": "Int64"})


def _local_entries(source, root, splits, label_delim):
    """(entries, extra rows, root) of a local folder or CSV; what build_manifest lists before inspecting."""
    source = Path(source).expanduser()
    if not source.exists():
        raise ManifestError(f"image source {source} does not exist: pass a folder (<split>/<class>/<file>) or a .csv")
    if not _is_utf8(str(source.resolve())):
        raise ManifestError(f"image source {_printable(str(source.resolve()))} has a name that is not valid UTF-8: "
                            "rename it (e.g. convmv -f latin1 -t utf8 --notest <path>)")
    extra: list[dict] = []
    if label_delim is not None and (not label_delim or label_delim.isalnum()):
        raise ManifestError(f"label_delim {label_delim!r}: give the character between an image's tags, e.g. ' ' or ';'")
    if source.is_dir():
        if label_delim:
            raise ManifestError(f"multi-label images (label_delim={label_delim!r}) need a CSV of path,label with "
                                "the tags in the label column; a folder gives one class per image")
        root = Path(root).expanduser().resolve() if root is not None else source.resolve()
        source = source.resolve()  # resolve folders once so relpaths are lexical; files stay unresolved
        if not _is_inside(source, root):
            raise ManifestError(f"folder {source} is not inside root {root}: pass a root that contains it, or no root")
        entries, extra = _folder_entries(source, root, splits)
    elif source.suffix.lower() == ".csv":
        root = Path(root).expanduser().resolve() if root is not None else source.resolve().parent
        entries, extra = _csv_entries(source, root, label_delim)
        if label_delim:
            entries = [(path, _canonical_tags(label, label_delim), split) for path, label, split in entries]
    else:
        raise ManifestError(f"image source {source} is neither a folder nor a .csv file")
    return entries, extra, root


def manifest_summary(manifest: pd.DataFrame, train_split: str = "train") -> dict:
    """What a manifest holds, for a report: usable and skipped rows, statuses, classes per split."""
    ok = ok_rows(manifest)
    classes = class_names(manifest)
    splits = sorted(set(manifest["split"]))
    return {
        "rows": len(manifest),
        "usable": len(ok),
        "skipped": len(manifest) - len(ok),
        "by_status": {k: int(v) for k, v in manifest["status"].value_counts().sort_index().items()},
        "usable_by_split": {s: int((ok["split"] == s).sum()) for s in splits},
        "classes": classes,
        "multilabel": is_multilabel(manifest),
        "classes_without_images_in": {s: sorted(set(classes) - _tags_of(ok.loc[ok["split"] == s, "label"],
                                                                        label_delim(manifest)))
                                      for s in splits if s != train_split},
        "in_several_splits": int((ok.groupby("image_id")["split"].nunique() > 1).sum()),
    }


def manifest_report(manifest: pd.DataFrame, scan_stats: dict, source: str, log=None) -> tuple[str, dict]:
    """What the ``image_manifest`` stage shows: (its data version, its metadata). The version is a
    digest of the image ids, labels, splits and statuses (``scan_index.manifest_digest``), so what
    depends on the manifest goes stale exactly when the images change. With ``log`` (.info and
    .warning), a line on the scan and one per skipped file."""
    bad = manifest[manifest["status"] != "ok"]
    if log is not None:
        log.info(f"scan: {scan_stats.get('read', 0)} files read, {scan_stats.get('reused', 0)} unchanged "
                 f"(scan index {scan_stats.get('index') or 'off'}) in {scan_stats.get('seconds', 0):.1f}s")
        for row in bad.itertuples():
            log.warning(f"skipped {row.relpath}: {row.status} ({row.reason})")
    counts = manifest.groupby(["split", "label", "status"]).size().rename("images").reset_index()
    version = scan_index.manifest_digest(manifest)
    return version, {
        "source": source, "images": len(manifest), "ok": int((manifest["status"] == "ok").sum()),
        "manifest_digest": version, "scan": {k: v for k, v in scan_stats.items() if v is not None},
        "not_usable": bad[["relpath", "status", "reason"]].to_markdown(index=False) if len(bad) else "none",
        "counts": counts.to_markdown(index=False), "summary": manifest_summary(manifest)}


def ok_rows(manifest: pd.DataFrame, split: str | None = None) -> pd.DataFrame:
    mask = manifest["status"] == "ok"
    if split is not None:
        mask &= manifest["split"] == split
    return manifest[mask].reset_index(drop=True)


def _mark_unknown_labels(rows: list[dict], classes, delim: str | None = None) -> None:
    known = set(classes)
    for row in rows:
        if row["status"] == "ok" and (unknown := sorted(set(split_tags(row["label"], delim)) - known)):
            what = f"label {row['label']!r} is" if delim is None else f"tag(s) {unknown} of {row['label']!r} are"
            row.update(status="unknown_label", reason=f"{what} not one of the classes "
                                                      f"{sorted(known)}: fix the label or add it to classes")


def _mark_conflicting_labels(rows: list[dict]) -> None:
    """Identical bytes under different labels: no copy can be right for both, so none is used."""
    copies = Counter(row["image_id"] for row in rows if row["status"] == "ok")
    by_id: dict[str, list[dict]] = defaultdict(list)
    for row in rows:  # only ids with copies are grouped: one list per row would be 100k lists on a big scan
        if row["status"] == "ok" and copies[row["image_id"]] > 1:
            by_id[row["image_id"]].append(row)
    leaked = 0
    for same in by_id.values():
        labels = sorted({r["label"] for r in same})
        if len(labels) > 1:
            for row in same:
                others = ", ".join(f"{o['relpath']} ({o['label']})" for o in same if o is not row)
                row.update(status="conflicting_label",
                           reason=f"the same image (identical bytes) is also {others}: keep one copy, under the right label")
        elif len({r["split"] for r in same}) > 1:
            leaked += 1
    if leaked:
        log.warning("%d images are in more than one split (identical bytes): validation accuracy is optimistic; "
                    "keep each image in one split", leaked)


def _mark_unseen_classes(rows: list[dict], train_split: str, delim: str | None = None) -> None:
    """Validation images of a class the model has no training image for: left out, with a warning."""
    trained = _tags_of((r["label"] for r in rows if r["status"] == "ok" and r["split"] == train_split), delim)
    unseen: dict[str, int] = defaultdict(int)
    for row in rows:
        if row["status"] != "ok" or row["split"] == train_split or (delim is None and row["label"] in trained):
            continue
        for cls in (c for c in split_tags(row["label"], delim) if c not in trained):
            unseen[cls] += 1
            row.update(status="unseen_class",
                       reason=f"class {cls!r} has no usable {train_split!r} image, so the model cannot predict "
                              f"it: left out of training and accuracy; add {train_split} images of {cls!r}")
    if unseen:
        log.warning("classes with validation images but no usable training image, left out: %s", dict(unseen))


def _inspect(path: Path, root: Path, label: str, split: str, splits) -> dict:
    """Hash and fully decode one file; any failure becomes a status, never an exception."""
    row = dict(image_id="", path=_printable(str(path)), relpath=_printable(path.relative_to(root).as_posix()),
               label=_printable(label), split=split, width=None, height=None, status="ok", reason="")

    def fail(status: str, reason: str) -> dict:
        row.update(status=status, reason=reason)
        return row

    if not _is_utf8(str(path)):  # pandas, JSON, MLflow and Dagster all need UTF-8 text
        part = next(p for p in reversed(path.parts) if not _is_utf8(p))
        return fail("bad_name", f"name '{_printable(part)}' is not valid UTF-8: rename it "
                                "(e.g. convmv -f latin1 -t utf8 -r --notest <folder>)")
    target = path.resolve()
    if not _is_inside(target, root):  # checked before reading: never open files outside the root
        return fail("outside_root", f"resolves to {target}, outside {root}; copy the file under the root")
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            return fail("missing", f"broken symlink to {os.readlink(path)}; fix or remove it")
        return fail("missing", "file not found; fix the path or remove the row")
    except OSError as e:
        return fail("unreadable", f"{type(e).__name__}: {e}")
    if not stat.S_ISREG(st.st_mode):  # a pipe could block a read forever
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, socket or device)"
        return fail("unreadable", f"{kind}; never opened: replace it with an image file")
    if st.st_size == 0:
        row["image_id"] = image_id_of(b"")
        return fail("empty", "file has zero bytes")
    try:
        row["image_id"] = _sha256(path)
        with Image.open(path) as img:
            w, h = img.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and w * h > limit:  # PIL only warns up to 2x the limit; refuse before decoding
                return fail("too_large", f"{w}x{h} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS={limit}")
            if problem := shape_problem(w, h):
                return fail("bad_shape", problem)
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            img.draft(img.mode, (1, 1))  # JPEG: decode at 1/8 scale; every byte is still read, so truncation shows
            img.load()
            to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)  # what load_rgb does after decoding
    except Image.DecompressionBombError as e:
        return fail("too_large", str(e))
    except UnidentifiedImageError:
        return fail("not_image", "not an image format PIL can identify: convert it to JPEG or PNG")
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


def scan_images(folder: str | Path) -> pd.DataFrame:
    """Every file under ``folder`` in any layout, checked like a manifest row (for prediction).

    Files without an image extension are rows too (``not_image``), so a prediction lists them.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder: pass the folder of images to predict")
    root = folder.resolve()
    rows = []
    for path in sorted(p for p in root.rglob("*") if not p.is_dir() and not p.name.startswith(".")):
        if _is_image_name(path.name):
            row = _inspect(path, root, "?", "", ())  # "?": no label is expected here
        else:
            row = dict(image_id="", path=str(path), relpath=path.relative_to(root).as_posix(), width=None,
                       height=None, status="not_image", reason=f"extension {path.suffix!r} is not an image type")
        rows.append({**row, "label": "", "split": ""})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _sha256(path: Path) -> str:
    digest = image_hash()  # the hash precompute.images.read_checked checks the bytes it decodes against
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _hash_split(key: str, splits, valid_fraction: float) -> str:
    if len(splits) < 2:
        raise ManifestError(f"need two splits (train, valid) to split by hash, got {list(splits)}")
    return splits[1] if int(key[:8], 16) / 2**32 < valid_fraction else splits[0]
