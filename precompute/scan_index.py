"""The incremental scan index: a manifest scan never re-reads an unchanged file.

Like git's index or DVC's state database. For every source the index keeps, per file (keyed by
its path relative to the root), a signature and what checking the file found:

    local file     (size, mtime_ns, ctime_ns, inode)   -> image_id, status, reason, width, height
    remote object  (size, ETag / version id)            -> the same

A scan stats (locally) or lists (remotely) every file, which it must do anyway to find them. A
file whose signature matches its entry is not opened: its row is rebuilt from the entry, with the
label and split of this scan. Any other file is hashed and decoded exactly as without an index
(``manifest._inspect``) and its result recorded. Only results that depend on the bytes alone are
recorded (``ok``, ``not_image``, ``too_large``, ``bad_shape``, a decode failure; a file refused
only for its label or split is checked once more without them, to learn its own result): a
missing file, a permission error or a network timeout is looked at again next time. A file
modified less than ``RACY_NS`` before the scan started is not recorded (git's "racily clean" case:
a rewrite within the same timestamp tick would keep its signature), so it is read again once.
Files refused before any read (outside the root, missing, a fifo, a name that is not UTF-8) are
refused again by ``_inspect`` each time, which costs no read either.

Where it lives: ``<activation store>/_scan_index/<source id>.parquet`` by default (resources: the
``ImageSource`` ``scan_index`` field, ``$PRECOMPUTE_SCAN_INDEX``). Beside the store because the
store is what a team already shares (a path or a bucket every machine reaches), so the first scan
on any machine pays for the others; and because the index is a cache of the same kind (content
addressed, safe to delete: the next scan is then a cold one). The id hashes the source and root (and
for a local source the host, whose inodes are not another machine's); it lives outside the
``<arch>/cut=*/`` entries the store's housekeeping walks. Format: one Parquet file (pyarrow, zstd;
about 46 bytes a file; 100k entries load in ~0.1 s), or gzipped JSON columns where pyarrow is missing.

Safety:
- replaced atomically: written to a temporary file and ``os.replace``d (local), or one PUT of the
  whole object (S3), so a reader sees the old or the new index, never a torn one;
- survives ``kill -9`` mid-scan: progress is saved every ``save_every_s`` seconds (30; longer
  when one save takes over 1.5 s, to keep saving under ~5% of the scan; and every ``save_every_n``
  files when set), so a killed scan's rerun reads only what was not saved yet;
- two scans at once: each save merges what another run saved since this one loaded (the entries
  this run checked win), so neither loses the other's work; a lost entry only costs one re-read,
  never a wrong row, because an entry is only used when its signature still matches;
- ``full_rescan`` ignores the entries (every file is read again) and rewrites them;
- the index names a fingerprint of the checks (the code of ``_inspect`` and what it calls, the
  constants of their modules, ``precompute.manifest`` and ``precompute.images``, PIL's version and
  pixel limit): when the checks change, old entries are not trusted and the next scan is a full one.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import socket
import stat
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from precompute import sources
from precompute.paths import is_inside, printable
from precompute.scan_index_file import (_FIELDS, _INTEGERS, INDEX_DIR, INDEX_FORMAT, SAVE_EVERY_S,  # noqa: F401
                                        ScanIndex, _decode, _Table, checks_fingerprint, index_name)

log = logging.getLogger(__name__)

RACY_NS = 1_000_000_000  # files modified this close to a scan's start are read again next time
_BYTES_STATUSES = frozenset({"ok", "not_image", "too_large", "bad_shape", "unreadable"})  # results of the bytes alone
_LABEL_STATUSES = ("unknown_label", "unknown_split")  # set by _inspect for the row, not the bytes
_TRANSIENT = ("PermissionError", "FileNotFoundError", "TimeoutError", "OSError: [Errno", "ConnectionError")



class ScanBudgetExceeded(RuntimeError):
    """More files would have to be read than ``Scan.max_reads`` allows (nothing was read)."""

    def __init__(self, to_read: int, files: int):
        super().__init__(f"{to_read} of {files} files are new or changed: more than the read budget")
        self.to_read, self.files = to_read, files


# --------------------------------------------------------------------------- one scan


@dataclass
class Scan:
    """How a manifest scan reads files: the index, and the limits. ``stats`` is filled by the scan."""

    index: ScanIndex | None = None
    full_rescan: bool = False  # read every file again (and rewrite the index)
    max_reads: int | None = None  # raise ScanBudgetExceeded instead of reading more files than this
    concurrency: int = sources.CONCURRENCY  # remote objects fetched at once
    timeout_s: float = sources.TIMEOUT_S  # per remote object
    stats: dict = field(default_factory=dict)


class _Session:
    """One scan's use of one index: lookups, recorded results, periodic merged saves."""

    def __init__(self, index: ScanIndex, name: str, meta: dict):
        self.index, self.name, self.meta = index, name, meta
        self.loaded, self.version = index.load(name)
        self.fresh: dict = {}
        self.unsaved, self.saves = 0, 0
        self.last_save = time.monotonic()
        self.every_s = index.save_every_s
        self.save_failed = False

    def record(self, rel: str, entry: tuple) -> None:
        self.fresh[rel] = entry
        self.unsaved += 1
        n = self.index.save_every_n
        if (n and self.unsaved >= n) or time.monotonic() - self.last_save >= self.every_s:
            self.save()

    def save(self, seen: set | None = None) -> None:
        """Write loaded + fresh entries, merged with what another run saved since (``seen``: the final save).

        Works on the columns: at 100k entries a save is ~0.2 s, most of it Parquet.
        """
        started = time.monotonic()
        table = self.loaded
        rels, cols, pos = list(table.rels), [c[:] for c in table.cols], dict(table.pos)  # lists, or compact arrays

        def put(rel: str, entry) -> None:
            j = pos.get(rel)
            if j is None:
                pos[rel] = len(rels)
                rels.append(rel)
                for c, v in zip(cols, entry):
                    c.append(v)
            else:
                for c, v in zip(cols, entry):
                    c[j] = v

        now = self.index._version(self.index.path(self.name))
        if now is not None and now != self.version:  # another run saved since this one loaded: keep its work
            theirs = self.index.load(self.name)[0]
            for rel, j in theirs.pos.items():
                put(rel, [c[j] for c in theirs.cols])
        for rel, entry in self.fresh.items():  # what this run checked wins
            put(rel, entry)
        if seen is not None and len(rels) != len(seen & pos.keys()):  # the final save: removed files leave
            keep = [j for j, rel in enumerate(rels) if rel in seen]
            rels, cols, pos = [rels[j] for j in keep], [_taken(c, keep) for c in cols], None
        self.loaded = _Table(rels, [_compact(c, k) for k, c in enumerate(cols)], pos)
        try:
            self.index.save(self.name, self.loaded, self.meta)
        except Exception as e:  # noqa: BLE001 - the index is a cache: a scan never fails for it
            if not self.save_failed:
                log.warning("scan index %s cannot be written (%s): this scan goes on without saving it, "
                            "and the next one reads these files again", self.index.path(self.name), e)
            self.save_failed = True
            self.every_s = float("inf")  # no more periodic tries in this scan; the final save tries once more
        self.version = self.index._version(self.index.path(self.name))
        self.fresh, self.unsaved, self.last_save = {}, 0, time.monotonic()
        self.saves += 1
        # A save rewrites the whole index (~2 s at 1M entries, more on S3): space them so that saving
        # costs at most ~5% of a long scan, whatever its size.
        self.every_s = max(self.every_s if self.save_failed else self.index.save_every_s,
                           20 * (self.last_save - started))

    def finish(self, seen: set) -> bool:
        """Save if anything changed (new results, removed files); True when it wrote."""
        if not self.fresh and len(seen) >= len(self.loaded) and all(rel in seen for rel in self.loaded.rels):
            return False
        self.save(seen)
        return not self.save_failed


