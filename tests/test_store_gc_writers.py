"""gc and writers agree (issue 19): gc decides again at the moment it removes, writers take their
lease before they list what to reuse and confirm every row they report, lease ages are measured
on the store's clock, leases that hold nothing are reported as such, and concurrent removal never
crashes gc. The stress test at the end is the issue's race, in separate processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import precompute.store.entry as entry_module
import precompute.store.leases as leases_module
import precompute.store.housekeeping as housekeeping
from precompute.cli import main as cli
from precompute.transforms import eval_transform
from precompute.features import compute_activations
from precompute.store import ActivationStore
from tests._precompute_worker import TRANSFORM, SlowBody, make_key, manifest_of, write_images

PROJECT = Path(__file__).resolve().parents[1]
DAY = 86400


def _old(store: ActivationStore, entry, days: float = 60) -> None:
    store.put(f"{entry.rel}/last_used", str(time.time() - days * DAY).encode())


def _rows(n: int, dim: int = 4, start: float = 0.0) -> np.ndarray:
    return (start + np.arange(n * dim, dtype="float32")).reshape(n, dim)


def fill(store: ActivationStore, images: Path):
    manifest = manifest_of(images)
    entry = store.entry(make_key())
    stats = compute_activations(SlowBody(), manifest, eval_transform(TRANSFORM), entry, batch_size=4, chunk_rows=8)
    ids = list(manifest["image_id"])
    return entry, ids, entry.read(ids), stats


def test_gc_checks_leases_again_when_it_removes(tmp_path, monkeypatch):
    """gc's listing is taken before a writer starts; the writer leases the entry and plans to reuse
    its rows; gc's removal, working from the old listing, must see the lease and keep the entry."""
    store = ActivationStore(str(tmp_path / "store"))
    entry = store.entry(make_key())
    entry.commit(["a", "b"], _rows(2))
    _old(store, entry)
    listing = housekeeping.list_entries(store)  # no writer yet: the entry is a candidate
    assert listing[0]["writers"] == 0

    writer = store.entry(entry.key)
    with writer.writing():
        assert writer.missing(["a", "b", "c"]) == ["c"]  # it will reuse a and b
        monkeypatch.setattr(housekeeping, "list_entries", lambda *args, **kw: listing)
        assert store.remove_unused(unused_for_s=30 * DAY) == []
        monkeypatch.undo()
        writer.commit(["c"], _rows(1, start=100))
    np.testing.assert_array_equal(store.entry(entry.key).read(["a", "b", "c"]),
                                  np.concatenate([_rows(2), _rows(1, start=100)]))


def test_gc_after_a_writer_listed_its_rows_gives_the_entry_back(tmp_path, monkeypatch):
    """The narrowest window: the writer's lease lands between gc's last check and its removal.
    A local gc renames the entry away first and looks for leases there: the writer gets it back."""
    store = ActivationStore(str(tmp_path / "store"))
    entry = store.entry(make_key())
    entry.commit(["a", "b"], _rows(2))
    _old(store, entry)
    writer = store.entry(entry.key)
    real = entry_module.Entry.live_leases
    calls = []

    def lease_lands_after_the_check(self, now=None):
        live = real(self, now)
        if not calls and self.rel == entry.rel:  # gc's check at removal: the writer claims right after it
            calls.append(writer.claim(["a", "b", "c"]))
        return live

    monkeypatch.setattr(entry_module.Entry, "live_leases", lease_lands_after_the_check)
    assert store.remove_unused(unused_for_s=30 * DAY) == []
    monkeypatch.undo()
    assert calls == [["c"]]
    writer.commit(["c"], _rows(1, start=100))
    writer.confirm(["a", "b", "c"])
    assert store.entry(entry.key).read(["a", "b", "c"]).shape == (3, 4)
    assert not (tmp_path / "store" / ".trash").exists() or not any((tmp_path / "store" / ".trash").iterdir())


