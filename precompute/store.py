"""The activation cache: content-addressed, incremental, atomically committed, on a path or URL.

Layout under the store root (a local path or any fsspec URL, e.g. ``s3://bucket/acts``)::

    <arch>/cut=<xtra_cut>/<entry-key>/
        key.json                  every part of the key, readable by a person
        chunks/<chunk>/           a Zarr array of features, one per committed chunk
        commits/<chunk>.json      the commit record: the chunk's image hashes, written last

An entry is addressed by everything that determines the numbers except the image set (arch,
weights identity, cut, transform, pooled or spatial, dtype, library and code versions). Rows
inside it are addressed by image content hash, so a changed image is a new row, adding images
computes only the new ones, and a rerun after a crash computes only what was not committed.
A chunk counts only once its commit record exists; records are written last and atomically,
and a chunk's data folder is unique to its writer, so a reader never sees a partial row and two
concurrent writers never overwrite each other's files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import zarr
import zarr.codecs
from zarr.core.buffer import default_buffer_prototype

# Bump when the way activations are computed changes in a way the other key parts miss.
CODE_VERSION = "2"  # 2: bodies run channels-last (archs.channels_last); values move by float32 rounding

COMPRESSORS = {
    # Blosc from numcodecs (zarr's BloscCodec wraps numcodecs.blosc).
    # The default: activations after ReLU/ReLU6 hold runs of exact zeros (and 6.0s), which LZ4
    # finds in whole 4-byte words; byte shuffling splits them. On lite0's maps this compresses
    # better than blosc-zstd (7.9x vs 7.2x) and decodes ~8x faster (benchmarks/store_compression.py).
    "blosc-lz4-noshuffle": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=9, shuffle="noshuffle"),
    "blosc-zstd": lambda: zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "blosc-lz4": lambda: zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "zstd": lambda: zarr.codecs.ZstdCodec(level=3),
    "none": lambda: None,
}
# "auto", the default: blosc-lz4-noshuffle for spatial maps (7.9x smaller on lite0, and reads at
# 0.9x numpy.load since there is less to copy), none for pooled vectors, which LZ4 shrinks only
# 1.4x while decoding them halves read speed (benchmarks/store_compression.py).
AUTO_COMPRESSOR = {"spatial": "blosc-lz4-noshuffle", "pooled": "none"}
DEFAULT_COMPRESSOR = "auto"
BLOCK_BYTES = 4 << 20  # a chunk's rows are stored in Zarr blocks of about this size
READ_THREADS = min(4, os.cpu_count() or 1)  # blocks read at once by Entry.read
TOUCH_EVERY_S = 60.0  # reads record a use (last_used) at most this often per Entry object


def library_versions() -> dict[str, str]:
    import timm
    import torch
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "zarr": zarr.__version__, "precompute_code": CODE_VERSION}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines the activations of one image."""

    arch: str
    weights_id: str
    xtra_cut: int
    cut_index: int  # body children kept: the arch's cut minus xtra_cut
    transform: dict = field(hash=False)
    pooled: bool = True
    dtype: str = "float32"
    versions: dict = field(default_factory=library_versions, hash=False)

    def parts(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return _digest(self.parts())[:24]


def view_key(key: CacheKey, image_ids: Iterable[str], labels: Iterable[str] | None = None) -> str:
    """Identity of one image set read through one entry: the data version downstream sees."""
    rows = list(zip(image_ids, labels)) if labels is not None else list(image_ids)
    return _digest({"entry": key.digest(), "rows": rows})[:24]


class ActivationStore:
    def __init__(self, root: str, storage_options: dict | None = None, compressor: str = DEFAULT_COMPRESSOR):
        if compressor not in COMPRESSORS and compressor != "auto":
            raise ValueError(f"unknown compressor {compressor!r}; choose auto or one of {sorted(COMPRESSORS)}")
        self.root = str(root).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.compressor = compressor
        self.fs, self.base = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def entry(self, key: CacheKey) -> "Entry":
        rel = f"{key.arch}/cut={key.xtra_cut}/{key.digest()}"
        entry = Entry(self, rel, key)
        if not self.fs.exists(f"{self.base}/{rel}/key.json"):
            entry._put(f"{rel}/key.json", json.dumps(key.parts(), indent=2, sort_keys=True).encode())
        return entry

    def check_reachable(self) -> None:
        """Fail early, before any work, when the store cannot be written."""
        try:
            self.fs.makedirs(self.base, exist_ok=True)
            probe = f"{self.base}/.probe-{uuid.uuid4().hex}"
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm(probe)
        except Exception as exc:  # noqa: BLE001 - any backend error means the same thing here
            raise RuntimeError(f"activation store {self.root!r} is not writable ({exc}); "
                               "set PRECOMPUTE_STORE to a writable path or URL") from exc

    def url(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def open_rel(self, rel: str) -> "Entry":
        """An existing entry by its path under the root, e.g. ``resnet34/cut=0/<digest>``."""
        parts = json.loads(self.fs.cat_file(f"{self.base}/{rel}/key.json"))
        return Entry(self, rel, CacheKey(**parts))

    def entries(self) -> list[dict]:
        """Every entry with its rows, size on disk and last use (newest use first)."""
        out = []
        for key_file in self.fs.glob(f"{self.base}/*/cut=*/*/key.json"):
            rel = key_file[len(self.base) + 1:].rsplit("/", 1)[0]
            entry = self.open_rel(rel)
            out.append({"entry": rel, "arch": entry.key.arch, "xtra_cut": entry.key.xtra_cut,
                        "rows": len(entry), "bytes": entry.nbytes_on_disk(), "last_used": entry.last_used()})
        return sorted(out, key=lambda e: -e["last_used"])

    def remove_unused(self, keep: Iterable[str] = (), unused_for_s: float = 30 * 86400,
                      orphan_grace_s: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove entries not in ``keep`` and unused for ``unused_for_s``, and crash leftovers.

        ``keep`` holds entry paths in use (e.g. those the latest Dagster materializations point
        at); an entry read or written within ``unused_for_s`` is kept as well.
        """
        keep, now, removed = set(keep), time.time(), []
        for info in self.entries():
            entry = self.open_rel(info["entry"])
            if info["entry"] not in keep and now - info["last_used"] > unused_for_s:
                removed.append(info["entry"])
                if not dry_run:
                    self.fs.rm(entry.path, recursive=True)
                continue
            for folder in entry.orphan_chunks(orphan_grace_s):
                removed.append(folder[len(self.base) + 1:])
                if not dry_run:
                    self.fs.rm(folder, recursive=True)
        return removed


class _LocalChunk:
    """A committed chunk on a local disk, read without zarr's event loop.

    zarr-python 3 reads a chunk through its asyncio loop: the file read and the decode each hop
    to a worker thread, and the decoded block is copied into the output. For a 2.6 MB block that
    is ~3.4 ms where reading the file and decoding it into place with numcodecs takes ~1.1 ms
    (benchmarks/store_compression.py). This reader handles exactly the layout ``Entry.commit``
    writes (regular row blocks spanning the other axes, little-endian bytes, then Blosc or
    nothing) and says so with ``from_folder`` returning None for anything else, which zarr reads.
    Files hold zarr's standard encoding, so zarr, and any other Zarr v3 reader, reads them too.
    """

    def __init__(self, folder: str, shape, dtype: str, block_rows: int, blosc: bool, fill_value):
        self.folder, self.shape, self.dtype = folder, tuple(shape), np.dtype(dtype)
        self.block_rows, self.blosc, self.fill_value = block_rows, blosc, fill_value

    @classmethod
    def from_folder(cls, folder: str) -> "_LocalChunk | None":
        """The reader for the Zarr v3 array in ``folder`` if its zarr.json describes the plain
        layout (checked field by field against the v3 spec), else None."""
        try:
            with open(f"{folder}/zarr.json", "rb") as f:
                md = json.load(f)
            shape, grid, keys = md["shape"], md["chunk_grid"], md["chunk_key_encoding"]
            codecs = [c["name"] for c in md["codecs"]]
            plain = (md["zarr_format"] == 3 and md["node_type"] == "array" and not md.get("storage_transformers")
                     and md["data_type"] in ("float32", "float16", "float64") and np.little_endian
                     and grid["name"] == "regular" and grid["configuration"]["chunk_shape"][1:] == shape[1:]
                     and keys["name"] == "default" and keys.get("configuration", {}).get("separator", "/") == "/"
                     and codecs in (["bytes"], ["bytes", "blosc"])
                     and md["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                     and isinstance(md["fill_value"], (int, float)))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None  # zarr reads it, or says what is wrong
        if not plain:
            return None
        return cls(folder, shape, md["data_type"], grid["configuration"]["chunk_shape"][0], len(codecs) == 2,
                   md["fill_value"])

    def blocks(self) -> list[tuple[int, int]]:
        return [(start, min(start + self.block_rows, self.shape[0])) for start in range(0, self.shape[0], self.block_rows)]

    def read_all(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        list(_read_pool().map(lambda ib: self.read_block(ib[0], out[ib[1][0]:ib[1][1]]), enumerate(self.blocks())))
        return out

    def read_block(self, i: int, out: np.ndarray) -> None:
        """Block ``i``'s rows, decoded into ``out`` (C-contiguous, exactly those rows)."""
        import numcodecs.blosc

        start, stop = self.blocks()[i]
        path = f"{self.folder}/c/{i}" + "/0" * (len(self.shape) - 1)
        full = stop - start == self.block_rows  # zarr pads the last block to the block shape
        dest = out if full else np.empty((self.block_rows, *self.shape[1:]), self.dtype)
        try:
            with open(path, "rb", buffering=0) as f:  # one read of the whole file: no buffer in between
                if self.blosc:
                    numcodecs.blosc.decompress(f.read(), dest)
                else:  # read then copy: faster here than readinto (which faults `dest` in from the kernel)
                    raw = f.read()
                    if len(raw) != dest.nbytes:
                        raise ValueError(f"{path} holds {len(raw)} bytes, its block {dest.nbytes}: the chunk is damaged")
                    dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
        except FileNotFoundError:
            dest[...] = self.fill_value  # zarr writes no file for a block that is all fill value
        if not full:
            out[...] = dest[:stop - start]


_POOL: ThreadPoolExecutor | None = None


def _read_pool() -> ThreadPoolExecutor:
    """Threads for local chunk reads, started once per process (starting 4 threads costs ~4 ms)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="precompute-read")
    return _POOL


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has the pool object but not its threads: start its own


os.register_at_fork(after_in_child=_forget_pool)


def _in_order(rows: np.ndarray, n: int) -> bool:
    """``rows`` is exactly 0, 1, ..., n - 1."""
    return len(rows) == n and bool((rows == np.arange(n)).all())


def _lands_whole(pos: np.ndarray, rows: np.ndarray, n: int) -> bool:
    """A whole chunk of ``n`` rows, in order, landing on consecutive output rows: it can be
    decoded straight into place (one pass over memory fewer than decoding and copying it in)."""
    return _in_order(rows, n) and _in_order(pos - pos[0], len(pos))


def _modified(fs, path: str) -> float:
    try:
        return fs.modified(path).timestamp()
    except (FileNotFoundError, NotImplementedError, AttributeError):
        return time.time()  # unknown age counts as new: never a reason to delete


class Entry:
    _touched = 0.0  # when this object last recorded a use (see iter_blocks)

    def __init__(self, store: ActivationStore, rel: str, key: CacheKey):
        self.store, self.rel, self.key = store, rel, key
        self.path = f"{store.base}/{rel}"
        self._index: dict[str, tuple[str, int]] | None = None
        self._records: list[dict] = []
        self._arrays: dict[str, zarr.Array] = {}

    # -- low level -------------------------------------------------------------------------
    def _put(self, rel: str, data: bytes, durable: bool = True) -> None:
        fs, path = self.store.fs, f"{self.store.base}/{rel}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.store.local:  # write then rename: atomic on one filesystem
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # an object PUT is atomic on S3 and its kin
            fs.pipe_file(path, data)

    def _commit_blobs(self) -> list[bytes]:
        """Every commit record, sorted by name."""
        folder = f"{self.path}/commits"
        if self.store.local:  # os.scandir: a third of fsspec's glob + cat on a local disk
            try:
                names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".json"))
            except FileNotFoundError:
                return []
            blobs = []
            for name in names:
                with open(f"{folder}/{name}", "rb") as f:
                    blobs.append(f.read())
            return blobs
        fs = self.store.fs
        fs.invalidate_cache(folder)  # s3fs caches listings: see other writers' commits
        paths = sorted(fs.glob(f"{folder}/*.json"))
        blobs = fs.cat(paths) if paths else {}
        return [blobs[p] for p in paths]

    def index(self, refresh: bool = False) -> dict[str, tuple[str, int]]:
        """image hash -> (chunk, row) over every committed chunk."""
        if self._index is None or refresh:
            index: dict[str, tuple[str, int]] = {}
            # sorted: the first commit of an image wins, for every reader
            self._records = [json.loads(blob) for blob in self._commit_blobs()]
            for r in reversed(self._records):  # from the end, so an image's earliest commit stays
                n = len(r["ids"])
                index.update(zip(reversed(r["ids"]), zip(itertools.repeat(r["chunk"], n), range(n - 1, -1, -1))))
            self._index = index
        return self._index

    # -- public --------------------------------------------------------------------------------
    def missing(self, image_ids: Iterable[str]) -> list[str]:
        have = self.index(refresh=True)
        return list(dict.fromkeys(i for i in image_ids if i not in have))

    def commit(self, image_ids: list[str], features: np.ndarray) -> str:
        """Write one chunk of rows, then its commit record; returns the chunk name."""
        if len(image_ids) != len(features):
            raise ValueError(f"{len(image_ids)} ids for {len(features)} feature rows")
        features = np.ascontiguousarray(features, dtype=self.key.dtype)
        chunk = f"{_digest(image_ids)[:16]}-{uuid.uuid4().hex[:8]}"
        rows_per_block = max(1, min(len(features), BLOCK_BYTES // max(1, features[0].nbytes)))
        zarr.create_array(
            self.store.url(f"{self.rel}/chunks/{chunk}"), data=features,
            chunks=(rows_per_block, *features.shape[1:]),
            compressors=COMPRESSORS[self.codec()](),
            storage_options=self.store.storage_options or None,
            attributes={"entry": self.rel, "key": self.key.parts()},  # each chunk describes itself
        )
        record = {"chunk": chunk, "ids": list(image_ids), "shape": list(features.shape),
                  "dtype": str(features.dtype), "committed_at": time.time()}
        self._put(f"{self.rel}/commits/{chunk}.json", json.dumps(record).encode())
        self._index = None
        return chunk

    def codec(self) -> str:
        """The codec new chunks of this entry are written with (the store's choice, "auto" resolved)."""
        if self.store.compressor == "auto":
            return AUTO_COMPRESSOR["pooled" if self.key.pooled else "spatial"]
        return self.store.compressor

    def _rows_by_chunk(self, image_ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """chunk -> (positions in ``image_ids``, rows in the chunk); KeyError if any is not committed."""
        index = self.index()
        if any(i not in index for i in image_ids):  # commits are immutable: list again only for new ids
            index = self.index(refresh=True)
        lost = [i for i in image_ids if i not in index]
        if lost:
            raise KeyError(f"{len(lost)} of {len(image_ids)} images have no activations in entry "
                           f"{self.rel} (first: {lost[0]}); materialize the activations asset first")
        names = {}
        codes = np.fromiter((names.setdefault(index[i][0], len(names)) for i in image_ids), np.int64, len(image_ids))
        rows = np.fromiter((index[i][1] for i in image_ids), np.int64, len(image_ids))
        order = np.argsort(codes, kind="stable")  # positions grouped by chunk, in order within each
        bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
        return {chunk: (order[a:b], rows[order[a:b]]) for chunk, a, b in zip(names, bounds[:-1], bounds[1:])}

    def _open_chunk(self, chunk: str) -> zarr.Array:
        """The chunk's Zarr array; opened once per Entry (a committed chunk never changes)."""
        arr = self._arrays.get(chunk)
        if arr is None:
            arr = self._arrays[chunk] = zarr.open_array(
                self.store.url(f"{self.rel}/chunks/{chunk}"), mode="r", zarr_format=3,
                storage_options=self.store.storage_options or None)
        return arr

    def _used(self) -> None:
        """Record a use at most once a minute: plenty for housekeeping, and it spares a write per
        streamed chunk; on a local disk a fresh Entry first looks whether another one just did."""
        now = time.time()
        if now - self._touched <= TOUCH_EVERY_S:
            return
        if self.store.local:
            try:
                with open(f"{self.path}/last_used", "rb") as f:
                    if now - float(f.read()) <= TOUCH_EVERY_S:  # what last_used() and housekeeping read
                        self._touched = now
                        return
            except (OSError, ValueError):
                pass
        self.touch()
        self._touched = now

    def iter_blocks(self, image_ids: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in ``image_ids``, their rows), one committed chunk at a time: bounded memory."""
        for chunk, (pos, rows) in self._rows_by_chunk(image_ids).items():
            local = _LocalChunk.from_folder(f"{self.path}/chunks/{chunk}") if self.store.local else None
            block = local.read_all() if local else self._open_chunk(chunk)[:]
            yield pos, block if _in_order(rows, len(block)) else block[rows]  # whole chunk: no gather copy
        self._used()

    def read(self, image_ids: list[str]) -> np.ndarray:
        """Rows for ``image_ids`` in that order; raises KeyError if any is not committed.

        On a local disk the chunk files are decoded here (``_LocalChunk``); elsewhere (S3) and for
        layouts that reader does not handle, zarr reads them, ``READ_THREADS`` chunks at a time so
        that requests to a remote store overlap.
        """
        image_ids = list(image_ids)
        plan = self._rows_by_chunk(image_ids)
        if not plan:
            return np.empty((0,), dtype=self.key.dtype)
        if self.store.local:
            local = {c: _LocalChunk.from_folder(f"{self.path}/chunks/{c}") for c in plan}
            if all(local.values()):
                return self._read_local(image_ids, plan, local)
        pool = _read_pool()
        arrays = dict(zip(plan, pool.map(self._open_chunk, plan)))
        first = next(iter(arrays.values()))
        out = np.empty((len(image_ids), *first.shape[1:]), dtype=np.dtype(first.dtype))

        def fill(chunk: str) -> None:
            arr, (pos, rows) = arrays[chunk], plan[chunk]
            if _lands_whole(pos, rows, arr.shape[0]):  # Zarr decodes straight into place
                arr.get_basic_selection(Ellipsis, out=default_buffer_prototype().nd_buffer.from_numpy_array(
                    out[pos[0]:pos[0] + len(pos)]))
            else:
                block = arr[:]
                out[pos] = block if _in_order(rows, len(block)) else block[rows]

        list(pool.map(fill, plan))  # list: re-raises the first error of any chunk
        self._used()
        return out

    def _read_local(self, image_ids: list[str], plan: dict, local: dict[str, _LocalChunk]) -> np.ndarray:
        """Entry.read for chunks on a local disk: every block decoded by numcodecs, in threads
        (Blosc releases the GIL), straight into place when a whole chunk lands on consecutive rows."""
        first = next(iter(local.values()))
        out = np.empty((len(image_ids), *first.shape[1:]), dtype=first.dtype)
        jobs = []
        for chunk, (pos, rows) in plan.items():
            c = local[chunk]
            if _lands_whole(pos, rows, c.shape[0]):
                jobs += [(c, i, out[pos[0] + a:pos[0] + b], None, None) for i, (a, b) in enumerate(c.blocks())]
            else:  # some rows of the chunk, or out of order: decode the blocks they are in, then gather
                for i, (a, b) in enumerate(c.blocks()):
                    hit = (rows >= a) & (rows < b)
                    if hit.any():
                        jobs.append((c, i, np.empty((b - a, *c.shape[1:]), c.dtype), pos[hit], rows[hit] - a))

        def run(job) -> None:
            c, i, dest, at, take = job
            c.read_block(i, dest)
            if at is not None:
                out[at] = dest[take]

        if len(jobs) == 1:
            run(jobs[0])  # one block: no thread hand-off
        else:
            list(_read_pool().map(run, jobs))  # list: re-raises the first error
        self._used()
        return out

    def row_nbytes(self) -> int:
        self.index()
        if not self._records:
            return 0
        r = self._records[0]
        return int(np.prod(r["shape"][1:])) * np.dtype(r["dtype"]).itemsize

    def raw_nbytes(self) -> int:
        """Uncompressed size of every committed row (for the compression ratio)."""
        return len(self.index(refresh=True)) * self.row_nbytes()

    def put_blob(self, name: str, data: bytes) -> None:
        """A derived result kept beside the entry (e.g. a head trained on it), written atomically."""
        self._put(f"{self.rel}/results/{name}", data)

    def get_blob(self, name: str) -> bytes | None:
        try:
            return self.store.fs.cat_file(f"{self.path}/results/{name}")
        except FileNotFoundError:
            return None

    def touch(self) -> None:
        """Record a use, so housekeeping never removes an entry that is being read."""
        # not synced: a use lost in a power cut only makes the entry look older to housekeeping,
        # and a sync per read costs more than the read of a small entry
        self._put(f"{self.rel}/last_used", str(time.time()).encode(), durable=False)

    def last_used(self) -> float:
        fs = self.store.fs
        try:
            return float(fs.cat_file(f"{self.path}/last_used"))
        except FileNotFoundError:
            return _modified(fs, f"{self.path}/key.json")

    def orphan_chunks(self, grace_s: float = 3600.0) -> list[str]:
        """Chunk folders with no commit record, older than ``grace_s``: what a crash left."""
        fs, now = self.store.fs, time.time()
        self.index(refresh=True)
        committed = {r["chunk"] for r in self._records}
        orphans = []
        for folder in fs.glob(f"{self.path}/chunks/*"):
            name = folder.rstrip("/").rsplit("/", 1)[-1]
            if name not in committed and now - _modified(fs, f"{folder}/zarr.json") > grace_s:
                orphans.append(folder)
        return orphans

    def nbytes_on_disk(self) -> int:
        try:
            return int(self.store.fs.du(f"{self.path}/chunks"))
        except FileNotFoundError:
            return 0

    def __len__(self) -> int:
        return len(self.index(refresh=True))