def _compact(column, k: int):
    """Column ``k``'s stat fields as machine integers (scan_index_file._INTEGERS), as a loaded index has
    them: during a cold scan the saved table is held until the scan ends."""
    typecode = _INTEGERS.get(_FIELDS[k + 1])  # _FIELDS[0] is rel, not a column
    if typecode and isinstance(column, list) and None not in column:
        return array(typecode, column)
    return column


def _taken(column, keep: list[int]):
    """``column``'s values at ``keep``, as the same kind of column (a list, or an array of machine integers)."""
    values = [column[j] for j in keep]
    return array(column.typecode, values) if isinstance(column, array) else values


def _label_checked(row: dict, splits) -> dict:
    """A usable row from an index entry, with this scan's label and split checked as ``_inspect`` checks them."""
    if not row["label"]:
        row.update(status="unknown_label",
                   reason="no class label: put the file in a class folder or fill the CSV's label")
    elif row["split"] and row["split"] not in splits:
        row.update(status="unknown_split", reason=f"split {row['split']!r} is not one of {list(splits)}; fix it or "
                                                  "pass splits=...")
    return row


def _cached_row(table: "_Table", j: int, path: str, rel: str, label: str, split: str, splits) -> dict:
    _, _, _, _, _, ids, status, reason, width, height = table.cols
    row = {"image_id": ids[j], "path": path, "relpath": rel, "label": label, "split": split, "width": width[j],
           "height": height[j], "status": status[j], "reason": reason[j]}
    return _label_checked(row, splits) if row["status"] == "ok" else row