def test_writer_fails_when_rows_it_reused_are_removed_meanwhile(tmp_path):
    """Rows counted as reused are removed while the writer runs (by hand here; gc on an object
    store in the worst case): the writer names how many are missing and reports no success."""
    images = tmp_path / "images"
    write_images(images, 16)
    store = ActivationStore(str(tmp_path / "store"))
    entry, ids, _, _ = fill(store, images)
    write_images(images, 8, seed=1, prefix="new")
    commits = tmp_path / "store" / entry.rel / "commits"

    class RemovesTheOldRows(SlowBody):
        def forward(self, x):
            for record in commits.glob("*.json"):
                if json.loads(record.read_text())["ids"][0] in ids:
                    record.unlink()
            return super().forward(x)

    with pytest.raises(RuntimeError, match="16 of the 24 rows this run reports .* are missing"):
        compute_activations(RemovesTheOldRows(), manifest_of(images), eval_transform(TRANSFORM),
                            store.entry(entry.key), batch_size=4, chunk_rows=8)
    assert not list((tmp_path / "store" / entry.rel / "leases").glob("*.json"))  # the lease went back


def test_writer_fails_when_block_files_of_its_rows_are_gone(tmp_path):
    images = tmp_path / "images"
    write_images(images, 16)
    store = ActivationStore(str(tmp_path / "store"))
    entry, ids, _, _ = fill(store, images)
    chunks = tmp_path / "store" / entry.rel / "chunks"

    class RemovesBlocks(SlowBody):
        def forward(self, x):
            for block in chunks.glob("*/c/0/0"):
                block.unlink()
            return super().forward(x)

    write_images(images, 1, seed=2, prefix="new")
    with pytest.raises(RuntimeError, match="16 of the 17 rows .* are missing"):
        compute_activations(RemovesBlocks(), manifest_of(images), eval_transform(TRANSFORM), store.entry(entry.key),
                            batch_size=4, chunk_rows=8)


def test_gc_survives_files_appearing_in_what_it_removes(tmp_path, monkeypatch, capsys):
    """A writer's file lands inside a folder gc is removing (`OSError: [Errno 39] Directory not
    empty: 'chunks'`): gc says so and goes on; the next gc finishes the job."""
    store = ActivationStore(str(tmp_path / "store"))
    for arch in ("resnet18", "resnet34"):
        e = store.entry(make_key(arch=arch))
        e.commit(["a"], _rows(1))
        _old(store, e, days=90)
    real_rmdir = os.rmdir
    landed = []

    def rmdir(path, *, dir_fd=None):
        if os.path.basename(path) == "chunks" and not landed:  # a commit lands mid-removal
            fd = os.open(os.path.join(path, "late"), os.O_CREAT | os.O_WRONLY, dir_fd=dir_fd)
            os.close(fd)
            landed.append(path)
        return real_rmdir(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "rmdir", rmdir)
    assert cli(["cache", "gc", "--store", store.root, "--unused-days", "30"]) == 0
    monkeypatch.undo()
    assert landed
    assert "resnet18" in capsys.readouterr().out
    cli(["cache", "gc", "--store", store.root, "--unused-days", "30"])
    assert store.entries() == []


def test_lease_age_is_measured_on_the_store_clock(tmp_path, monkeypatch):
    """A writer whose clock is 1000 s behind holds a lease; gc (right clock) keeps its entry."""
    store = ActivationStore(str(tmp_path / "store"))
    entry = store.entry(make_key())
    entry.commit(["a", "b"], _rows(2))
    _old(store, entry)
    behind = types.SimpleNamespace(time=lambda: time.time() - 1000, monotonic=time.monotonic)
    writer = store.entry(entry.key)
    monkeypatch.setattr(entry_module, "time", behind)
    monkeypatch.setattr(leases_module, "time", behind)
    with writer.writing():
        monkeypatch.undo()  # the writer's lease is written; gc runs on a right clock
        assert store.remove_unused(unused_for_s=30 * DAY) == []
        assert store.entries()[0]["writers"] == 1
        writer.commit(["c"], _rows(1, start=100))
    assert store.entry(entry.key).read(["a", "b", "c"]).shape == (3, 4)


