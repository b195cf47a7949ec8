"""The store: a root (a local path or any fsspec URL) holding one folder per cache entry."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from typing import Iterable

import fsspec

from precompute.probes import check_store
from precompute.store.entry import COMPRESSORS, DEFAULT_COMPRESSOR, Entry
from precompute.store.leases import _mtime
from precompute.store.key import CacheKey

log = logging.getLogger(__name__)


class ActivationStore:
    def __init__(self, root: str, storage_options: dict | None = None, compressor: str = DEFAULT_COMPRESSOR):
        if compressor not in COMPRESSORS and compressor != "auto":
            raise ValueError(f"unknown compressor {compressor!r}; choose auto or one of {sorted(COMPRESSORS)}")
        self.root = str(root).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.compressor = compressor
        self.fs, self.base = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def url(self, rel: str) -> str:
        """What zarr opens for ``rel``: a plain path on a local store (zarr takes ``file://`` URLs for
        remote-style stores that do not create folders), the URL otherwise."""
        return f"{self.base}/{rel}" if self.local else f"{self.root}/{rel}"

    def now(self) -> float:
        """The store's clock: the modification time it gives a file written now. Lease ages are
        measured on it, so a writer's or housekeeper's clock that is off changes nothing. This
        machine's clock where the store takes no writes (nothing is removed there anyway)."""
        rel = f".probe-clock-{uuid.uuid4().hex}"  # a leftover is collected with the other probes
        try:
            self.put(rel, b"", durable=False)
        except OSError:
            return time.time()
        try:
            return _mtime(self.fs.info(f"{self.base}/{rel}"))
        except OSError:
            return time.time()
        finally:
            with contextlib.suppress(OSError):
                self.fs.rm(f"{self.base}/{rel}")

    def put(self, rel: str, data: bytes, durable: bool = True) -> None:
        """Write a file under the root atomically: a reader sees the old bytes or the new, never part."""
        fs, path = self.fs, f"{self.base}/{rel}"
        if not self.local:  # an object PUT is atomic on S3 and its kin
            fs.pipe_file(path, data)
            return
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:  # write then rename: atomic on one filesystem
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)  # a full disk must not leave 0-byte temp files behind
            raise

    def entry(self, key: CacheKey) -> Entry:
        """The entry for ``key``; its key.json is written (or put right, when damaged) if it can be."""
        entry = Entry(self, key.rel(), key)
        want = key.parts()
        try:
            have = json.loads(self.fs.cat_file(f"{self.base}/{entry.rel}/key.json"))
        except (FileNotFoundError, ValueError):
            have = None
        if have != json.loads(json.dumps(want)):
            try:
                self.put(f"{entry.rel}/key.json", json.dumps(want, indent=2, sort_keys=True).encode())
            except OSError as exc:  # a read-only store still serves what it holds
                log.warning("cannot write %s/key.json (%s): reading the entry as it is", entry.rel, exc)
        return entry

    def open_rel(self, rel: str) -> Entry:
        """An existing entry by its path under the root, e.g. ``resnet34/cut=0/<digest>``.
        ValueError when its key.json is missing or damaged."""
        try:
            parts = json.loads(self.fs.cat_file(f"{self.base}/{rel}/key.json"))
            key = CacheKey.from_parts(parts)
        except FileNotFoundError:
            raise ValueError(f"{rel}/key.json is missing") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{rel}/key.json is damaged ({type(exc).__name__}: {exc})") from None
        if key.rel() != rel.strip("/"):  # the folder's name is its key's digest
            raise ValueError(f"{rel}/key.json is the key of entry {key.rel()}, not of this folder (copied or "
                             "swapped)")
        return Entry(self, rel, key)

    def check_reachable(self) -> bool:
        """Fail early (ConfigError) when the store cannot be reached; True when it can be written,
        False when it is read-only (reads and training work; computing missing rows does not).
        The probe is ``precompute.probes.check_store``: it creates nothing and gives up after
        ``PROBE_TIMEOUT_S``."""
        writable = check_store(self.root, self.storage_options, read_only_ok=True)
        if not writable:
            log.warning("activation store %s is read-only: cached rows are served, none can be added", self.root)
        return writable

    # housekeeping lives in its own module; these are the store's face for it
    def entries(self) -> list[dict]:
        from precompute.store.housekeeping import list_entries

        return list_entries(self)

    def remove_unused(self, keep: Iterable[str] = (), unused_for_s: float = 30 * 86400,
                      orphan_grace_s: float = 3600.0, dry_run: bool = False) -> list[str]:
        from precompute.store.housekeeping import remove_unused

        return remove_unused(self, keep, unused_for_s, orphan_grace_s, dry_run)

    def verify(self, repair: bool = False) -> list[dict]:
        from precompute.store.housekeeping import verify_store

        return verify_store(self, repair)
