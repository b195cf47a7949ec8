"""One entry of the activation cache: commit chunks of rows, index them, read them back verified.

An entry's folder (``<arch>/cut=<n>/<key digest>/``)::

    key.json              every part of the key, readable by a person
    chunks/<chunk>/       a Zarr v3 array per committed chunk, blocks ending in a crc32c trailer
    commits/<chunk>.json  the commit record, written last: the entry it belongs to, the chunk's image
                          hashes, its layout, each block's CRC-32C, the CRC-32C of its zarr.json, and
                          its own sha256
    leases/<id>.json      one per running writer (host, pid, time to live): housekeeping leaves the
                          entry alone while one is live, measured on the store's clock (its mtime)
    last_used             when the entry was last read or written (best effort)

A chunk counts only once its commit record exists; records are written last and atomically, and
a chunk's data folder is unique to its writer, so a reader never sees a partial row and two
concurrent writers never overwrite each other's files. A record that does not parse or fails its
own checksum marks that chunk damaged: its rows count as missing (the next precompute computes
them again) and everything else keeps working. So does a record or chunk that names another entry
(copied or moved in by hand): it is never served, reading its rows is ``CacheCorruption`` naming
both entries, and repair drops it. Records written before format 3 carry no entry; their chunk's
zarr.json does (its ``entry`` and ``key`` attributes), and that is checked instead.

Writers' leases and the record of use are ``Leasing``'s (precompute.store.leases); codecs are in
precompute.store.codecs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

import google_crc32c
import numpy as np
import zarr
import zarr.codecs

from precompute.store.blocks import (CRC32C_RESIDUE, CacheCorruption, ChunkLayout, block_crc, decode_block,
                                     read_pool, read_raw_block_into)
from precompute.store.codecs import AUTO_COMPRESSOR, COMPRESSORS, DEFAULT_COMPRESSOR  # noqa: F401 - re-exported
from precompute.store.commit_records import RECORD_FORMAT, not_ours, parse_record  # noqa: F401 - re-exported
from precompute.store.dtypes import decode, encode, storage_dtype
from precompute.store.key import CacheKey, digest
from precompute.store.leases import LEASE_TTL_S, Leasing

if TYPE_CHECKING:
    from precompute.store.activation_store import ActivationStore

log = logging.getLogger(__name__)

BLOCK_BYTES = 4 << 20  # a chunk's rows are stored in Zarr blocks of about this size


@dataclass
class VerifyReport:
    """What ``Entry.verify`` found: chunks whose every block passed its checksum, chunks written
    before checksums (decoded, not verifiable), and damaged chunks with the reason."""

    entry: str
    verified: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.damaged


class Entry(Leasing):
    def __init__(self, store: "ActivationStore", rel: str, key: CacheKey):
        self.store, self.rel, self.key = store, rel, key
        self.path = f"{store.base}/{rel}"
        self._index: dict[str, tuple[str, int]] | None = None
        self.records: dict[str, dict] = {}   # chunk -> commit record, as of the last index()
        self.damaged: dict[str, str] = {}    # chunk -> why its commit record is not used
        self.foreign: dict[str, list[str]] = {}  # chunk -> its ids, for records naming another entry
        self._layouts: dict[str, ChunkLayout] = {}
        self._lease: str | None = None
        self._lease_renewed = 0.0
        self._claimed = False
        self._written: list[str] = []
        self._use_warned = False

    # -- files -------------------------------------------------------------------------------
    def _put(self, rel: str, data: bytes, durable: bool = True) -> None:
        self.store.put(f"{self.rel}/{rel}", data, durable)

    def _fetch(self, rels: list[str]) -> list[bytes | Exception]:
        """The bytes of each file under the entry, or the exception reading it raised."""
        paths = [f"{self.path}/{r}" for r in rels]
        if self.store.local:
            def one(path: str) -> bytes | Exception:
                try:
                    with open(path, "rb", buffering=0) as f:  # one read of the whole file
                        return f.read()
                except OSError as exc:
                    return exc
            return [one(p) for p in paths]
        got = self.store.fs.cat(paths, on_error="return") if paths else {}
        return [got.get(p, FileNotFoundError(p)) for p in paths]

    def _commit_blobs(self) -> list[tuple[str, bytes | Exception]]:
        """(chunk, record bytes) for every commit record, sorted by name."""
        folder = f"{self.path}/commits"
        if self.store.local:  # os.scandir: a third of fsspec's glob + cat on a local disk
            try:
                names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".json"))
            except FileNotFoundError:
                return []
        else:
            fs = self.store.fs
            fs.invalidate_cache(folder)  # s3fs caches listings: see other writers' commits
            names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{folder}/*.json"))
        blobs = self._fetch([f"commits/{n}" for n in names])
        return [(n[:-len(".json")], b) for n, b in zip(names, blobs)]

    # -- the index ---------------------------------------------------------------------------
    def index(self, refresh: bool = False) -> dict[str, tuple[str, int]]:
        """image hash -> (chunk, row) over every committed chunk whose record is sound."""
        if self._index is None or refresh:
            records, damaged, foreign = {}, {}, {}
            for chunk, blob in self._commit_blobs():
                if isinstance(blob, FileNotFoundError):
                    continue  # dropped between the listing and the read
                try:
                    if isinstance(blob, Exception):
                        raise ValueError(f"cannot be read ({blob})")
                    record = parse_record(chunk, blob)
                except ValueError as exc:
                    damaged[chunk] = f"commits/{chunk}.json {exc}"
                    continue
                why = not_ours(self.rel, record["entry"], record["key_digest"]) if "entry" in record else ""
                if why:  # copied or moved in from another entry: never served
                    damaged[chunk], foreign[chunk] = f"commits/{chunk}.json {why}", record["ids"]
                else:
                    records[chunk] = record
            if damaged:
                log.warning("entry %s: %d damaged commit record(s), their rows count as missing: %s",
                            self.rel, len(damaged), "; ".join(damaged.values()))
            index: dict[str, tuple[str, int]] = {}
            # An image committed twice (two writers at once) keeps the copy in the chunk whose
            # name sorts first: every reader makes the same choice, so every read agrees.
            for r in reversed(list(records.values())):
                n = len(r["ids"])
                index.update(zip(reversed(r["ids"]), zip(itertools.repeat(r["chunk"], n), range(n - 1, -1, -1))))
            self.records, self.damaged, self.foreign, self._index = records, damaged, foreign, index
        return self._index

    def missing(self, image_ids: Iterable[str]) -> list[str]:
        have = self.index(refresh=True)
        return list(dict.fromkeys(i for i in image_ids if i not in have))

    # -- writing -----------------------------------------------------------------------------
    def codec(self) -> str:
        """The codec new chunks of this entry are written with (the store's choice, "auto" resolved)."""
        if self.store.compressor == "auto":
            return AUTO_COMPRESSOR["pooled" if self.key.pooled else "spatial"]
        return self.store.compressor

    def commit(self, image_ids: list[str], features: np.ndarray) -> str:
        """Write one chunk of rows, then its commit record; returns the chunk name."""
        if len(image_ids) != len(features):
            raise ValueError(f"{len(image_ids)} ids for {len(features)} feature rows")
        if self._lease and time.monotonic() - self._lease_renewed > LEASE_TTL_S / 3:
            self._renew_lease()
        features = encode(features, self.key.dtype)  # bfloat16: its bits as uint16 (store/dtypes.py)
        chunk = f"{digest(image_ids)[:16]}-{uuid.uuid4().hex[:8]}"
        rows_per_block = max(1, min(len(features), BLOCK_BYTES // max(1, features[0].nbytes)))
        compressor = COMPRESSORS[self.codec()]()
        zarr.create_array(
            self.store.url(f"{self.rel}/chunks/{chunk}"), data=features,
            chunks=(rows_per_block, *features.shape[1:]),
            compressors=[c for c in (compressor, zarr.codecs.Crc32cCodec()) if c is not None],
            config={"write_empty_chunks": True},  # every block has a file: a missing one is damage
            storage_options=self.store.storage_options or None,
            attributes={"entry": self.rel, "key": self.key.parts()},  # each chunk describes itself
        )
        meta = self._fetch([f"chunks/{chunk}/zarr.json"])[0]
        if isinstance(meta, Exception):
            raise meta
        layout = ChunkLayout.from_zarr_json(meta)
        # The blocks' CRC-32C, from their trailers, go into the record: a block lost, swapped or
        # damaged later is caught on every read.
        crcs = self._block_trailers(chunk, layout)
        record = {"format": RECORD_FORMAT, "chunk": chunk, "entry": self.rel, "key_digest": self.rel.rsplit("/", 1)[-1],
                  "ids": list(image_ids), "shape": list(features.shape),
                  "dtype": str(features.dtype), "committed_at": time.time(), "layout": layout.as_dict(),
                  "blocks": crcs, "zarr_json_crc32c": _crc(meta)}
        record["sha256"] = digest(record)
        self._put(f"commits/{chunk}.json", json.dumps(record).encode())
        self._index = None
        self._written += list(image_ids)
        self._used()  # writing is a use: housekeeping must not take an entry being filled
        return chunk

    def _block_trailers(self, chunk: str, layout: ChunkLayout) -> list[int]:
        paths = [f"{self.path}/chunks/{chunk}/{layout.block_file(i)}" for i in range(len(layout.blocks()))]
        if self.store.local:
            out = []
            for p in paths:
                with open(p, "rb") as f:
                    f.seek(-4, os.SEEK_END)
                    out.append(block_crc(f.read(4)))
            return out
        return [block_crc(b) for b in self.store.fs.cat_ranges(paths, [-4] * len(paths), [None] * len(paths))]

    def drop_chunks(self, chunks: Iterable[str]) -> list[str]:
        """Remove chunks (damaged ones): the commit record first, so no reader uses the chunk
        from then on, then its data. Their rows count as missing; the next precompute computes them."""
        dropped = []
        for chunk in chunks:
            for rel in (f"commits/{chunk}.json", f"chunks/{chunk}"):
                with contextlib.suppress(FileNotFoundError):
                    self.store.fs.rm(f"{self.path}/{rel}", recursive=True)
            dropped.append(chunk)
            self._layouts.pop(chunk, None)
        self._index = None
        if dropped:
            log.warning("entry %s: dropped %d damaged chunk(s): %s", self.rel, len(dropped), dropped)
        return dropped

    # -- reading -----------------------------------------------------------------------------
    def _layout(self, chunk: str) -> ChunkLayout:
        """A committed chunk's layout: from its record (format 2), else from its zarr.json. A record
        older than format 3 does not name its entry: the chunk's zarr.json is checked for it instead."""
        layout = self._layouts.get(chunk)
        if layout is None:
            record = self.records[chunk]
            meta = None
            if "layout" not in record or "entry" not in record:
                meta = self._fetch([f"chunks/{chunk}/zarr.json"])[0]
                where = (self.rel, chunk, f"chunks/{chunk}/zarr.json")
                if isinstance(meta, Exception):
                    raise CacheCorruption(*where, "is missing" if isinstance(meta, FileNotFoundError)
                                          else f"cannot be read ({meta})")
                self._check_bound(chunk, meta)
            if "layout" in record:
                layout = ChunkLayout.from_dict(record["layout"])
            else:
                try:
                    layout = ChunkLayout.from_zarr_json(meta)
                except ValueError as exc:
                    raise CacheCorruption(*where, str(exc)) from None
                if list(layout.shape) != record["shape"] or layout.dtype != record["dtype"]:
                    raise CacheCorruption(*where, f"says {list(layout.shape)} {layout.dtype}, its commit record "
                                                  f"{record['shape']} {record['dtype']}")
            self._layouts[chunk] = layout
        return layout

    def _check_bound(self, chunk: str, meta: bytes) -> None:
        """CacheCorruption when the chunk's zarr.json names another entry (its ``entry`` and ``key``
        attributes, there since the first checksummed format). A chunk without them cannot tell."""
        try:
            attrs = json.loads(meta).get("attributes") or {}
        except (ValueError, AttributeError):
            return  # not JSON: the layout check (or verify's digest) says what is wrong with it
        if "entry" in attrs or "key" in attrs:
            theirs = digest(attrs.get("key"))[:24] if isinstance(attrs.get("key"), dict) else None
            why = not_ours(self.rel, attrs.get("entry"), theirs)
            if why:
                raise CacheCorruption(self.rel, chunk, f"chunks/{chunk}/zarr.json", why)

    def _rows_by_chunk(self, image_ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """chunk -> (positions in ``image_ids``, rows in the chunk); KeyError if any is not committed."""
        index = self.index()
        if any(i not in index for i in image_ids):  # commits are immutable: list again only for new ids
            index = self.index(refresh=True)
        lost = [i for i in image_ids if i not in index]
        for chunk, ids in self.foreign.items() if lost else ():  # a row only another entry's chunk holds: say so
            if not set(ids).isdisjoint(lost):
                raise CacheCorruption(self.rel, chunk, f"commits/{chunk}.json",
                                      self.damaged[chunk].split(" ", 1)[1])
        if lost:
            damaged = f" ({len(self.damaged)} damaged commit records)" if self.damaged else ""
            raise KeyError(f"{len(lost)} of {len(image_ids)} images have no activations in entry "
                           f"{self.rel}{damaged} (first: {lost[0]}); materialize the activations asset first")
        names = {}
        codes = np.fromiter((names.setdefault(index[i][0], len(names)) for i in image_ids), np.int64, len(image_ids))
        rows = np.fromiter((index[i][1] for i in image_ids), np.int64, len(image_ids))
        order = np.argsort(codes, kind="stable")  # positions grouped by chunk, in order within each
        bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
        return {chunk: (order[a:b], rows[order[a:b]]) for chunk, a, b in zip(names, bounds[:-1], bounds[1:])}

    def read(self, image_ids: list[str]) -> np.ndarray:
        """Rows for ``image_ids`` in that order, every block checked against its checksum.

        KeyError if an image has no row; ``CacheCorruption`` (naming the file) if a block is
        missing or damaged. Blocks are fetched and decoded in threads straight into the output
        where a whole block lands on consecutive rows, else decoded and gathered.
        """
        image_ids = list(image_ids)
        plan = self._rows_by_chunk(image_ids)
        if not plan:
            return decode(np.empty((0,), dtype=storage_dtype(self.key.dtype)), self.key.dtype)
        layouts = {c: self._layout(c) for c in plan}
        first = next(iter(layouts.values()))
        out = np.empty((len(image_ids), *first.shape[1:]), dtype=first.dtype)
        self._decode(plan, layouts, out)
        self._used()
        return decode(out, self.key.dtype)

    def iter_blocks(self, image_ids: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in ``image_ids``, their rows), one committed chunk at a time: bounded memory."""
        for chunk, (pos, rows) in self._rows_by_chunk(image_ids).items():
            layout = self._layout(chunk)
            block = np.empty(layout.shape, layout.dtype)
            self._decode({chunk: (np.arange(layout.shape[0]), np.arange(layout.shape[0]))}, {chunk: layout}, block)
            yield pos, decode(block if _in_order(rows, len(block)) else block[rows], self.key.dtype)
        self._used()

    def _decode(self, plan: dict, layouts: dict[str, ChunkLayout], out: np.ndarray) -> None:
        jobs = []  # (chunk, block, destination, output positions or None, rows of the block to take)
        for chunk, (pos, rows) in plan.items():
            layout = layouts[chunk]
            whole = _in_order(rows, layout.shape[0]) and _in_order(pos - pos[0], len(pos))
            for i, (a, b) in enumerate(layout.blocks()):
                if whole:  # the block lands on consecutive output rows: decode straight into place
                    jobs.append((chunk, i, out[pos[0] + a:pos[0] + b], None, None))
                elif (hit := (rows >= a) & (rows < b)).any():
                    jobs.append((chunk, i, np.empty((b - a, *layout.shape[1:]), layout.dtype), pos[hit], rows[hit] - a))
        files = [f"chunks/{c}/{layouts[c].block_file(i)}" for c, i, *_ in jobs]
        prefetched = None if self.store.local else self._fetch(files)  # remote: one batch of requests

        def run(k: int) -> None:
            chunk, i, dest, at, take = jobs[k]
            layout, crcs, where = layouts[chunk], self.records[chunk].get("blocks"), (self.rel, chunk, files[k])
            if (prefetched is None and layout.checksum and layout.compressor is None
                    and len(dest) == layout.block_rows and dest.flags.c_contiguous):
                read_raw_block_into(f"{self.path}/{files[k]}", layout, dest, crcs[i] if crcs else None, where)
            else:
                raw = self._fetch([files[k]])[0] if prefetched is None else prefetched[k]
                decode_block(raw, layout, i, dest, crcs[i] if crcs else None, where)
            if at is not None:
                out[at] = dest[take]

        if len(jobs) == 1:
            run(0)  # one block: no thread hand-off
        else:
            list(read_pool().map(run, range(len(jobs))))  # list: re-raises the first error

    # -- verification ------------------------------------------------------------------------
    def verify(self, image_ids: Iterable[str] | None = None) -> VerifyReport:
        """Check every block of every committed chunk (or of the chunks holding ``image_ids``)
        against its checksum, and each chunk's zarr.json against its record; damaged commit
        records are reported too. Reads everything once; decodes only unverifiable old chunks."""
        index = self.index(refresh=True)
        report = VerifyReport(self.rel, damaged=dict(self.damaged))
        chunks = list(self.records) if image_ids is None else list(dict.fromkeys(
            index[i][0] for i in image_ids if i in index))
        for chunk in chunks:
            record = self.records[chunk]
            try:
                layout = self._layout(chunk)
                meta = self._fetch([f"chunks/{chunk}/zarr.json"])[0]
                if not isinstance(meta, Exception):
                    self._check_bound(chunk, meta)
                if "zarr_json_crc32c" in record:
                    if isinstance(meta, Exception) or _crc(meta) != record["zarr_json_crc32c"]:
                        raise CacheCorruption(self.rel, chunk, f"chunks/{chunk}/zarr.json",
                                              "is missing" if isinstance(meta, FileNotFoundError)
                                              else "differs from what was committed")
                    if len(record.get("blocks", ())) != len(layout.blocks()):
                        raise CacheCorruption(self.rel, chunk, f"commits/{chunk}.json", "lists the wrong number of blocks")
                if layout.checksum and record.get("blocks"):
                    self._check_sums(chunk, layout, record["blocks"])
                    report.verified.append(chunk)
                else:
                    block = np.empty(layout.shape, layout.dtype)
                    self._decode({chunk: (np.arange(layout.shape[0]),) * 2}, {chunk: layout}, block)
                    report.unverified.append(chunk)
            except CacheCorruption as exc:
                report.damaged[chunk] = f"{exc.file} {exc.problem}"
        return report

    def _check_sums(self, chunk: str, layout: ChunkLayout, crcs: list[int]) -> None:
        files = [f"chunks/{chunk}/{layout.block_file(i)}" for i in range(len(crcs))]
        for file, raw, crc in zip(files, self._fetch(files), crcs):
            where = (self.rel, chunk, file)
            if isinstance(raw, Exception):
                raise CacheCorruption(*where, "is missing" if isinstance(raw, FileNotFoundError)
                                      else f"cannot be read ({raw})")
            if len(raw) < 4 or _crc(raw) != CRC32C_RESIDUE or block_crc(raw) != crc:
                raise CacheCorruption(*where, "fails its crc32c checksum (damaged, truncated or replaced)")

    def repair(self, image_ids: Iterable[str] | None = None) -> VerifyReport:
        """Verify, then drop every damaged chunk (and damaged commit record) so its rows are recomputed."""
        report = self.verify(image_ids)
        self.drop_chunks(report.damaged)
        return report

    # -- sizes ---------------------------------------------------------------------------------
    def row_nbytes(self) -> int:
        self.index()
        if not self.records:
            return 0
        r = next(iter(self.records.values()))
        return int(np.prod(r["shape"][1:])) * np.dtype(r["dtype"]).itemsize

    def raw_nbytes(self) -> int:
        """Uncompressed size of every committed row (for the compression ratio)."""
        return len(self.index(refresh=True)) * self.row_nbytes()

    def nbytes_on_disk(self) -> int:
        try:
            return int(self.store.fs.du(f"{self.path}/chunks"))
        except FileNotFoundError:
            return 0

    def __len__(self) -> int:
        return len(self.index(refresh=True))


def _crc(data: bytes) -> int:
    return google_crc32c.value(data)


def _in_order(rows: np.ndarray, n: int) -> bool:
    """``rows`` is exactly 0, 1, ..., n - 1."""
    return len(rows) == n and bool((rows == np.arange(n)).all())