def test_dead_and_junk_leases_are_reported_as_stale_and_hold_nothing(tmp_path, capsys):
    store = ActivationStore(str(tmp_path / "store"))
    dead = store.entry(make_key())
    dead.commit(["a"], _rows(1))
    _old(store, dead)
    # a writer that died holding its lease (os._exit skips the release)
    script = ("import os, sys; from precompute.store import ActivationStore; from tests._precompute_worker import make_key\n"
              "e = ActivationStore(sys.argv[1]).entry(make_key())\n"
              "with e.writing():\n    os._exit(0)\n")
    subprocess.run([sys.executable, "-c", script, store.root], cwd=PROJECT, check=True, timeout=120)
    junk = store.entry(make_key(arch="resnet50"))
    junk.commit(["b"], _rows(1))
    _old(store, junk)
    Path(store.base, junk.rel, "leases").mkdir()
    Path(store.base, junk.rel, "leases", "x.json").write_bytes(b"\x00 not a lease")

    assert len(list(Path(store.base, dead.rel, "leases").glob("*.json"))) == 1
    assert cli(["cache", "list", "--store", store.root]) == 0
    out = capsys.readouterr().out
    assert "writer(s)" not in out and out.count("1 stale lease(s)") == 2
    assert "has exited (gone)" in out and "leases/x.json is not a lease (junk)" in out
    assert sorted(store.remove_unused(unused_for_s=30 * DAY)) == sorted([dead.rel, junk.rel])


def test_gc_on_s3_checks_leases_when_it_removes_and_reports_stale_ones(bucket, monkeypatch):
    """Object stores have no rename: gc checks leases (LastModified on the store's clock) right
    before it deletes. A listing taken before the writer came does not get its entry removed."""
    name, client, options = bucket
    store = ActivationStore(f"s3://{name}/acts", storage_options=options)
    leased = store.entry(make_key())
    leased.commit(["a", "b"], _rows(2))
    _old(store, leased)
    other = store.entry(make_key(arch="resnet50"))
    other.commit(["x"], _rows(1))
    _old(store, other)
    store.put(f"{other.rel}/leases/junk.json", b"not a lease")
    listing = housekeeping.list_entries(store)
    assert [e["writers"] for e in listing] == [0, 0] and [len(e["stale_leases"]) for e in listing].count(1) == 1

    writer = store.entry(leased.key)
    assert writer.claim(["a", "b", "c"]) == ["c"]
    monkeypatch.setattr(housekeeping, "list_entries", lambda *args, **kw: listing)
    assert store.remove_unused(unused_for_s=30 * DAY) == [other.rel]
    monkeypatch.undo()
    writer.commit(["c"], _rows(1, start=100))
    writer.confirm(["a", "b", "c"])
    assert store.entry(leased.key).read(["a", "b", "c"]).shape == (3, 4)
    assert [e["entry"] for e in store.entries()] == [leased.rel]


def test_file_url_store_works(tmp_path, capsys):
    folder = tmp_path / "store"
    store = ActivationStore("file://" + str(folder))
    entry = store.entry(make_key())
    entry.commit(["a", "b"], _rows(2))
    np.testing.assert_array_equal(ActivationStore("file://" + str(folder)).entry(make_key()).read(["b", "a"]),
                                  _rows(2)[::-1])
    np.testing.assert_array_equal(ActivationStore(str(folder)).entry(make_key()).read(["a"]), _rows(1))
    assert [e["entry"] for e in store.entries()] == [entry.rel] and store.entries()[0]["rows"] == 2
    assert cli(["cache", "verify", "--store", "file://" + str(folder)]) == 0
    _old(store, entry)
    assert store.remove_unused(unused_for_s=30 * DAY) == [entry.rel]
    assert not (folder / entry.rel).exists()


# -- the race, in processes -----------------------------------------------------------------

ROUNDS = 20
OLD_ENTRIES = 400


