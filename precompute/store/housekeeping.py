"""Listing, verifying and cleaning a store; safe beside running writers and another housekeeper.

- Damage stays local: an entry whose key.json or commit records are damaged is listed with the
  problem, and the rest of the store is listed, verified and collected as usual.
- A writer holds a lease (``Entry.writing``) with an expiry; an entry with a live lease is never
  removed. Writing records a use as reading does.
- Everything tolerates files vanishing underneath it, so two housekeepers can run at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Iterable

from precompute.store.entry import Entry, _modified
from precompute.store.key import CacheKey

if TYPE_CHECKING:  # the store calls this module (ActivationStore.entries, .verify, .remove_unused)
    from precompute.store.activation_store import ActivationStore

log = logging.getLogger(__name__)


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


def _mtime(info: dict) -> float:
    for name in ("mtime", "LastModified", "last_modified"):
        value = info.get(name)
        if value is not None:
            return value if isinstance(value, (int, float)) else value.timestamp()
    return time.time()  # unknown age counts as new: never a reason to delete


def list_entries(store: ActivationStore) -> list[dict]:
    """Every entry folder: rows, size, last use, running writers and problems (newest use first)."""
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
        arch, cut, _ = rel.split("/")
        out.append({"entry": rel, "arch": arch, "xtra_cut": int(cut.split("=", 1)[1]) if cut[4:].isdigit() else cut,
                    "rows": rows, "bytes": sum(int(i.get("size") or 0) for p, i in files.items() if "/chunks/" in p),
                    "last_used": last, "writers": len(entry.live_leases()), "has_key": has_key,
                    "status": "ok" if not problems else "damaged", "problems": problems})
    return sorted(out, key=lambda e: -e["last_used"])


def remove_unused(store: ActivationStore, keep: Iterable[str] = (), unused_for_s: float = 30 * 86400,
                  orphan_grace_s: float = 3600.0, dry_run: bool = False) -> list[str]:
    """Remove entries not in ``keep`` and unused for ``unused_for_s``, and crash leftovers.

    ``keep`` holds entry paths in use (e.g. those the latest Dagster materializations point
    at); an entry read or written within ``unused_for_s``, or with a live writer, is kept. An
    entry folder without key.json (left by an interrupted removal) goes after ``orphan_grace_s``,
    as do chunk folders without a commit record, expired leases and temp or probe files.
    """
    keep, now, removed = set(keep), time.time(), []

    def rm(path: str, what: str) -> None:
        removed.append(what)
        if not dry_run:
            with contextlib.suppress(FileNotFoundError):
                store.fs.rm(path, recursive=True)

    for info in list_entries(store):
        rel, path = info["entry"], f"{store.base}/{info['entry']}"
        if info["writers"]:
            log.info("keeping %s: %d writer(s) hold a lease on it", rel, info["writers"])
            continue
        age = now - info["last_used"]
        if rel not in keep and (age > unused_for_s or (not info["has_key"] and age > orphan_grace_s)):
            rm(path, rel)
            continue
        for file, meta in _files(store, rel).items():
            name = file.rsplit("/", 1)[-1]
            leftover = ".tmp-" in name or ("/leases/" in file and name.endswith(".json"))
            if leftover and now - _mtime(meta) > orphan_grace_s:  # no live lease here (checked above)
                rm(file, file[len(store.base) + 1:])
        if info["has_key"]:
            entry, _ = _open(store, rel)
            for folder in _orphan_chunks(entry, orphan_grace_s):
                rm(folder, folder[len(store.base) + 1:])
    for probe in store.fs.glob(f"{store.base}/.probe-*"):
        if now - _modified(store.fs, probe) > orphan_grace_s:
            rm(probe, probe[len(store.base) + 1:])
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
            key = CacheKey(**attrs["key"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if key.rel() == entry.rel:  # the folder's name is the digest of the key: this is its key
            store.put(f"{entry.rel}/key.json", json.dumps(key.parts(), indent=2, sort_keys=True).encode())
            return True
    return False