def _entry_of(sig: tuple, row: dict) -> tuple | None:
    """The index entry for a checked file, or None when its result must not be reused."""
    status, reason = row["status"], row["reason"] or ""
    if status not in _BYTES_STATUSES or len(row["image_id"] or "") != 64:
        return None
    if status == "unreadable" and reason.startswith(_TRANSIENT):
        return None
    return (*sig, row["image_id"], status, reason, row["width"], row["height"])


def scan_rows(source, entries: list, root, splits, inspect, scan: Scan | None = None) -> list[dict]:
    """Rows for ``entries`` ((path, label, split), as ``build_manifest`` lists them), reading only
    what the index does not know. ``inspect(path, root, label, split)`` checks one file."""
    scan = scan if scan is not None else Scan()
    t0 = time.perf_counter()
    if isinstance(root, sources.RemoteRoot):
        rows, stats = _scan_remote(entries, root, splits, inspect, scan)
    else:
        rows, stats = _scan_local(source, entries, root, splits, inspect, scan)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    scan.stats = stats
    log.info("scanned %d files: %d read, %d unchanged (index %s)", stats["files"], stats["read"], stats["reused"],
             stats.get("index") or "off")
    return rows


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while rows are rebuilt from the index: that allocates one dict per
    file and nothing cyclic, and the collector's full passes over 100k+ new objects cost ~15% of a warm
    scan. Not while files are read: decoding leaves cyclic garbage that must be collected."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _open_session(scan: Scan, identity: list, meta: dict) -> _Session | None:
    if scan.index is None:
        return None
    return _Session(scan.index, index_name(identity), meta)


def _budget(scan: Scan, to_read: int, files: int) -> None:
    if scan.max_reads is not None and to_read > scan.max_reads:
        raise ScanBudgetExceeded(to_read, files)


def _scan_local(source, entries, root: Path, splits, inspect, scan: Scan):
    root_s = str(root)
    prefix = root_s if root_s.endswith("/") else root_s + "/"
    source_s = os.path.realpath(os.fspath(source))
    identity = ["local", socket.gethostname(), source_s, root_s]
    session = _open_session(scan, identity, {"source": source_s, "root": root_s, "host": identity[1]})
    table = _Table.empty() if session is None or scan.full_rescan else session.loaded
    pos, c_rels = table.pos, table.rels
    c_size, c_mtime, c_ctime, c_ino = table.cols[:4]
    start_ns = time.time_ns()
    inside: dict[str, bool] = {}
    labels: dict[str, str] = {}
    rows: list = [None] * len(entries)
    todo, seen = [], set()
    lstat, is_reg, cut = os.lstat, stat.S_ISREG, len(prefix)
    c_ids, c_status, c_reason, c_width, c_height = table.cols[5:]
    with _gc_paused():  # rows rebuilt from the index: see _gc_paused
        for i, (path, label, split) in enumerate(entries):
            if session is None:
                todo.append((i, path, label, split, None, None))
                continue
            s = path if path.__class__ is str else os.fspath(path)
            # The common case inline (~6 us a file, most of it the lstat): a regular ASCII-named file under
            # the root, in a folder already known to resolve inside it. Anything else: _local_stat.
            st = rel = None
            if s.isascii() and s.startswith(prefix):
                try:
                    st = lstat(s)
                except OSError:
                    st = None
                if st is not None and is_reg(st.st_mode) and st.st_size:
                    parent = s[:s.rfind("/")]
                    ok = inside.get(parent)
                    if ok is None:
                        ok = inside[parent] = is_inside(Path(os.path.realpath(parent or "/")), root)
                    rel = s[cut:] if ok else None
                else:
                    st = None
            if st is None:
                st, rel = _local_stat(s, root, prefix, inside, is_inside)
            if rel is None:  # refused before any read (outside the root, missing, ...): inspected, costs nothing
                todo.append((i, path, label, split, None, None))
                continue
            j = pos.get(rel)
            if j is not None:
                rel = c_rels[j]  # the index's own string: one object a file for the index, the rows and ``seen``
            seen.add(rel)
            if (j is not None and c_mtime[j] == st.st_mtime_ns and c_size[j] == st.st_size and c_ino[j] == st.st_ino
                    and c_ctime[j] == st.st_ctime_ns):
                plabel = labels.get(label)
                if plabel is None:
                    plabel = labels[label] = printable(label)
                status = c_status[j]
                row = {"image_id": c_ids[j], "path": s, "relpath": rel, "label": plabel, "split": split,
                       "width": c_width[j], "height": c_height[j], "status": status, "reason": c_reason[j]}
                if status == "ok" and (not plabel or (split and split not in splits)):
                    _label_checked(row, splits)
                rows[i] = row
                continue
            todo.append((i, path, label, split, rel, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, "")))
    _budget(scan, len(todo), len(entries))
    n_read = len(todo)
    for k in range(n_read):  # each file's tuples are freed once it is done: a cold scan holds them all
        (i, path, label, split, rel, sig), todo[k] = todo[k], None
        row = inspect(Path(path), root, label, split)
        rows[i] = row
        if rel is not None and sig[1] < start_ns - RACY_NS:
            if row["status"] in _LABEL_STATUSES:  # what the bytes alone give, for a scan with a label
                row = inspect(Path(path), root, "?", "")
            entry = _entry_of(sig, row)
            if entry is not None:
                session.record(rel, entry)
    wrote = session.finish(seen) if session is not None else False
    return rows, {"files": len(entries), "read": n_read, "reused": len(entries) - n_read,
                  "index": session.index.path(session.name) if session else None, "index_written": wrote}


