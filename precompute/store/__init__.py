"""The activation cache: content-addressed, incremental, verified, atomically committed, on a path or URL.

Layout under the store root (a local path or any fsspec URL, e.g. ``s3://bucket/acts``)::

    <arch>/cut=<xtra_cut>/<entry-key>/    one entry (see ``entry``): key.json, chunks/, commits/,
                                          leases/, last_used, results/
    .trash/<id>/<arch>/cut=<n>/<entry-key>/  an entry gc is removing (renamed there first, local stores)

An entry is addressed by everything that determines the numbers except the image set (arch,
weights identity, cut, transform, pooled or spatial, dtype, library and code versions: ``key``).
Rows inside it are addressed by image content hash, so a changed image is a new row, adding
images computes only the new ones, and a rerun after a crash computes only what was not committed.
Every block is checked against its CRC-32C on every read (``blocks``); damage is an error naming
the file, never zeros, and ``Entry.repair`` / ``precompute cache verify --repair`` drop it so the
next precompute recomputes it. ``housekeeping`` lists, verifies and cleans a store; ``results``
keeps what is derived from an entry (trained heads) beside it.

Modules: key (CacheKey), blocks (verified block decoding), entry (commit, index, read, verify),
activation_store (the root), housekeeping (list, gc, verify), results (derived results).
"""

from precompute.store.activation_store import ActivationStore
from precompute.store.blocks import READ_THREADS, CacheCorruption, ChunkLayout
from precompute.store.entry import (AUTO_COMPRESSOR, BLOCK_BYTES, COMPRESSORS, DEFAULT_COMPRESSOR, Entry,
                                    VerifyReport)
from precompute.store.key import CODE_VERSION, CacheKey, library_versions, view_key
from precompute.store.results import ResultCache

__all__ = ["ActivationStore", "AUTO_COMPRESSOR", "BLOCK_BYTES", "CODE_VERSION", "COMPRESSORS", "CacheCorruption",
           "CacheKey", "ChunkLayout", "DEFAULT_COMPRESSOR", "Entry", "READ_THREADS", "ResultCache", "VerifyReport",
           "library_versions", "view_key"]
