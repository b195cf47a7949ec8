"""The cache contract under crashes, concurrency and changing image sets (local store).

Workers are real processes (tests/_precompute_worker.py) running compute_activations; the
crash is a real SIGKILL. Bodies are tiny seeded conv nets, images small PNGs.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from tests._precompute_worker import SlowBody, TRANSFORM, make_key, manifest_of, write_images
from precompute.transforms import eval_transform
from precompute.features import compute_activations
from precompute.store import ActivationStore

WORKER = Path(__file__).with_name("_precompute_worker.py")
PROJECT = WORKER.parents[1]
RTOL, ATOL = 1e-5, 1e-6  # batches differ between runs; per-image results agree to float noise


class Worker:
    """A worker process (tests/_precompute_worker.py --serve) that runs jobs sent to it."""

    def __init__(self, log: Path):
        self.log_path = log
        with log.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, str(WORKER), "--serve"], cwd=PROJECT, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if "serving" not in json.loads(line):  # the start-up line
                self.lines.put(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, *args: str) -> None:
        self.proc.stdin.write(json.dumps(list(args)) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 150) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.alive(), f"worker died:\n{self.log()}"
                assert time.monotonic() < deadline, f"worker timed out:\n{self.log()}"
                continue
            out = json.loads(line)
            assert "error" not in out, f"{out['error']}\n{self.log()}"
            return out

    def log(self) -> str:
        return self.log_path.read_text()[-3000:]

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """``get(n)``: n live worker processes, reused across tests (each pays torch's import once)."""
    logs = tmp_path_factory.mktemp("worker-logs")
    pool: list[Worker] = []

    def get(n: int) -> list[Worker]:
        pool[:] = [w for w in pool if w.alive()]
        while len(pool) < n:
            pool.append(Worker(logs / f"worker{len(pool)}-{time.monotonic_ns()}.log"))
        return pool[:n]

    yield get
    for w in pool:  # idle between jobs, holding nothing: no clean shutdown to wait for
        w.kill()


def clean_run(tmp_path: Path, images: Path) -> tuple[list[str], np.ndarray]:
    """Reference activations: one uninterrupted run into a store of its own."""
    manifest = manifest_of(images)
    entry = ActivationStore(str(tmp_path / "clean")).entry(make_key())
    compute_activations(SlowBody(), manifest, eval_transform(TRANSFORM), entry, batch_size=4, chunk_rows=8)
    ids = list(manifest["image_id"])
    return ids, entry.read(ids)


def records(entry_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((entry_dir / "commits").glob("*.json"))}


def chunk_dirs(entry_dir: Path) -> set[str]:
    d = entry_dir / "chunks"
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


def test_two_concurrent_writers_of_one_partition(tmp_path, workers):
    images = tmp_path / "images"
    write_images(images, 40, seed=3)
    store_root = tmp_path / "store"
    go = tmp_path / "go"
    procs = workers(2)
    for n, w in enumerate(procs):
        w.start("--store", str(store_root), "--images", str(images), "--chunk-rows", "8",
                "--batch-size", "4", "--sleep-per-batch", "0.1",
                "--ready", str(tmp_path / f"ready{n}"), "--go", str(go))
    try:
        ids, expected = clean_run(tmp_path, images)
        deadline = time.monotonic() + 150
        while not all((tmp_path / f"ready{n}").exists() for n in range(2)):
            assert all(w.alive() for w in procs), "a worker died during start-up"
            assert time.monotonic() < deadline, "workers never got ready"
            time.sleep(0.01)
        go.touch()  # both start computing together
        stats = [w.result() for w in procs]
    except BaseException:
        for w in procs:
            w.kill()
        raise

    # they really overlapped: together they computed more than the partition holds
    assert all(s["computed"] == s["seen"] for s in stats)
    assert sum(s["computed"] for s in stats) > len(ids), stats

    entry = ActivationStore(str(store_root)).entry(make_key())
    entry_dir = store_root / entry.rel
    recs = records(entry_dir)
    # nothing overwritten, nothing half-done: one data folder per record, one per chunk committed
    assert len(recs) == sum(s["chunks"] for s in stats) == len(chunk_dirs(entry_dir))
    assert set(recs) == chunk_dirs(entry_dir)
    # exactly one row per image, equal to the clean run
    assert len(entry) == len(ids) and set(entry.index()) == set(ids)
    np.testing.assert_allclose(entry.read(ids), expected, rtol=RTOL, atol=ATOL)
    # every committed chunk, including the losing duplicates, is whole and right
    ref = dict(zip(ids, expected))
    for chunk, rec in recs.items():
        arr = zarr.open_array(str(entry_dir / "chunks" / chunk), mode="r")[:]
        assert list(arr.shape) == rec["shape"] and len(rec["ids"]) == len(arr)
        np.testing.assert_allclose(arr, np.stack([ref[i] for i in rec["ids"]]), rtol=RTOL, atol=ATOL)


def test_sigkill_midway_then_rerun_computes_only_uncommitted(tmp_path, workers):
    images = tmp_path / "images"
    write_images(images, 64)
    store_root = tmp_path / "store"
    entry_dir = store_root / ActivationStore(str(store_root)).entry(make_key()).rel
    (worker,) = workers(1)
    worker.start("--store", str(store_root), "--images", str(images), "--chunk-rows", "8",
                 "--batch-size", "4", "--sleep-per-batch", "0.05", "--commit-delay", "1.0")
    try:
        ids, expected = clean_run(tmp_path, images)  # overlaps the worker's start-up
        # Kill once >= 2 chunks are committed and a further chunk's data is on disk without its
        # record: the worst moment, between the two writes of a commit.
        deadline = time.monotonic() + 150
        while True:
            assert worker.alive() and worker.lines.empty(), f"worker ended before the kill:\n{worker.log()}"
            assert time.monotonic() < deadline, "worker never reached 2 commits"
            if (entry_dir / "commits").is_dir() and (entry_dir / "chunks").is_dir():
                recs = {p.stem for p in (entry_dir / "commits").glob("*.json")}
                if len(recs) >= 2 and chunk_dirs(entry_dir) - recs:
                    os.kill(worker.pid, signal.SIGKILL)
                    break
            time.sleep(0.01)
        worker.proc.wait(timeout=30)
        assert worker.proc.returncode == -signal.SIGKILL
    finally:
        worker.kill()

    recs = records(entry_dir)
    committed = [i for r in recs.values() for i in r["ids"]]
    orphans = chunk_dirs(entry_dir) - set(recs)
    assert len(recs) >= 2 and orphans, "the kill should land between a chunk's data and its record"
    assert 0 < len(committed) < len(ids) and len(set(committed)) == len(committed)

    # readers see exactly the committed rows; the orphaned chunk's rows are absent
    entry = ActivationStore(str(store_root)).entry(make_key())
    assert len(entry) == len(committed)
    assert set(entry.missing(ids)) == set(ids) - set(committed)
    assert {chunk for chunk, _ in entry.index().values()} == set(recs)
    with pytest.raises(KeyError):
        entry.read(ids)

    body = SlowBody()
    stats = compute_activations(body, manifest_of(images), eval_transform(TRANSFORM), entry,
                                batch_size=4, chunk_rows=8)
    assert body.seen == stats.computed == len(ids) - len(committed) > 0
    assert stats.reused == len(committed)
    assert entry.missing(ids) == []
    assert not orphans & {chunk for chunk, _ in entry.index(refresh=True).values()}
    np.testing.assert_allclose(entry.read(ids), expected, rtol=RTOL, atol=ATOL)


def test_incremental_add_replace_remove(tmp_path):
    images = tmp_path / "images"
    paths = write_images(images, 40, seed=5)
    entry = ActivationStore(str(tmp_path / "store")).entry(make_key())
    tf = eval_transform(TRANSFORM)

    def run(expect_new: set[str]):
        manifest = manifest_of(images)
        assert set(entry.missing(manifest["image_id"])) == expect_new
        body = SlowBody()
        stats = compute_activations(body, manifest, tf, entry, batch_size=4, chunk_rows=8)
        assert body.seen == stats.computed == len(expect_new)
        assert stats.reused == len(manifest) - len(expect_new)
        return manifest

    first = run(set(manifest_of(images)["image_id"]))
    assert len(first) == 40
    before = entry.read(list(first["image_id"]))

    # 5% more images: exactly those are computed
    write_images(images, 2, seed=6, prefix="new")
    added = set(manifest_of(images)["image_id"]) - set(first["image_id"])
    assert len(added) == 2
    second = run(added)

    # replace k images in place (same paths, new pixels): exactly k are computed
    k = 3
    rng = np.random.default_rng(7)
    for p in paths[:k]:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)
    replaced = set(manifest_of(images)["image_id"]) - set(second["image_id"])
    assert len(replaced) == k
    third = run(replaced)

    # remove images from the manifest: nothing is computed, the rest stays readable
    for p in paths[k:k + 5]:
        p.unlink()
    fourth = run(set())
    assert len(fourth) == len(third) - 5
    keep = list(fourth["image_id"])
    old = dict(zip(first["image_id"], before))
    unchanged = [i for i in keep if i in old]
    assert len(unchanged) == 40 - k - 5
    np.testing.assert_array_equal(entry.read(unchanged), np.stack([old[i] for i in unchanged]))
    _, expected = clean_run(tmp_path, images)
    np.testing.assert_allclose(entry.read(keep), expected, rtol=RTOL, atol=ATOL)