def _local_stat(s: str, root: Path, prefix: str, inside: dict, is_inside) -> tuple:
    """(stat, relpath) of a file an index entry may stand for, else (None, None).

    Anything ``_inspect`` refuses before reading (a name that is not UTF-8, a path resolving outside
    the root, missing, not a regular file, empty) gets None and is simply inspected: that costs no
    read. A symlink's signature is its target's, checked inside the root first.
    """
    try:
        st = os.lstat(s)
        if stat.S_ISLNK(st.st_mode):
            if not is_inside(Path(os.path.realpath(s)), root):
                return None, None
            st = os.stat(s)
        else:
            parent = s[:s.rfind("/")]
            ok = inside.get(parent)
            if ok is None:
                ok = inside[parent] = is_inside(Path(os.path.realpath(parent or "/")), root)
            if not ok:
                return None, None
    except OSError:
        return None, None
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or not s.startswith(prefix):
        return None, None
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return None, None
    return st, s[len(prefix):]


def _scan_remote(entries, top, splits, inspect, scan: Scan):
    session = _open_session(scan, ["remote", *top.identity()], {"source": top.url})
    table = _Table.empty() if session is None or scan.full_rescan else session.loaded
    rows: list = [None] * len(entries)
    todo, sigs, seen = [], {}, set()
    with _gc_paused():  # rows rebuilt from the index: see _gc_paused
        for i, (key, label, split) in enumerate(entries):
            rel = top.rel(key)
            info = top.infos.get(key)
            if info is not None and info.get("type") != "directory" and int(info.get("size") or 0) > 0:
                size, token = sources.signature(info)
                sig = (size, 0, 0, 0, token)
                seen.add(rel)
                j = table.pos.get(rel)
                if j is not None and tuple(c[j] for c in table.cols[:5]) == sig:
                    rows[i] = _cached_row(table, j, top.url_of(key), rel, label, split, splits)
                    continue
                sigs[i] = sig
            todo.append((i, key, label, split))  # missing and empty objects are "read" without a request
    _budget(scan, len(todo), len(entries))
    requests = 0
    missing = [t for t in todo if t[0] not in sigs]
    fetch = [t for t in todo if t[0] in sigs]
    for i, key, label, split in missing:  # never fetched: absent from the listing, or zero bytes
        with tempfile.TemporaryDirectory(prefix="precompute-scan-") as tmp:
            local = Path(tmp) / "object"
            if key in top.infos and top.infos[key].get("type") != "directory":
                local.write_bytes(b"")
            row = inspect(local, Path(tmp), label, split)
        url = top.url_of(key)
        row.update(path=url, relpath=top.rel(key), reason=row["reason"].replace(str(local), url))
        rows[i] = row
    for i, row, bytes_row in sources.fetch_and_inspect(top, fetch, inspect, scan.concurrency, scan.timeout_s,
                                                       relabel=_LABEL_STATUSES):
        rows[i] = row
        requests += 1
        if session is not None:
            entry = _entry_of(sigs[i], bytes_row)
            if entry is not None:
                session.record(top.rel(entries[i][0]), entry)
    wrote = session.finish(seen) if session is not None else False
    return rows, {"files": len(entries), "read": len(todo), "reused": len(entries) - len(todo),
                  "object_reads": requests, "index": session.index.path(session.name) if session else None,
                  "index_written": wrote}


# --------------------------------------------------------------------------- the manifest's content


def manifest_digest(manifest) -> str:
    """A digest of what a manifest says about the images: image ids, labels, splits and statuses.

    The ``image_manifest`` asset's data version: it changes exactly when an image's bytes, label,
    split or usability change (or one is added or removed), not when a file is only touched, moved
    or renamed, and not with row order.
    """
    cols = [manifest[c].astype(str).tolist() for c in ("image_id", "label", "split", "status")]
    lines = sorted("\t".join(t) for t in zip(*cols))
    h = hashlib.sha256(json.dumps({"label_delim": manifest.attrs.get("label_delim")}).encode())
    h.update("\n".join(lines).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]
