"""Listing, verifying and cleaning a store; safe beside running writers and another housekeeper.

- Damage stays local: an entry whose key.json or commit records are damaged is listed with the
  problem, and the rest of the store is listed, verified and collected as usual.
- A writer holds a lease (``Entry.claim`` / ``Entry.writing``) with a time to live measured on the
  store's clock; an entry with a live lease is never removed. Writing records a use as reading does.
- Removal decides again at the moment it removes: leases and last use are read afresh; on a local
  store the entry is first renamed into ``.trash/`` (atomic: a writer arriving later starts a fresh
  entry) and its leases checked once more there, so a writer that took its lease in between gets
  its entry back. On object stores (no rename) the fresh check comes right before the deletion,
  and a writer that slips in between fails its final ``Entry.confirm`` instead of reporting rows
  that are gone.
- Everything tolerates files vanishing underneath it, so two housekeepers can run at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import TYPE_CHECKING, Callable, Iterable

from precompute.store.entry import Entry
from precompute.store.leases import _modified, _mtime
from precompute.store.key import CacheKey

if TYPE_CHECKING:  # the store calls this module (ActivationStore.entries, .verify, .remove_unused)
    from precompute.store.activation_store import ActivationStore

log = logging.getLogger(__name__)

TRASH = ".trash"  # <store>/.trash/<id>/<entry rel>: entries being removed, out of every writer's reach


def _entry_folders(store: ActivationStore) -> list[str]:
    """Paths under the root of every entry folder, with or without a key.json."""
    fs = store.fs
    with contextlib.suppress(FileNotFoundError, AttributeError):
        fs.invalidate_cache(store.base)
    out = []
    for path in fs.glob(f"{store.base}/*/cut=*/*"):
        rel = path[len(store.base) + 1:].rstrip("/")
        if len(rel.split("/")) == 3 and fs.isdir(path):
            out.append(rel)
    return sorted(out)


def _open(store: ActivationStore, rel: str) -> tuple[Entry, str]:
    """The entry at ``rel`` and what is wrong with its key.json ("" when nothing)."""
    try:
        return store.open_rel(rel), ""
    except ValueError as exc:
        return Entry(store, rel, None), str(exc)  # type: ignore[arg-type] - commits and blocks need no key


def _files(store: ActivationStore, rel: str) -> dict[str, dict]:
    try:
        return store.fs.find(f"{store.base}/{rel}", detail=True)
    except FileNotFoundError:
        return {}


def list_entries(store: ActivationStore, now: float | None = None) -> list[dict]:
    """Every entry folder: rows, size, last use, running writers, leases that hold nothing (expired,
    their writer gone, junk) and problems, newest use first. ``now``: the store's clock."""
    out = []
    for rel in _entry_folders(store):
        entry, key_problem = _open(store, rel)
        files = _files(store, rel)
        if not files:
            continue  # removed meanwhile
        problems = [key_problem] if key_problem else []
        try:
            rows = len(entry)
        except OSError as exc:
            rows, problems = 0, problems + [f"commit records cannot be listed ({exc})"]
        problems += list(entry.damaged.values())
        has_key = not key_problem.endswith("is missing")
        last = entry.last_used() if has_key else max(_mtime(i) for i in files.values())
        leases = entry.leases(now)
        arch, cut, _ = rel.split("/")
        out.append({"entry": rel, "arch": arch, "xtra_cut": int(cut.split("=", 1)[1]) if cut[4:].isdigit() else cut,
                    "rows": rows, "bytes": sum(int(i.get("size") or 0) for p, i in files.items() if "/chunks/" in p),
                    "last_used": last, "writers": sum(x.state == "live" for x in leases),
                    "stale_leases": [f"{x.detail} ({x.state})" for x in leases if x.state != "live"],
                    "has_key": has_key, "status": "ok" if not problems else "damaged", "problems": problems})
    return sorted(out, key=lambda e: -e["last_used"])


