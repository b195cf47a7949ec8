"""Writers' leases and the record of use of a cache entry: what lets housekeeping and writers agree.

A writer ``claim``s an entry (its lease first, then the listing of what is there to reuse) and
``confirm``s at the end that every row it reports is still committed; housekeeping makes an entry
unreachable before it checks leases a last time, so one of the two always sees the other. A lease's
age is its file's modification time on the store's clock, never the writer's; a lease whose writer
has exited (same host and pid namespace) or that does not parse is reported as such, not as a writer.
``Leasing`` holds these methods for ``Entry`` (precompute.store.entry).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator

log = logging.getLogger("precompute.store.entry")

TOUCH_EVERY_S = 60.0  # reads and writes record a use (last_used) at most this often per Entry object
LEASE_TTL_S = 900.0  # a writer's lease lasts this long unless renewed (each commit renews it)


@dataclass(frozen=True)
class Lease:
    path: str
    state: str  # live | expired | gone | junk
    detail: str


class Leasing:
    """The lease and use bookkeeping of an ``Entry`` (which supplies ``store``, ``rel``, ``path``,
    ``key``, ``missing``, ``records``, ``_layout`` and ``_put``)."""

    _touched = 0.0  # when this object last recorded a use

    @contextlib.contextmanager
    def writing(self) -> Iterator["Leasing"]:
        """Hold a lease while writing, so housekeeping leaves the entry alone, and check at the end
        that every row this writer committed is still there (``RuntimeError`` if not). Inside a
        ``claim``, the claim's lease is used and ``confirm`` does the check and gives it back."""
        claimed = self._claimed
        if not claimed:
            self._written = []
            self._take_lease()
        try:
            yield self
            if self._written:
                if not claimed:
                    self._check_rows(self._written, "this run committed")
                self.store.entry(self.key)  # key.json too, so housekeeping never takes the entry for a leftover
        except BaseException:
            self._claimed = False  # the claim ends with the failed write
            self._release_lease()
            raise
        if not claimed:
            self._release_lease()

    def claim(self, image_ids: Iterable[str]) -> list[str]:
        """A writer's start: take a lease, then list which of ``image_ids`` are missing. Because the
        lease comes first, housekeeping (which makes an entry unreachable, then checks its leases)
        either sees it and keeps the entry, or took the entry before this listing, which then finds
        nothing to reuse. End with ``confirm``, which gives the lease back."""
        self._written = []
        self._take_lease()
        self._claimed = True
        return self.missing(image_ids)

    def confirm(self, image_ids: Iterable[str]) -> None:
        """A writer's end: every row it reports, computed or reused, is committed in this entry and
        its block files are there; ``RuntimeError`` naming how many are not. Records a use, then
        gives the claim's lease back."""
        try:
            self._check_rows(list(dict.fromkeys(image_ids)), "this run reports (computed or reused)")
            self._used()
        finally:
            self._claimed = False
            self._release_lease()

    def _check_rows(self, ids: list[str], what: str) -> None:
        lost, wanted = set(self.missing(ids)), set(ids)
        chunks = {self._index[i][0] for i in ids if i not in lost}
        for chunk in self._chunks_without_blocks(chunks):
            lost.update(i for i in self.records[chunk]["ids"] if i in wanted)
        if lost:
            raise RuntimeError(f"{len(lost)} of the {len(ids)} rows {what} are missing from {self.rel} "
                               "(removed while it ran, by `precompute cache gc` or by hand); run the precompute "
                               "again to compute them")

    def _chunks_without_blocks(self, chunks: Iterable[str]) -> list[str]:
        """Chunks some of whose block files (or zarr.json) are gone."""
        chunks = list(chunks)
        want = {c: [f"{self.path}/chunks/{c}/zarr.json"] + [f"{self.path}/chunks/{c}/{self._layout(c).block_file(i)}"
                                                            for i in range(len(self._layout(c).blocks()))]
                for c in chunks}
        if self.store.local:
            return [c for c, files in want.items() if not all(os.path.exists(f) for f in files)]
        fs = self.store.fs
        with contextlib.suppress(FileNotFoundError):
            fs.invalidate_cache(f"{self.path}/chunks")
        try:
            have = {p.rstrip("/") for p in fs.find(f"{self.path}/chunks")}
        except FileNotFoundError:
            have = set()
        return [c for c, files in want.items() if not all(f in have for f in files)]

    def _take_lease(self) -> None:
        self._lease = f"leases/{uuid.uuid4().hex}.json"
        for attempt in range(3):
            try:
                self._renew_lease()
                return
            except FileNotFoundError:  # the folder moved away under the write (housekeeping): write it again
                continue
            except OSError as exc:  # a read-only store: nothing will be written (commit would say so)
                log.info("no lease on %s (%s): the store does not take writes", self.rel, exc)
                break
        self._lease = None

    def _release_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease:
            with contextlib.suppress(OSError):
                self.store.fs.rm(f"{self.path}/{lease}")

    def _renew_lease(self) -> None:
        # Its age is measured by its mtime on the store's clock (``ttl_s``), never by this writer's
        # clock; host, pid and pid namespace let a listing on the same host tell a dead writer.
        self._put(self._lease, json.dumps({"ttl_s": LEASE_TTL_S, "host": socket.gethostname(), "pid": os.getpid(),
                                           "pidns": _pid_namespace(), "expires": time.time() + LEASE_TTL_S}).encode(),
                  durable=False)
        self._lease_renewed = time.monotonic()

    # -- bookkeeping -------------------------------------------------------------------------
    def _used(self) -> None:
        """Record a use at most once a minute: plenty for housekeeping, and it spares a write per
        streamed chunk. Best effort: a read-only or full store still serves reads."""
        now = time.time()
        if now - self._touched <= TOUCH_EVERY_S:
            return
        self._touched = now
        if self.store.local:
            try:
                with open(f"{self.path}/last_used", "rb") as f:
                    if now - float(f.read()) <= TOUCH_EVERY_S:  # another reader just recorded it
                        return
            except (OSError, ValueError):
                pass
        try:
            self.touch()
        except OSError as exc:
            if not self._use_warned:
                log.warning("could not record a use of cache entry %s (%s): reads go on; housekeeping may "
                            "take the entry for unused", self.rel, exc)
                self._use_warned = True

    def touch(self) -> None:
        """Record a use, so housekeeping never removes an entry that is being read."""
        # not synced: a use lost in a power cut only makes the entry look older to housekeeping
        self._put("last_used", str(time.time()).encode(), durable=False)

    def last_used(self) -> float:
        fs = self.store.fs
        try:
            return float(fs.cat_file(f"{self.path}/last_used"))
        except (FileNotFoundError, ValueError):
            return _modified(fs, f"{self.path}/key.json")

    def leases(self, now: float | None = None) -> list[Lease]:
        """Every lease file and what it is: ``live`` (a writer holds the entry), ``expired`` (not
        renewed within its time to live, measured on the store's clock: the file's mtime against
        ``now``, by default ``ActivationStore.now()``), ``gone`` (its writer, on this host, has
        exited) or ``junk`` (not a lease: leases are written atomically, so never half a one)."""
        fs = self.store.fs
        with contextlib.suppress(FileNotFoundError):
            fs.invalidate_cache(f"{self.path}/leases")
        paths = fs.glob(f"{self.path}/leases/*.json")
        if not paths:
            return []
        now = self.store.now() if now is None else now
        out = []
        for path in paths:
            try:
                mtime, blob = _mtime(fs.info(path)), fs.cat_file(path)
            except FileNotFoundError:
                continue  # released meanwhile
            name = path.rsplit("/", 1)[-1]
            try:
                d = json.loads(blob)
                ttl, pid = float(d.get("ttl_s", LEASE_TTL_S)), int(d["pid"])
            except (ValueError, KeyError, TypeError, AttributeError):
                out.append(Lease(path, "junk", f"leases/{name} is not a lease"))
                continue
            who = f"writer pid {pid} on {d.get('host')}"
            if mtime + ttl <= now:
                out.append(Lease(path, "expired", f"leases/{name}: {who} has not renewed it for "
                                                  f"{(now - mtime) / 60:.0f} min"))
            elif _writer_gone(d, pid):
                out.append(Lease(path, "gone", f"leases/{name}: {who} has exited"))
            else:
                out.append(Lease(path, "live", f"leases/{name}: {who}"))
        return out

    def live_leases(self, now: float | None = None) -> list[str]:
        """Leases of writers still running."""
        return [lease.path for lease in self.leases(now) if lease.state == "live"]


def _mtime(info: dict) -> float:
    """A file's modification time from ``fs.info`` (local ``mtime``, S3 ``LastModified``): the store's clock."""
    for name in ("mtime", "LastModified", "last_modified"):
        value = info.get(name)
        if value is not None:
            return value if isinstance(value, (int, float)) else value.timestamp()
    return time.time()  # unknown age counts as new: never a reason to delete


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _writer_gone(lease: dict, pid: int) -> bool:
    """The lease's writer ran on this host, in this pid namespace, and no such process exists now.
    Anything else (another host, another container) cannot be told from here: not gone."""
    if lease.get("host") != socket.gethostname() or lease.get("pidns", "") != _pid_namespace() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


def _modified(fs, path: str) -> float:
    try:
        return fs.modified(path).timestamp()
    except (FileNotFoundError, NotImplementedError, AttributeError):
        return time.time()  # unknown age counts as new: never a reason to delete