def _rows(ids: list[str], dim: int = 16) -> np.ndarray:
    """Deterministic, distinct rows: a reader can check any row it sees from its id alone."""
    return np.stack([int(i[1:]) + np.arange(dim, dtype="float32") / dim for i in ids]).astype("float32")


def test_chunk_data_without_its_record_is_absent(tmp_path):
    store = ActivationStore(str(tmp_path / "store"))
    entry = store.entry(make_key())
    entry.commit(["r0", "r1"], _rows(["r0", "r1"]))
    # the crash window of a commit: the chunk's data is fully written, its record is not
    ids = ["r10", "r11", "r12"]
    name = "crashwindow-0000"
    zarr.create_array(store.url(f"{entry.rel}/chunks/{name}"), data=_rows(ids))
    # ... and a record whose write was cut off (what the local write-then-rename leaves)
    record = json.dumps({"chunk": name, "ids": ids, "shape": [3, 16], "dtype": "float32"}).encode()
    commits = tmp_path / "store" / entry.rel / "commits"
    (commits / f"{name}.json.tmp-deadbeef").write_bytes(record[: len(record) // 2])

    assert entry.missing(["r0", *ids, "r1"]) == ids
    assert len(entry) == 2
    with pytest.raises(KeyError):
        entry.read(["r0", "r10"])
    np.testing.assert_array_equal(entry.read(["r1", "r0"]), _rows(["r1", "r0"]))

    # the record is the only switch: once it lands, the whole chunk is there at once
    (commits / f"{name}.json").write_bytes(record)
    assert entry.missing(["r0", *ids]) == []
    np.testing.assert_array_equal(entry.read(ids[::-1]), _rows(ids[::-1]))


def test_reader_sees_whole_chunks_or_nothing_while_a_writer_commits(tmp_path):
    root = str(tmp_path / "store")
    writer = ActivationStore(root).entry(make_key())
    reader = ActivationStore(root).entry(make_key())  # a separate store object, as another process has
    chunks = [[f"r{c * 5 + j}" for j in range(5)] for c in range(30)]
    chunk_of = {i: c for c, ids in enumerate(chunks) for i in ids}
    done = threading.Event()
    errors: list[BaseException] = []

    def write():
        try:
            for ids in chunks:
                writer.commit(ids, _rows(ids))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    seen_sizes: list[int] = []
    try:
        while True:
            finished = done.is_set()
            visible = list(reader.index(refresh=True))
            per_chunk: dict[int, int] = {}
            for i in visible:
                per_chunk[chunk_of[i]] = per_chunk.get(chunk_of[i], 0) + 1
            assert all(n == 5 for n in per_chunk.values()), per_chunk  # whole chunks only
            if visible:  # every visible row reads back right: data landed before the record
                np.testing.assert_array_equal(reader.read(visible), _rows(visible))
            assert not seen_sizes or len(visible) >= seen_sizes[-1]  # never goes backwards
            seen_sizes.append(len(visible))
            if finished:
                break
    finally:
        thread.join()
    assert not errors, errors
    assert seen_sizes[-1] == 150
    assert len(set(seen_sizes)) > 2, "the reader should have caught the writer midway"