def remove_unused(store: ActivationStore, keep: Iterable[str] = (), unused_for_s: float = 30 * 86400,
                  orphan_grace_s: float = 3600.0, dry_run: bool = False) -> list[str]:
    """Remove entries not in ``keep`` and unused for ``unused_for_s``, and crash leftovers.

    ``keep`` holds entry paths in use (e.g. those the latest Dagster materializations point
    at); an entry read or written within ``unused_for_s``, or with a live writer, is kept (both
    checked again at the moment of removal). An entry folder without key.json (left by an
    interrupted removal) goes after ``orphan_grace_s``, as do chunk folders without a commit
    record, temp and probe files, and what an interrupted removal left in ``.trash``. Leases that
    hold nothing (expired, writer gone, junk) go at once.
    """
    keep, removed = set(keep), []
    now = store.now()

    def rm(path: str, what: str) -> None:
        removed.append(what)
        if not dry_run:
            _rm(store, path)

    for info in list_entries(store, now):
        rel, path = info["entry"], f"{store.base}/{info['entry']}"
        if info["writers"]:
            log.info("keeping %s: %d writer(s) hold a lease on it", rel, info["writers"])
            continue
        if rel not in keep and _unused(info["has_key"], info["last_used"], time.time(), unused_for_s, orphan_grace_s):
            if dry_run or _take_away(store, rel, lambda e, info=info: _still_unused(
                    e, info, unused_for_s, orphan_grace_s)):
                removed.append(rel)
            continue
        entry = Entry(store, rel, None)  # type: ignore[arg-type] - leases and files need no key
        for lease in entry.leases(now):
            if lease.state != "live":
                rm(lease.path, lease.path[len(store.base) + 1:])
        for file, meta in _files(store, rel).items():
            name = file.rsplit("/", 1)[-1]
            if ".tmp-" in name and now - _mtime(meta) > orphan_grace_s:
                rm(file, file[len(store.base) + 1:])
        if info["has_key"]:
            entry, _ = _open(store, rel)
            for folder in _orphan_chunks(entry, orphan_grace_s):
                rm(folder, folder[len(store.base) + 1:])
    for probe in store.fs.glob(f"{store.base}/.probe-*"):
        if now - _modified(store.fs, probe) > orphan_grace_s:
            rm(probe, probe[len(store.base) + 1:])
    if store.local and not dry_run:
        removed += _empty_trash(store, now, orphan_grace_s)
    return removed


def _unused(has_key: bool, last_used: float, now: float, unused_for_s: float, orphan_grace_s: float) -> bool:
    return now - last_used > (unused_for_s if has_key else orphan_grace_s)


def _still_unused(entry: Entry, info: dict, unused_for_s: float, orphan_grace_s: float) -> bool:
    """The listing's verdict, read again at the moment of removal (the listing may be minutes old)."""
    if not info["has_key"]:
        return not entry.store.fs.exists(f"{entry.path}/key.json")
    return _unused(True, entry.last_used(), time.time(), unused_for_s, orphan_grace_s)


def _rm(store: ActivationStore, path: str) -> bool:
    """Remove a file or folder; False (logged) when something appeared in it meanwhile or it could
    not be removed: the next gc tries again. Never an error: gc goes on with the rest."""
    try:
        store.fs.rm(path, recursive=True)
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("could not remove all of %s (%s): the next `precompute cache gc` tries again", path, exc)
        return False


def _take_away(store: ActivationStore, rel: str, still_unused: Callable[[Entry], bool]) -> bool:
    """Remove one entry, deciding again now: no live lease and still unused (``still_unused``).
    Local stores: rename into .trash (after which no writer reaches it), check its leases once more
    there (a writer that leased it in between gets it back), then delete it."""
    entry = Entry(store, rel, None)  # type: ignore[arg-type]
    if entry.live_leases() or not still_unused(entry):
        log.info("keeping %s: in use again", rel)
        return False
    path = f"{store.base}/{rel}"
    if not store.local:
        _rm(store, path)
        if Entry(store, rel, None).live_leases():  # type: ignore[arg-type]
            log.warning("a writer leased %s while it was removed: that run fails its final check and "
                        "must be run again", rel)
        return True
    trash = f"{store.base}/{TRASH}/{uuid.uuid4().hex}"
    os.makedirs(f"{trash}/{rel}".rsplit("/", 1)[0], exist_ok=True)
    try:
        os.rename(path, f"{trash}/{rel}")
    except OSError as exc:
        shutil.rmtree(trash, ignore_errors=True)
        if not isinstance(exc, FileNotFoundError):  # not found: removed meanwhile (another gc)
            log.warning("could not remove %s (%s): the next `precompute cache gc` tries again", rel, exc)
        return False
    if _give_back_if_leased(store, trash, rel):
        return False
    _rm(store, trash)
    return True


