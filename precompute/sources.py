"""Image sources in object storage: any fsspec URL (``s3://bucket/prefix/``, ``gs://...``, ``memory://...``).

``build_manifest`` takes a URL wherever it takes a local path, in the same two layouts:

- a prefix in the folder layout, ``<prefix>/<split>/<class>/<file>``;
- a ``.csv`` object of ``path,label[,split]`` whose paths are keys relative to ``root`` (default:
  the CSV's own prefix); a path that leaves the root refuses the whole CSV, as for local files.

One listing of the prefix (``find``: one LIST request per 1,000 keys on S3) gives every object's
size and ETag (or version id), which is what the scan index compares (``precompute.scan_index``):
an unchanged object is never fetched. Objects that must be read are fetched with bounded
concurrency (``concurrency`` threads) and a timeout per object, written to a private temporary
file and checked there by the very ``_inspect`` that checks local files, so statuses and reasons are
the same; the rows then name the object: ``path`` is its URL, ``relpath`` its key under the root.

Reading images later (``load_rgb``, hence ``ImageDataset``) opens a ``path`` that has a protocol
through fsspec with the storage options registered for its URL by ``build_manifest`` in this
process, else those of ``$PRECOMPUTE_DATA_OPTIONS`` (JSON), which is what a step running in another
process (a Dagster multiprocess or k8s step) has.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import fsspec

from precompute.paths import IMAGE_EXTENSIONS, ManifestError, is_image_name

log = logging.getLogger("precompute.manifest")  # a listing's messages are the manifest's, local or remote

OPTIONS_ENV = "PRECOMPUTE_DATA_OPTIONS"
CONCURRENCY = 16  # objects fetched at once
TIMEOUT_S = 60.0  # per object, fetch and check together
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_LOCAL_PROTOCOLS = ("file", "local")
_registered: dict[str, dict] = {}  # URL prefix -> storage options, set by build_manifest in this process
_lock = threading.Lock()


def is_url(source) -> bool:
    """True for a URL fsspec opens remotely (``s3://``, ``gs://``, ``memory://``); False for local paths."""
    if not isinstance(source, str):
        return False
    m = _URL.match(source)
    return bool(m) and m.group(1).lower() not in _LOCAL_PROTOCOLS


def local_path(source):
    """A ``file://`` URL as a plain path; anything else unchanged."""
    if isinstance(source, str) and _URL.match(source) and _URL.match(source).group(1).lower() in _LOCAL_PROTOCOLS:
        return source.split("://", 1)[1]
    return source


def env_options() -> dict:
    text = os.environ.get(OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"${OPTIONS_ENV} is not JSON ({e}): give the fsspec storage options as a JSON object, "
                         'e.g. {"endpoint_url": "http://127.0.0.1:9000"}') from None
    if not isinstance(options, dict):
        raise ValueError(f"${OPTIONS_ENV} must be a JSON object of fsspec storage options, got {text!r}")
    return options


def register_options(url: str, options: dict | None) -> None:
    """Remember the storage options of an image source, for ``open_image`` in this process."""
    if options:
        with _lock:
            _registered[url.rstrip("/")] = dict(options)


def options_for(url: str) -> dict:
    """The storage options to open ``url``: the longest registered prefix, else ``$PRECOMPUTE_DATA_OPTIONS``."""
    with _lock:
        best = max((p for p in _registered if url == p or url.startswith(p + "/")), key=len, default=None)
        if best is not None:
            return dict(_registered[best])
    return env_options()


def filesystem(url: str, storage_options: dict | None = None):
    """``(fs, path)`` for ``url``; fsspec caches the instance, so every caller with the same options shares it.

    S3 gets connect and read timeouts unless the options set their own ``config_kwargs``.
    """
    options = dict(storage_options if storage_options is not None else options_for(url))
    protocol = _URL.match(url).group(1).lower() if _URL.match(url) else "file"
    if protocol in ("s3", "s3a") and "config_kwargs" not in options:
        options["config_kwargs"] = {"connect_timeout": 10, "read_timeout": TIMEOUT_S,
                                    "retries": {"max_attempts": 3, "mode": "standard"}}
    return fsspec.core.url_to_fs(url, **options)


def open_image(url: str) -> io.BytesIO:
    """The bytes of the image at ``url``, for ``PIL.Image.open``."""
    fs, path = filesystem(url)
    return io.BytesIO(fs.cat_file(path))


def endpoint_of(options: dict) -> str:
    """Where a source lives beyond its URL (S3's endpoint_url), so moto and AWS never share an index."""
    return str(options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url") or "")


# --------------------------------------------------------------------------- listing


def signature(info: dict) -> tuple[int, str]:
    """(size, content token) from a listing: S3's VersionId or ETag, GCS's generation, else a modification time."""
    for name in ("VersionId", "ETag", "etag", "generation", "md5Hash", "LastModified", "mtime", "updated", "created"):
        value = info.get(name)
        if value not in (None, ""):
            return int(info.get("size") or 0), f"{name}={value}"
    return int(info.get("size") or 0), ""


@dataclass
class RemoteRoot:
    """The root of a remote source: its objects as one listing, and how to reach them."""

    url: str  # protocol://bucket/prefix, no trailing slash
    fs: object
    base: str  # the fs path of the root (bucket/prefix)
    options: dict
    infos: dict[str, dict] = field(default_factory=dict)  # fs path of every object under the root -> info

    def __str__(self) -> str:
        return self.url

    def rel(self, key: str) -> str:
        return key[len(self.base) + 1:]

    def url_of(self, key: str) -> str:
        return self.fs.unstrip_protocol(key)

    def identity(self) -> list[str]:
        return [self.url, endpoint_of(self.options)]

    def list(self) -> None:
        forget_listings(self.fs, self.base)
        try:
            found = self.fs.find(self.base, detail=True, withdirs=True)
        except FileNotFoundError:
            found = {}
        self.infos = {k: v for k, v in found.items()}


def forget_listings(fs, base: str) -> None:
    """Drop every listing fsspec cached under ``base`` in this process (``invalidate_cache`` keeps the
    sub-folders'), so a scan sees objects written since, and opening one is not refused by a stale cache."""
    fs.invalidate_cache(base)
    cache = getattr(fs, "dircache", None)
    if cache is not None:
        for key in [k for k in list(cache) if k == base or k.startswith(base + "/")]:
            cache.pop(key, None)


def _canonical(fs, url: str) -> str:
    return fs._strip_protocol(url).rstrip("/")


def remote_entries(source: str, root: str | None, splits, label_delim: str | None, storage_options: dict | None,
                   csv_entries: Callable):
    """(entries, extra rows, RemoteRoot) of a URL, as ``build_manifest`` gets them for a local path.

    Entries are ``(fs path, label, split)``, multi-label tags already canonical as for a local CSV.
    ``csv_entries`` is the manifest's own CSV reader (``manifest._csv_entries``), handed down so a
    CSV in a bucket is read by the very code that reads a local one, without this module importing
    the manifest above it.
    """
    from precompute.labels import _canonical_tags  # pandas: only for a URL source, not when a sensor loads

    if label_delim is not None and (not label_delim or label_delim.isalnum()):
        raise ManifestError(f"label_delim {label_delim!r}: give the character between an image's tags, e.g. ' ' or ';'")

    options = dict(storage_options) if storage_options is not None else options_for(source)
    fs, path = filesystem(source, options)
    path = path.rstrip("/")
    if path.lower().endswith(".csv"):
        base = _canonical(fs, root) if root is not None else posixpath.dirname(path)
        top = RemoteRoot(fs.unstrip_protocol(base), fs, base, options)
        register_options(top.url, options)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise ManifestError(f"image source {source} does not exist: pass a prefix (<split>/<class>/<file>) "
                                "or a .csv") from None
        top.list()
        entries, extra = _remote_csv_entries(source, data, top, label_delim, csv_entries)
        if label_delim:
            entries = [(key, _canonical_tags(label, label_delim), split) for key, label, split in entries]
        return entries, extra, top
    if label_delim:
        raise ManifestError(f"multi-label images (label_delim={label_delim!r}) need a CSV of path,label with "
                            "the tags in the label column; a folder gives one class per image")
    base = _canonical(fs, root) if root is not None else path
    if not (path == base or path.startswith(base + "/")):
        raise ManifestError(f"prefix {source} is not inside root {root}: pass a root that contains it, or no root")
    top = RemoteRoot(fs.unstrip_protocol(base), fs, base, options)
    register_options(top.url, options)
    top.list()
    if not any(k == path or k.startswith(path + "/") for k in top.infos):
        raise ManifestError(f"image source {source} does not exist (no object under it): pass a prefix "
                            "(<split>/<class>/<file>) or a .csv")
    entries, extra = _remote_folder_entries(source, path, top, splits)
    return entries, extra, top


def _remote_folder_entries(source: str, path: str, top: RemoteRoot, splits):
    """The folder layout over a listing: what ``manifest._folder_entries`` does over a directory walk."""
    prefix = path + "/"
    present = {s for s in splits if any(k.startswith(f"{prefix}{s}/") for k in top.infos)}
    if not present:
        raise ManifestError(f"no split folders {list(splits)} in {source}: expected {source.rstrip('/')}/<split>/"
                            "<class>/<image>; pass splits=... with the folder names you have, or give a CSV of "
                            "path,label[,split]")
    entries, extra, skipped = [], [], 0
    for split in splits:
        if split not in present:
            continue
        classes: dict[str, int] = {}
        for key in sorted(k for k in top.infos if k.startswith(f"{prefix}{split}/")):
            parts = key[len(prefix) + len(split) + 1:].split("/")
            is_dir = top.infos[key].get("type") == "directory"
            if not parts[-1] or any(p.startswith(".") for p in (parts if is_dir else parts[:-1])):
                continue  # hidden folders are never walked; a key ending in / is a folder marker
            label = parts[0] if len(parts) > 1 or is_dir else ""
            if label:
                classes.setdefault(label, 0)
            if is_dir:
                continue
            if is_image_name(parts[-1]):
                entries.append((key, label, split))
                if label:
                    classes[label] += 1
            else:
                skipped += 1
        for cls, n in sorted(classes.items()):
            if n == 0:
                folder = f"{prefix}{split}/{cls}"
                extra.append(dict(image_id="", path=top.url_of(folder), relpath=top.rel(folder) + "/", label=cls,
                                  split=split, width=None, height=None, status="empty_class",
                                  reason=f"class folder has no image file ({' '.join(sorted(IMAGE_EXTENSIONS))}): "
                                         "add images or remove the folder"))
    if skipped:
        log.info("skipped %d non-image files under %s", skipped, source)
    if not entries:
        raise ManifestError(f"no image files under {source.rstrip('/')}/{{{','.join(splits)}}}/<class>/ "
                            f"(extensions {' '.join(sorted(IMAGE_EXTENSIONS))}): check the layout and file names")
    for row in extra:
        log.warning("%s %s: %s", row["status"], row["relpath"], row["reason"])
    return entries, extra


class _Blob:
    """What ``manifest._read_csv`` needs of a CSV file: its bytes, and a name for messages."""

    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data

    def read_bytes(self) -> bytes:
        return self.data

    def __str__(self) -> str:
        return self.name


def _remote_csv_entries(source: str, data: bytes, top: RemoteRoot, label_delim: str | None, csv_entries: Callable):
    """The CSV's rows through ``manifest._csv_entries`` itself, over the bucket as a lexical POSIX tree.

    Keys have no symlinks, so the lexical root check is the whole check: ``..`` or an absolute path
    leaving the root refuses the CSV exactly as for local files.
    """
    root = PurePosixPath("/" + top.base)
    try:
        entries, extra = csv_entries(_Blob(source, data), root, label_delim)
    except ManifestError as e:
        raise ManifestError(str(e).replace(f" {root};", f" {top.url};").replace(f" {root} ", f" {top.url} ")) from None
    for row in extra:  # rows made without a read (duplicates, paths without an image extension) name the object too
        row["path"] = top.url_of(row["path"][1:])
    return [(str(p)[1:], label, split) for p, label, split in entries], extra


# --------------------------------------------------------------------------- reading objects


def fetch_and_inspect(top: RemoteRoot, todo: list, inspect, concurrency: int = CONCURRENCY,
                      timeout_s: float = TIMEOUT_S, relabel: tuple = ()):
    """Yield ``(i, row, bytes_row)`` for each ``(i, key, label, split)`` in ``todo``, as they complete.

    At most ``concurrency`` objects are in flight; one that takes longer than ``timeout_s`` (fetch
    and check) becomes an ``unreadable`` row and is abandoned. Each object is written to a private
    temporary file and checked there by ``inspect(path, root, label, split)`` (``manifest._inspect``),
    so a remote image gets exactly the status and reason a local copy would. ``bytes_row`` is the
    row itself, or for a row whose status is in ``relabel`` (refused for its label), the object checked
    again without one: what its bytes alone give, for the scan index.
    """
    tmp = Path(tempfile.mkdtemp(prefix="precompute-scan-"))
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="precompute-scan")

    def work(i: int, key: str, label: str, split: str) -> tuple[dict, dict]:
        local = tmp / f"{i}{posixpath.splitext(key)[1]}"
        try:
            data = top.fs.cat_file(key)
        except FileNotFoundError:  # gone since the listing: a missing row, as a local file deleted mid-scan
            data = None
        except Exception as e:  # noqa: BLE001 - a permission or network error is this object's status
            row = _remote_row(top, key, label, split, "unreadable", f"{type(e).__name__}: {e}")
            return row, row
        if data is not None:
            local.write_bytes(data)
        try:
            row = inspect(local, tmp, label, split)
            bytes_row = inspect(local, tmp, "?", "") if row["status"] in relabel else row
        finally:
            local.unlink(missing_ok=True)
        url = top.url_of(key)
        for r in (row, bytes_row):
            r.update(path=url, relpath=top.rel(key), reason=r["reason"].replace(str(local), url))
        return row, bytes_row

    try:
        pending: dict = {}
        queue = iter(todo)
        window = max(1, concurrency) * 4
        while True:
            while len(pending) < window:
                item = next(queue, None)
                if item is None:
                    break
                pending[pool.submit(work, *item)] = (item, time.monotonic())
            if not pending:
                break
            done, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                (i, *_), _start = pending.pop(fut)
                yield i, *fut.result()
            now = time.monotonic()
            for fut in [f for f, (_, t0) in pending.items() if now - t0 > timeout_s]:
                (i, key, label, split), _start = pending.pop(fut)
                fut.cancel()
                row = _remote_row(top, key, label, split, "unreadable",
                                  f"TimeoutError: no answer within {timeout_s:g} s; retry, or raise the "
                                  "timeout (ImageSource timeout_s, $PRECOMPUTE_DATA_TIMEOUT_S)")
                yield i, row, row
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _remote_row(top: RemoteRoot, key: str, label: str, split: str, status: str, reason: str) -> dict:
    return dict(image_id="", path=top.url_of(key), relpath=top.rel(key), label=label, split=split, width=None,
                height=None, status=status, reason=reason)
