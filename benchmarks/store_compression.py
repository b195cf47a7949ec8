"""How well each store codec compresses real activations, and how fast it writes and reads them.

Activations: tf_efficientnet_lite0 at 224 px over 256 dogscats photos (both classes and splits),
computed once with ``cache_fill.precompute`` (spatial, float32) into ``benchmarks/out/compression-store``
and reused on later runs. The other three arrays are derived exactly as precompute would store
them: pooled = ``concat_pool`` of the spatial map (max and avg, 2560 values), float16 = ``astype``.

For every array and every codec in ``precompute.store.COMPRESSORS`` (plus a few extra Blosc/Zstd
settings below) the array is written the way ``Entry.commit`` writes a chunk (``zarr.create_array``,
blocks of ~4 MiB of rows) and read back whole with zarr (``zarr.open_array(...)[:]``: codec cost
plus zarr's per-chunk machinery); beside it ``numpy.save`` /
``numpy.load`` of the same array. Best of 5 (rounds interleave the codecs); MB = 10^6 bytes of the uncompressed array; files
stay in the page cache, so this measures codec CPU cost, not disk speed (the ratio is what a slow
disk or S3 saves). Every read is checked to be bit-identical.

A second table reads through the store itself, the path training takes: ``Entry.read`` of an
entry made of one or several committed 256-row chunks, against ``numpy.load`` of one .npy of the
same rows, for each codec in ``COMPRESSORS``. On a local disk ``Entry.read`` decodes the chunk
files itself (numcodecs, in threads, straight into place) rather than through zarr's event loop.
Target: the default codec (``auto``: LZ4 for spatial maps, none for pooled vectors) reads at
>= 0.5x ``numpy.load``.

    .venv/bin/python benchmarks/store_compression.py          # ~2 min on 2 cores the first time, ~1.5 min after

Writes its table to the "store_compression" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
import zarr.codecs

from _images import DOGSCATS, OUT, write_section
from precompute.backbone import load_backbone, transform_for
from precompute.stages.cache_fill import precompute
from precompute.manifest import build_manifest, ok_rows
from precompute.heads import concat_pool
from precompute import store as store_module
from precompute.store import COMPRESSORS, ActivationStore, CacheKey, Entry
from precompute.transform_spec import TransformSpec

N_PHOTOS, SIZE, REPEATS = 256, 224, 5
Blosc = zarr.codecs.BloscCodec
CODECS = {
    **COMPRESSORS,  # the library's choices first
    "blosc-zstd-1": lambda: Blosc(cname="zstd", clevel=1, shuffle="shuffle"),
    "blosc-zstd-bitshuffle": lambda: Blosc(cname="zstd", clevel=3, shuffle="bitshuffle"),
    "blosc-lz4-1": lambda: Blosc(cname="lz4", clevel=1, shuffle="shuffle"),
    "blosc-lz4-bitshuffle": lambda: Blosc(cname="lz4", clevel=5, shuffle="bitshuffle"),
    "zstd-1": lambda: zarr.codecs.ZstdCodec(level=1),
    "blosc-lz4-noshuffle-5": lambda: Blosc(cname="lz4", clevel=5, shuffle="noshuffle"),
    "blosc-zstd-1-noshuffle": lambda: Blosc(cname="zstd", clevel=1, shuffle="noshuffle"),
}
ENTRY_CHUNKS = [("pooled float32", 1), ("pooled float32", 16), ("spatial float32", 1), ("spatial float32", 4)]
TARGET = 0.5


def activations() -> dict[str, np.ndarray]:
    bb = load_backbone("tf_efficientnet_lite0")
    rows = ok_rows(build_manifest(DOGSCATS)).sample(N_PHOTOS, random_state=0)
    entry, stats, _ = precompute(rows, ActivationStore(OUT / "compression-store"), bb,
                                 transform_for(bb.spec, SIZE), pooled=False)
    print(f"activations: {stats.computed} computed, {stats.reused} reused, {stats.seconds:.0f} s")
    spatial = entry.read(list(rows["image_id"]))
    pooled = concat_pool(torch.from_numpy(spatial)).numpy()
    return {"spatial float32": spatial, "spatial float16": spatial.astype(np.float16),
            "pooled float32": pooled, "pooled float16": pooled.astype(np.float16)}


def du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(arr: np.ndarray, folder: Path) -> list[dict]:
    """Ratio and best-of-REPEATS write/read MB/s per codec; rounds go over all codecs in turn, so a
    burst of load from other processes on a shared machine does not land on one codec only."""
    rows_per_block = max(1, min(len(arr), (4 << 20) // arr[0].nbytes))  # as Entry.commit
    ways = {"numpy.save/load": (folder / "a.npy", lambda p: np.save(p, arr), np.load)}
    for name, codec in CODECS.items():
        ways[name] = (folder / name,
                      lambda p, codec=codec: zarr.create_array(str(p), data=arr, chunks=(rows_per_block, *arr.shape[1:]),
                                                               compressors=codec()),
                      lambda p: zarr.open_array(str(p), mode="r", zarr_format=3)[:])
    best = {name: [np.inf, np.inf] for name in ways}
    for _ in range(REPEATS):
        for name, (path, write, read) in ways.items():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            t = time.perf_counter(); write(path); tw = time.perf_counter() - t
            t = time.perf_counter(); back = read(path); tr = time.perf_counter() - t
            assert back.dtype == arr.dtype and np.array_equal(back, arr), f"{name}: round trip changed the data"
            best[name] = [min(best[name][0], tw), min(best[name][1], tr)]
    mb, numpy_read = arr.nbytes / 1e6, best["numpy.save/load"][1]
    return [dict(codec=name, ratio=arr.nbytes / du(path), write=mb / best[name][0], read=mb / best[name][1],
                 vs_numpy=numpy_read / best[name][1]) for name, (path, _, _) in ways.items()]


def commit_unverified(entry: Entry, ids: list[str], arr: np.ndarray, codec: str) -> None:
    """A chunk as Entry.commit wrote it before checksums (format-1 record, no crc32c codec)."""
    chunk = f"u{len(ids)}-{ids[0]}"
    rows_per_block = max(1, min(len(arr), store_module.BLOCK_BYTES // arr[0].nbytes))
    zarr.create_array(entry.store.url(f"{entry.rel}/chunks/{chunk}"), data=arr, chunks=(rows_per_block, *arr.shape[1:]),
                      compressors=COMPRESSORS[codec]())
    entry.store.put(f"{entry.rel}/commits/{chunk}.json", json.dumps(
        {"chunk": chunk, "ids": ids, "shape": list(arr.shape), "dtype": str(arr.dtype), "committed_at": 0}).encode())


def entry_reads(arr: np.ndarray, n_chunks: int, folder: Path) -> list[dict]:
    """Entry.read of an entry holding ``n_chunks`` committed chunks (copies of ``arr`` under other
    ids), against numpy.load of one .npy of the same rows; a fresh Entry object per read, so each
    read lists the commit records again as a new reader does. Best of REPEATS, codecs interleaved."""
    key = CacheKey("bench", "none", 0, 0, TransformSpec(), versions={})
    ids = [f"{c:03d}-{i:05d}" for c in range(n_chunks) for i in range(len(arr))]
    folder = folder / f"entries-{arr.ndim}d-{arr.dtype}-{n_chunks}"
    folder.mkdir()
    whole = np.concatenate([arr] * n_chunks)
    np.save(folder / "whole.npy", whole)
    ways = {"numpy.load (one .npy)": lambda: np.load(folder / "whole.npy")}
    for name in COMPRESSORS:
        store = ActivationStore(str(folder / f"entry-{name}"), compressor=name)
        entry = store.entry(key)
        for c in range(n_chunks):
            entry.commit(ids[c * len(arr):(c + 1) * len(arr)], arr)
        ways[name] = lambda store=store, rel=entry.rel: Entry(store, rel, key).read(ids)
    # The cost of the checksums: the default codec's chunks written as before them (format 1: no
    # crc32c trailer, no digests in the record), read by the same reader without verifying.
    default = store_module.AUTO_COMPRESSOR["pooled" if arr.ndim == 2 else "spatial"]
    store = ActivationStore(str(folder / "entry-unverified"), compressor=default)
    entry = store.entry(key)
    for c in range(n_chunks):
        commit_unverified(entry, ids[c * len(arr):(c + 1) * len(arr)], arr, default)
    ways[f"{default}, no checksums"] = lambda store=store, rel=entry.rel: Entry(store, rel, key).read(ids)
    best = {name: np.inf for name in ways}
    for _ in range(REPEATS):
        for name, read in ways.items():
            t = time.perf_counter(); back = read(); best[name] = min(best[name], time.perf_counter() - t)
            assert np.array_equal(back, whole), f"{name}: Entry.read changed the data"
    mb, numpy_read = whole.nbytes / 1e6, best["numpy.load (one .npy)"]
    return [dict(codec=name, rows=len(whole), read=mb / t, vs_numpy=numpy_read / t) for name, t in best.items()]


def main() -> None:
    t0 = time.perf_counter()
    arrays = activations()
    lines = ["| array | codec | ratio | write MB/s | read MB/s | read vs numpy |", "|---|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(dir=OUT, prefix="codecs-") as tmp:
        for label, arr in arrays.items():
            zeros = (arr == 0).mean()
            print(f"{label} {tuple(arr.shape)}: {arr.nbytes / 1e6:.1f} MB, {zeros:.0%} zeros", flush=True)
            for row in measure(arr, Path(tmp)):
                lines.append(f"| {label} {tuple(arr.shape)} | {row['codec']} | {row['ratio']:.2f} | {row['write']:.0f} "
                             f"| {row['read']:.0f} | {row['vs_numpy']:.2f}x |")
                print("  " + lines[-1], flush=True)
        entry_lines = ["| rows read | codec | Entry.read MB/s | vs numpy.load |", "|---|---|---:|---:|"]
        verdicts = []
        for label, n_chunks in ENTRY_CHUNKS:
            arr = arrays[label]
            for row in entry_reads(arr, n_chunks, Path(tmp)):
                entry_lines.append(f"| {label} ({row['rows']:,}, {n_chunks} chunks) | {row['codec']} | {row['read']:.0f} "
                                   f"| {row['vs_numpy']:.2f}x |")
                print("  " + entry_lines[-1], flush=True)
                default = store_module.AUTO_COMPRESSOR[label.split()[0]]  # what "auto" writes for this layout
                if row["codec"] == default:
                    verdicts.append(f"{label}, {n_chunks} chunk(s), default codec (auto: {default}): Entry.read = "
                                    f"{row['vs_numpy']:.2f}x numpy.load (target >= {TARGET}): "
                                    f"{'PASS' if row['vs_numpy'] >= TARGET else 'MISS'}")
    notes = (f"tf_efficientnet_lite0 at {SIZE} px, {N_PHOTOS} dogscats photos; written like Entry.commit (zarr "
             f"{zarr.__version__}, ~4 MiB blocks of rows), read whole; best of {REPEATS}, warm page cache, "
             f"{os.cpu_count()} CPUs (load average at the end {os.getloadavg()[0]:.1f}). ratio = raw bytes / bytes on "
             "disk; MB/s of raw bytes; read vs numpy = zarr read MB/s / numpy.load MB/s. The first "
             f"{len(COMPRESSORS)} zarr codecs are precompute.store.COMPRESSORS; the default, auto, writes "
             f"{store_module.AUTO_COMPRESSOR['spatial']} for spatial maps and {store_module.AUTO_COMPRESSOR['pooled']} "
             "for pooled vectors.")
    entry_notes = ("Reading through the store: Entry.read (a fresh Entry per read: commit records listed and "
                   "checked against their sha256, each chunk's blocks read from disk, checked against their "
                   f"CRC-32C and decoded by numcodecs in {store_module.READ_THREADS} threads straight into the "
                   "output) of an entry holding copies of the array above as separate chunks, against numpy.load "
                   "of one .npy holding the same rows. 'no checksums' is the default codec's chunks written as "
                   "before checksums (format 1), read by the same reader: the difference is the cost of verifying.")
    table, entry_table = "\n".join(lines), "\n".join(entry_lines)
    verdict = "  \n".join(verdicts)
    write_section("store_compression", f"{notes}\n\n{table}\n\n{entry_notes}\n\n{entry_table}\n\n{verdict}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n\n{table}\n\n{entry_table}\n\n{verdict}")


if __name__ == "__main__":
    main()
