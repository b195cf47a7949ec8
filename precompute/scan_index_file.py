"""The scan index's file: one table per source (``ScanIndex``), saved atomically as Parquet (or
gzipped JSON without pyarrow) under a folder or an fsspec URL, named by what it indexes
(``index_name``). What a scan does with it is ``precompute.scan_index``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import time
import uuid
from array import array
from pathlib import Path

import fsspec

from precompute import sources

log = logging.getLogger("precompute.scan_index")

INDEX_FORMAT = 2  # 2: width and height as nullable int32
SAVE_EVERY_S = 30.0
INDEX_DIR = "_scan_index"
_CHECK_FUNCTIONS = (("precompute.manifest", "_inspect"), ("precompute.manifest", "_sha256"),  # the checks:
                    ("precompute.images", "shape_problem"), ("precompute.images", "to_rgb"))  # (module, name)
_FIELDS = ("rel", "size", "mtime_ns", "ctime_ns", "ino", "token", "image_id", "status", "reason", "width", "height")

try:  # pyarrow comes with mlflow; the JSON format is the fallback
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover - exercised only without pyarrow
    pa = pq = None


_checks: str | None = None


def checks_fingerprint() -> str:
    """What a recorded result depends on besides the bytes: the checking code and its limits."""
    global _checks
    from PIL import Image

    if _checks is None:
        import importlib
        import inspect

        import PIL

        modules = [importlib.import_module(m) for m in dict.fromkeys(m for m, _ in _CHECK_FUNCTIONS)]
        consts = {k: sorted(v) if isinstance(v, frozenset) else v
                  for module in modules for k, v in vars(module).items()
                  if k.isupper() and isinstance(v, (int, float, str, tuple, frozenset))}
        # unwrap: a wrapper (a test's spy, a profiler) around a check is not another check
        code = [inspect.getsource(inspect.unwrap(f))
                for f in (getattr(importlib.import_module(m), n, None) for m, n in _CHECK_FUNCTIONS) if f is not None]
        parts = [INDEX_FORMAT, PIL.__version__, consts, code]
        _checks = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{_checks}-{Image.MAX_IMAGE_PIXELS}"  # the pixel limit may be changed at run time


def index_name(parts: list) -> str:
    return hashlib.sha256(json.dumps([INDEX_FORMAT, *parts]).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- the index file


class ScanIndex:
    """Where scan indexes live: a folder or an fsspec URL (``s3://bucket/acts/_scan_index``)."""

    def __init__(self, location: str | Path, storage_options: dict | None = None,
                 save_every_s: float = SAVE_EVERY_S, save_every_n: int | None = None):
        self.location = str(location).rstrip("/")
        self.storage_options = dict(storage_options or {})
        if sources.is_url(self.location):  # the sources' instance: the same timeouts, one connection pool
            self.fs, self.base = sources.filesystem(self.location, self.storage_options)
        else:
            self.fs, self.base = fsspec.core.url_to_fs(self.location, **self.storage_options)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols
        self.save_every_s, self.save_every_n = save_every_s, save_every_n
        self.suffix = ".parquet" if pq is not None else ".json.gz"

    @classmethod
    def beside_store(cls, store_root: str, storage_options: dict | None = None, **kw) -> "ScanIndex":
        return cls(f"{str(store_root).rstrip('/')}/{INDEX_DIR}", storage_options, **kw)

    def path(self, name: str) -> str:
        return f"{self.base}/{name}{self.suffix}"

    def _version(self, path: str):
        """What changes when the file is replaced: (mtime_ns, size, inode) locally, the ETag remotely."""
        try:
            if self.local:
                st = os.stat(path)
                return st.st_mtime_ns, st.st_size, st.st_ino
            info = self.fs.info(path)
            return sources.signature(info)
        except Exception:  # noqa: BLE001 - absent or unreachable: either way a scan without it
            return None

    def load(self, name: str) -> tuple["_Table", object]:
        """(entries, version) of one source's index; empty when absent, unreadable or from other checks."""
        path = self.path(name)
        version = self._version(path)
        if version is None:
            return _Table.empty(), None
        try:
            data = Path(path).read_bytes() if self.local else self.fs.cat_file(path)
            meta, table = _decode(data, self.suffix)
        except Exception as e:  # noqa: BLE001 - a damaged index is a cold scan, never a failure
            log.warning("scan index %s cannot be read (%s): scanning every file", path, e)
            return _Table.empty(), version
        if meta.get("checks") != checks_fingerprint():
            log.info("scan index %s was written by other checks: every file is read again", path)
            return _Table.empty(), version
        return table, version

    def save(self, name: str, table: "_Table", meta: dict) -> None:
        """Replace one source's index atomically (temporary file + rename, or one PUT)."""
        data = _encode(table, {**meta, "checks": checks_fingerprint(), "format": INDEX_FORMAT,
                               "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, self.suffix)
        path = self.path(name)
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(self.base, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _remove_dead_temps(path)


def _remove_dead_temps(path: str) -> None:
    """Temporary files a killed writer left beside ``path`` (its pid no longer runs)."""
    folder, name = os.path.split(path)
    for leftover in os.listdir(folder):
        if not leftover.startswith(name + ".tmp-"):
            continue
        try:
            pid = int(leftover[len(name) + 5:].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(folder, leftover))
            except OSError:
                pass
        except (ValueError, OSError):
            pass


class _Table:
    """Index entries as columns (one list per field after ``rel``) and a rel -> row position map.

    Columns, not a dict of tuples: loading 100k entries is then ~0.1 s, most of it Parquet.
    """

    __slots__ = ("rels", "cols", "pos")

    def __init__(self, rels: list, cols: list, pos: dict | None = None):
        self.rels, self.cols = rels, cols
        self.pos = dict(zip(rels, range(len(rels)))) if pos is None else pos  # ``pos``: already rel -> row

    @classmethod
    def empty(cls) -> "_Table":
        return cls([], [[] for _ in _FIELDS[1:]])

    @classmethod
    def from_dict(cls, entries: dict) -> "_Table":
        if not entries:
            return cls.empty()
        return cls(list(entries), [list(c) for c in zip(*entries.values())])

    def __len__(self) -> int:
        return len(self.rels)

    def get(self, rel: str) -> tuple | None:
        j = self.pos.get(rel)
        return None if j is None else tuple(c[j] for c in self.cols)

    def as_dict(self) -> dict:
        return dict(zip(self.rels, zip(*self.cols))) if self.rels else {}


def _encode(table: _Table, meta: dict, suffix: str) -> bytes:
    size, mtime, ctime, ino, token, image_id, status, reason, width, height = table.cols
    if suffix == ".parquet":
        t = pa.table({
            "rel": pa.array(table.rels, pa.string()),
            "size": pa.array(size, pa.int64()), "mtime_ns": pa.array(mtime, pa.int64()),
            "ctime_ns": pa.array(ctime, pa.int64()), "ino": pa.array(ino, pa.uint64()),
            "token": pa.array(token, pa.string()), "image_id": pa.array(image_id, pa.string()),
            "status": pa.array(status, pa.string()), "reason": pa.array(reason, pa.string()),
            "width": pa.array(width, pa.int32()), "height": pa.array(height, pa.int32()),  # null: no size
        }).replace_schema_metadata({"precompute": json.dumps(meta)})
        buf = pa.BufferOutputStream()
        pq.write_table(t, buf, compression="zstd", use_dictionary=["status", "reason", "token"])
        return buf.getvalue().to_pybytes()
    doc = {"meta": meta, "rel": table.rels, "cols": [list(c) for c in table.cols]}
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=3)


# Loaded compactly (issue 21, memory at ImageNet size): the stat fields as machine integers (8 bytes, not a
# 32-byte int object each) and the few distinct statuses, reasons and tokens as shared strings, not one copy
# a file. At 1,281,167 files the index was ~580 bytes a file in memory, as much as the rows being built.
_INTEGERS = {"size": "q", "mtime_ns": "q", "ctime_ns": "q", "ino": "Q"}
_FEW_VALUES = ("token", "status", "reason")


def _column(column, name: str) -> list | array:
    if column.null_count == 0 and name in _INTEGERS:
        return array(_INTEGERS[name], column.to_numpy().tobytes())
    if column.null_count == 0 and name in _FEW_VALUES:
        encoded = column.combine_chunks().dictionary_encode()
        values = encoded.dictionary.to_pylist()
        return list(map(values.__getitem__, encoded.indices.to_numpy().tolist()))
    return column.to_pylist()


def _decode(data: bytes, suffix: str) -> tuple[dict, _Table]:
    if suffix == ".parquet":
        t = pq.read_table(pa.BufferReader(data))
        meta = json.loads((t.schema.metadata or {}).get(b"precompute", b"{}"))
        cols = [_column(t.column(n), n) for n in _FIELDS]
        return meta, _Table(cols[0], cols[1:])
    doc = json.loads(gzip.decompress(data))
    return doc["meta"], _Table(doc["rel"], doc["cols"])
