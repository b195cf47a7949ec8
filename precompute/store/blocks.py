"""Reading a committed chunk's blocks: fetch the bytes, verify them, decode them into place.

Every chunk is a Zarr v3 array whose rows are stored in blocks of ``block_rows`` rows (one file
or object per block, ``c/<i>/0/...``). Chunks written since format 2 end their codec chain in
Zarr's ``crc32c`` codec, and their commit record holds each block's CRC-32C: a block that is
missing, short, or has a single flipped bit raises ``CacheCorruption`` naming the entry, chunk
and file. It is never filled with zeros. Older chunks (no checksum) are read unverified, and a
missing block is an error for them too.

The files hold Zarr's standard encoding, so zarr-python or any Zarr v3 reader reads them; this
module decodes them itself with numcodecs, in threads, straight into the caller's array, because
zarr-python's event loop costs ~3x per block on a local disk (benchmarks/store_compression.py)
and fills a block it cannot find with the fill value.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import google_crc32c
import numcodecs
import numcodecs.blosc
import numpy as np

READ_THREADS = min(4, os.cpu_count() or 1)  # blocks fetched and decoded at once
# CRC-32C of a message followed by its own little-endian CRC is this constant for every message,
# so a block with its trailer is checked in one pass, without slicing (copying) the trailer off.
CRC32C_RESIDUE = 0x48674BC7
COMPRESSORS = ("blosc", "zstd")  # the bytes-to-bytes compressors this reader decodes


class CacheCorruption(RuntimeError):
    """A stored block, record or metadata file is missing or damaged. Nothing was read from it."""

    def __init__(self, entry: str, chunk: str, file: str, problem: str):
        self.entry, self.chunk, self.file, self.problem = entry, chunk, file, problem
        super().__init__(f"activation cache entry {entry}, chunk {chunk}: {file} {problem}. "
                         "Its rows are not served; run `precompute cache verify --repair` or materialize the "
                         "activations asset again, which drops the damaged chunk and recomputes its rows")


@dataclass(frozen=True)
class ChunkLayout:
    """How one chunk's rows are laid out in block files (what its zarr.json says)."""

    shape: tuple[int, ...]
    dtype: str
    block_rows: int
    compressor: str | None  # None, "blosc" or "zstd"
    checksum: bool          # the block files end in Zarr's crc32c trailer

    @classmethod
    def from_zarr_json(cls, blob: bytes) -> "ChunkLayout":
        """The layout Entry.commit writes, checked field by field; ValueError for anything else."""
        try:
            md = json.loads(blob)
            shape, grid, keys = md["shape"], md["chunk_grid"], md["chunk_key_encoding"]
            codecs = [c["name"] for c in md["codecs"]]
            plain = (md["zarr_format"] == 3 and md["node_type"] == "array" and not md.get("storage_transformers")
                     and md["data_type"] in ("float32", "float16", "float64", "uint16") and np.little_endian
                     and grid["name"] == "regular" and grid["configuration"]["chunk_shape"][1:] == shape[1:]
                     and keys["name"] == "default" and keys.get("configuration", {}).get("separator", "/") == "/"
                     and codecs[0] == "bytes" and md["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                     and codecs[1:] in ([], *([c] for c in COMPRESSORS), ["crc32c"], *([c, "crc32c"] for c in COMPRESSORS)))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise ValueError(f"is not a Zarr v3 array description ({type(exc).__name__}: {exc})") from None
        if not plain:
            raise ValueError("describes a layout this cache never writes")
        compressor = next((c for c in codecs if c in COMPRESSORS), None)
        return cls(tuple(shape), md["data_type"], grid["configuration"]["chunk_shape"][0], compressor,
                   codecs[-1] == "crc32c")

    def as_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "block_rows": self.block_rows,
                "compressor": self.compressor, "checksum": self.checksum}

    @classmethod
    def from_dict(cls, d: dict) -> "ChunkLayout":
        return cls(tuple(d["shape"]), d["dtype"], int(d["block_rows"]), d["compressor"], bool(d["checksum"]))

    def blocks(self) -> list[tuple[int, int]]:
        """(first row, end row) of each block."""
        return [(a, min(a + self.block_rows, self.shape[0])) for a in range(0, self.shape[0], self.block_rows)]

    def block_file(self, i: int) -> str:
        return f"c/{i}" + "/0" * (len(self.shape) - 1)


def block_crc(raw: bytes) -> int:
    """The CRC-32C a checksummed block file carries in its last 4 bytes."""
    return int.from_bytes(raw[-4:], "little")


def decode_block(raw: bytes | Exception, layout: ChunkLayout, i: int, out: np.ndarray, expected_crc: int | None,
                 where: tuple[str, str, str]) -> None:
    """Block ``i``'s rows from its file bytes into ``out`` (C-contiguous, exactly those rows).

    ``raw`` is what fetching the file gave (an exception for a missing file); ``expected_crc``
    the commit record's digest (None for a chunk written before checksums). Any problem raises
    ``CacheCorruption`` (entry, chunk, file in ``where``); ``out`` is then not to be used.
    """
    def bad(problem: str) -> CacheCorruption:
        return CacheCorruption(*where, problem)

    if isinstance(raw, FileNotFoundError):
        raise bad("is missing")
    if isinstance(raw, Exception):
        raise bad(f"cannot be read ({type(raw).__name__}: {raw})")
    body = memoryview(raw)
    if layout.checksum:
        if len(raw) < 4:
            raise bad(f"is {len(raw)} bytes long, shorter than its checksum")
        if google_crc32c.value(raw) != CRC32C_RESIDUE:
            raise bad("fails its crc32c checksum (damaged or truncated)")
        if expected_crc is not None and block_crc(raw) != expected_crc:
            raise bad(f"is not the block its commit record names (crc32c {block_crc(raw):08x}, "
                      f"recorded {expected_crc:08x})")
        body = body[:-4]
    start, stop = layout.blocks()[i]
    full = stop - start == layout.block_rows  # zarr pads the last block to the block shape
    dest = out if full else np.empty((layout.block_rows, *layout.shape[1:]), layout.dtype)
    try:
        if layout.compressor == "blosc":
            numcodecs.blosc.decompress(body, dest)  # releases the GIL: blocks decode in parallel
        elif layout.compressor == "zstd":
            numcodecs.Zstd().decode(body, out=dest)
        else:
            if len(body) != dest.nbytes:
                raise ValueError(f"holds {len(body)} bytes of data, the block needs {dest.nbytes}")
            dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(body, np.uint8)
    except Exception as exc:  # noqa: BLE001 - a codec's own error for damaged data
        raise bad(f"does not decode ({type(exc).__name__}: {exc})") from None
    if not full:
        out[...] = dest[:stop - start]


def read_raw_block_into(path: str, layout: ChunkLayout, out: np.ndarray, expected_crc: int | None,
                        where: tuple[str, str, str]) -> None:
    """An uncompressed, checksummed, full block read from a local file straight into ``out``
    (one copy, by the kernel) and checked there: the fast path for pooled vectors."""
    try:
        with open(path, "rb", buffering=0) as f:
            n = f.readinto(out.reshape(-1).view(np.uint8))
            trailer = f.read()
    except OSError as exc:
        raise CacheCorruption(*where, "is missing" if isinstance(exc, FileNotFoundError)
                              else f"cannot be read ({exc})") from None
    if n != out.nbytes or len(trailer) != 4:
        raise CacheCorruption(*where, f"is {n + len(trailer)} bytes long, its block needs {out.nbytes + 4}")
    if google_crc32c.extend(google_crc32c.value(out), trailer) != CRC32C_RESIDUE:
        raise CacheCorruption(*where, "fails its crc32c checksum (damaged or truncated)")
    if expected_crc is not None and block_crc(trailer) != expected_crc:
        raise CacheCorruption(*where, f"is not the block its commit record names (crc32c {block_crc(trailer):08x}, "
                                      f"recorded {expected_crc:08x})")


_POOL: ThreadPoolExecutor | None = None


def read_pool() -> ThreadPoolExecutor:
    """Threads for block reads, started once per process (starting 4 threads costs ~4 ms)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="precompute-read")
    return _POOL


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has the pool object but not its threads: start its own


os.register_at_fork(after_in_child=_forget_pool)