@pytest.fixture
def fast_dir(tmp_path):
    """A folder on tmpfs where there is one: removing 400 entries takes ~25 s on this machine's disk
    and ~3 s there; the race is the same."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="gc-race-", dir="/dev/shm"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _template(root: Path, images: Path) -> None:
    """The entry (16 images, last used 60 days ago) among 400 other entries last used 31 to 89 days
    ago: gc, which takes the newest first, reaches it halfway, about when the writer starts."""
    store = ActivationStore(str(root))
    entry = store.entry(make_key())
    compute_activations(SlowBody(), manifest_of(images), eval_transform(TRANSFORM), entry, batch_size=4,
                        chunk_rows=8)
    _old(store, entry, days=60)
    for i in range(OLD_ENTRIES):
        other = store.entry(make_key(arch=f"old{i:03d}"))
        other.commit([f"x{i}"], _rows(1))
        _old(store, other, days=31 + 58 * i / OLD_ENTRIES)


@pytest.mark.slow
def test_gc_racing_a_writer_loses_no_row(tmp_path, fast_dir):
    """The issue's setup, 20 rounds: `cache gc --unused-days 30` on a store with one entry last used
    60 days ago and 400 other old entries; ~1.2 s later a precompute of a superset of the entry's
    images into the same store (separate processes). Every round: gc exits 0, the writer finishes
    (never a success over missing rows: its final check would fail it), and every row it reports
    is there and equal to a clean run's."""
    images = tmp_path / "images"
    write_images(images, 16)
    _template(fast_dir / "template", images)
    write_images(images, 8, seed=1, prefix="new")
    manifest = manifest_of(images)
    ids = list(manifest["image_id"])
    clean = ActivationStore(str(tmp_path / "clean")).entry(make_key())
    compute_activations(SlowBody(), manifest, eval_transform(TRANSFORM), clean, batch_size=4, chunk_rows=8)
    expected = clean.read(ids)

    from tests.test_store_durability import Worker

    worker = Worker(tmp_path / "worker.log")  # started once: torch is imported once, not every round
    first_removed = Path(make_key(arch="old000").rel())  # the newest of the others: gc's first removal
    outcomes = []
    try:
        for n in range(ROUNDS):
            root = fast_dir / f"round{n}"
            shutil.copytree(fast_dir / "template", root)
            # where gc meets the entry sweeps from its first removals to its last over the rounds
            ActivationStore(str(root)).put(f"{make_key().rel()}/last_used",
                                           str(time.time() - (31 + 58 * (n + 0.5) / ROUNDS) * DAY).encode())
            ready, go = tmp_path / f"ready{n}", tmp_path / f"go{n}"
            worker.start("--store", str(root), "--images", str(images), "--chunk-rows", "8", "--batch-size", "4",
                         "--ready", str(ready), "--go", str(go))
            while not ready.exists():
                assert worker.alive(), worker.log()
                time.sleep(0.005)
            gc = subprocess.Popen([sys.executable, "-m", "precompute.cli", "cache", "gc", "--store", str(root),
                                   "--unused-days", "30"], cwd=PROJECT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
            started = time.monotonic()
            # The writer goes 1.2 s after gc, or once gc has listed the store and begun removing if that
            # is later (it is on a loaded machine): gc then holds a listing older than the writer.
            while gc.poll() is None and (time.monotonic() - started < 1.2 or (root / first_removed).exists()):
                time.sleep(0.005)
            overlapped = gc.poll() is None
            go.touch()
            try:
                result = worker.result(timeout=300)
            except AssertionError as exc:
                raise AssertionError(f"round {n}: {exc}") from None  # a failed final check is loud, never success
            out, err = gc.communicate(timeout=300)
            assert gc.returncode == 0, err
            entry = ActivationStore(str(root)).entry(make_key())
            assert entry.missing(ids) == [], f"round {n}: the writer reported success over missing rows {result}"
            np.testing.assert_allclose(entry.read(ids), expected, rtol=1e-5, atol=1e-6)
            assert entry.verify().ok
            assert (result["computed"], result["reused"]) in {(8, 16), (24, 0)}, result
            outcomes.append(("reused" if result["reused"] else "removed first", overlapped))
            shutil.rmtree(root)
    finally:
        worker.kill()
    print(outcomes)
    assert sum(overlapped for _, overlapped in outcomes) >= ROUNDS // 2, f"gc and the writer rarely overlapped: {outcomes}"