def _give_back_if_leased(store: ActivationStore, trash: str, rel: str) -> bool:
    """A writer took its lease between the last check and the rename: move the entry back. If
    the writer has since started the folder again, merge file by file (chunk and lease names are
    unique to their writer, so nothing is overwritten; commit records go last)."""
    gone = Entry(store, f"{trash[len(store.base) + 1:]}/{rel}", None)  # type: ignore[arg-type]
    if not gone.live_leases():
        return False
    src, dst = f"{trash}/{rel}", f"{store.base}/{rel}"
    log.warning("a writer leased %s while gc removed it: giving it back", rel)
    try:
        os.rename(src, dst)
    except OSError:  # the writer made the folder again meanwhile
        files = [os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs]
        for file in sorted(files, key=lambda f: "/commits/" in f):  # data first, records last
            target = dst + file[len(src):]
            if not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(file, target)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _empty_trash(store: ActivationStore, now: float, grace_s: float) -> list[str]:
    """What an interrupted removal left in .trash: given back when a writer holds a lease in it,
    deleted otherwise (after ``grace_s``, so a running gc's own trash is left to it)."""
    removed = []
    for trash in store.fs.glob(f"{store.base}/{TRASH}/*"):
        if now - _modified(store.fs, trash) <= grace_s:
            continue
        for path in store.fs.glob(f"{trash}/*/cut=*/*"):
            rel = path[len(trash) + 1:]
            if not _give_back_if_leased(store, trash, rel):
                removed.append(f"{TRASH}/{trash.rsplit('/', 1)[-1]}/{rel}")
        _rm(store, trash)
    return removed


def _orphan_chunks(entry: Entry, grace_s: float) -> list[str]:
    """Chunk folders with no commit record (sound or damaged), older than ``grace_s``: what a crash left."""
    fs, now = entry.store.fs, time.time()
    entry.index(refresh=True)
    committed = set(entry.records) | set(entry.damaged)
    orphans = []
    for folder in fs.glob(f"{entry.path}/chunks/*"):
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        if name not in committed and now - _modified(fs, f"{folder}/zarr.json") > grace_s:
            orphans.append(folder)
    return orphans


def verify_store(store: ActivationStore, repair: bool = False) -> list[dict]:
    """Every entry checked block by block (``Entry.verify``); with ``repair``, damaged chunks and
    commit records are dropped (their rows are recomputed by the next precompute) and a damaged
    key.json is rewritten from a sound chunk's own copy of the key."""
    results = []
    for rel in _entry_folders(store):
        entry, key_problem = _open(store, rel)
        report = entry.repair() if repair else entry.verify()
        fixed_key = False
        if key_problem and repair:
            fixed_key = _restore_key(store, entry, report.verified)
        results.append({"entry": rel, "verified": len(report.verified), "unverified": len(report.unverified),
                        "damaged": report.damaged, "key_problem": key_problem, "repaired": repair,
                        "key_restored": fixed_key})
    return results


def _restore_key(store: ActivationStore, entry: Entry, sound_chunks: list[str]) -> bool:
    for chunk in sound_chunks:
        try:
            attrs = json.loads(store.fs.cat_file(f"{entry.path}/chunks/{chunk}/zarr.json"))["attributes"]
            key = CacheKey.from_parts(attrs["key"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if key.rel() == entry.rel:  # the folder's name is the digest of the key: this is its key
            store.put(f"{entry.rel}/key.json", json.dumps(key.parts(), indent=2, sort_keys=True).encode())
            return True
    return False
