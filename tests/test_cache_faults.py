"""Fault injection: the cache never serves a wrong number (issue: deleted, truncated and flipped
blocks, garbage records and keys, read-only and full disks, gc racing a writer).

Each fault is made on real files (a local store, and moto's S3 server through boto3, a client
with no cache in common with the store's s3fs). Each test shows a clear error naming the file,
or an exact repair: the rows recomputed equal the rows first computed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from precompute.cli import main as cli
from precompute.features import compute_activations
from precompute.store import ActivationStore, CacheCorruption
from precompute.transforms import eval_transform
from tests._precompute_worker import TRANSFORM, SlowBody, make_key, manifest_of, write_images

PROJECT = Path(__file__).resolve().parents[1]
N, CHUNK = 24, 8  # three chunks of eight rows


def fill(store: ActivationStore, images: Path, pooled: bool = True):
    """The entry for ``images`` computed by a small real conv body; (entry, ids, rows, stats)."""
    manifest = manifest_of(images)
    entry = store.entry(make_key(pooled=pooled))
    stats = compute_activations(SlowBody(), manifest, eval_transform(TRANSFORM), entry, batch_size=4, chunk_rows=CHUNK)
    ids = list(manifest["image_id"])
    return entry, ids, entry.read(ids), stats


class Files:
    """Raw access to the store's files, bypassing the store: a local folder or an S3 bucket."""

    def __init__(self, store: ActivationStore, client=None, bucket_name: str | None = None):
        self.store, self.client, self.bucket = store, client, bucket_name

    def _key(self, rel: str) -> str:
        return f"{self.store.base}/{rel}".split("/", 1)[1]  # s3fs path "bucket/prefix/..." -> object key

    def read(self, rel: str) -> bytes:
        if self.client is None:
            return Path(self.store.base, rel).read_bytes()
        return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()

    def write(self, rel: str, data: bytes) -> None:
        if self.client is None:
            Path(self.store.base, rel).write_bytes(data)
        else:
            self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)

    def delete(self, rel: str) -> None:
        if self.client is None:
            Path(self.store.base, rel).unlink()
        else:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))


def block_of(entry, ids: list[str]) -> tuple[str, str]:
    """(chunk, file under the entry) of the first block of the chunk holding the 9th image."""
    entry.index(refresh=True)
    chunk = entry.index()[ids[CHUNK]][0]
    return chunk, f"chunks/{chunk}/{entry._layout(chunk).block_file(0)}"


FAULTS = {
    "deleted": lambda raw: None,
    "truncated": lambda raw: raw[: len(raw) // 2],
    "bit_flipped": lambda raw: raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0x01]) + raw[len(raw) // 2 + 1:],
}


def damage(files: Files, rel: str, fault: str) -> None:
    new = FAULTS[fault](files.read(rel))
    files.delete(rel) if new is None else files.write(rel, new)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(store, raw file access) on a local folder or on moto's S3 server."""
    if request.param == "local":
        store = ActivationStore(str(tmp_path / "store"))
        return store, Files(store)
    name, client, options = request.getfixturevalue("bucket")
    store = ActivationStore(f"s3://{name}/acts", storage_options=options)
    return store, Files(store, client, name)


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("pooled", [True, False], ids=["pooled-raw", "spatial-lz4"])
def test_damaged_block_is_an_error_naming_it_then_repaired_exactly(tmp_path, where, fault, pooled):
    store, files = where
    images = tmp_path / "images"
    write_images(images, N)
    entry, ids, expected, _ = fill(store, images, pooled)
    chunk, rel = block_of(entry, ids)
    damage(files, f"{entry.rel}/{rel}", fault)

    reader = store.entry(entry.key)  # a fresh reader, as another process
    with pytest.raises(CacheCorruption) as err:
        reader.read(ids)
    assert (err.value.entry, err.value.chunk, err.value.file) == (entry.rel, chunk, rel)
    assert entry.rel in str(err.value) and rel in str(err.value) and "verify --repair" in str(err.value)
    with pytest.raises(CacheCorruption):
        list(reader.iter_blocks(ids))
    # the rows of the other chunks are still served, and right
    others = [i for i in ids if reader.index()[i][0] != chunk]
    np.testing.assert_array_equal(reader.read(others), expected[[ids.index(i) for i in others]])

    report = reader.verify()
    assert list(report.damaged) == [chunk] and rel in report.damaged[chunk] and len(report.verified) == 2
    reader.repair()
    assert reader.missing(ids) == ids[CHUNK:2 * CHUNK]  # the damaged chunk's rows, and only those
    stats = compute_activations(SlowBody(), manifest_of(images), eval_transform(TRANSFORM), reader,
                                batch_size=4, chunk_rows=CHUNK)
    assert (stats.computed, stats.reused) == (CHUNK, N - CHUNK)
    np.testing.assert_array_equal(store.entry(entry.key).read(ids), expected)
    assert store.entry(entry.key).verify().ok


def test_damaged_zarr_json_is_found_by_verify_and_repaired(tmp_path, where):
    store, files = where
    images = tmp_path / "images"
    write_images(images, N)
    entry, ids, expected, _ = fill(store, images)
    chunk, _ = block_of(entry, ids)
    files.write(f"{entry.rel}/chunks/{chunk}/zarr.json", b'{"zarr_format": 3, "node_type": "arr')
    # reads take the layout from the checksummed commit record: still right
    np.testing.assert_array_equal(store.entry(entry.key).read(ids), expected)
    (found,) = store.verify()
    assert list(found["damaged"]) == [chunk] and "zarr.json" in found["damaged"][chunk]
    report = store.entry(entry.key).repair()
    assert list(report.damaged) == [chunk] and "zarr.json" in report.damaged[chunk]
    compute_activations(SlowBody(), manifest_of(images), eval_transform(TRANSFORM), store.entry(entry.key),
                        batch_size=4, chunk_rows=CHUNK)
    np.testing.assert_array_equal(store.entry(entry.key).read(ids), expected)


@pytest.mark.parametrize("record", [b"{not json", b"", "ids_swapped"])
def test_damaged_commit_record_stays_local(tmp_path, capsys, record):
    """A garbage record, an empty one, or one whose ids were edited (two rows swapped: parses,
    would serve the wrong rows) marks only its chunk damaged; list, gc and reads go on."""
    store = ActivationStore(str(tmp_path / "store"))
    images = tmp_path / "images"
    write_images(images, N)
    entry, ids, expected, _ = fill(store, images)
    other = store.entry(make_key(arch="resnet50"))
    other.commit(["x"], np.ones((1, 4), "float32"))
    chunk, _ = block_of(entry, ids)
    path = Path(store.base, entry.rel, "commits", f"{chunk}.json")
    if record == "ids_swapped":
        rec = json.loads(path.read_text())
        rec["ids"][0], rec["ids"][1] = rec["ids"][1], rec["ids"][0]
        record = json.dumps(rec).encode()
    path.write_bytes(record)

    reader = store.entry(entry.key)
    assert reader.missing(ids) == ids[CHUNK:2 * CHUNK] and list(reader.damaged) == [chunk]
    np.testing.assert_array_equal(reader.read(ids[:CHUNK]), expected[:CHUNK])
    assert cli(["cache", "list", "--store", store.root]) == 0
    out = capsys.readouterr().out
    assert f"commits/{chunk}.json" in out and "2 entries" in out and "1 damaged" in out
    assert cli(["cache", "gc", "--store", store.root]) == 0
    assert cli(["cache", "verify", "--repair", "--store", store.root]) == 0
    assert not path.exists()
    stats = compute_activations(SlowBody(), manifest_of(images), eval_transform(TRANSFORM), store.entry(entry.key),
                                batch_size=4, chunk_rows=CHUNK)
    assert stats.computed == CHUNK
    np.testing.assert_array_equal(store.entry(entry.key).read(ids), expected)


def test_damaged_key_json_stays_local_and_is_restored(tmp_path, capsys):
    store = ActivationStore(str(tmp_path / "store"))
    entry = store.entry(make_key())
    entry.commit(["a", "b"], np.arange(8, dtype="float32").reshape(2, 4))
    healthy = store.entry(make_key(arch="resnet50"))
    healthy.commit(["x"], np.ones((1, 4), "float32"))
    key_file = Path(store.base, entry.rel, "key.json")
    original = key_file.read_bytes()
    key_file.write_bytes(b"\x00garbage")

    assert cli(["cache", "list", "--store", store.root]) == 0
    out = capsys.readouterr().out
    assert "key.json is damaged" in out and healthy.rel in out and "2 entries" in out
    assert cli(["cache", "verify", "--store", store.root]) == 1
    assert cli(["cache", "verify", "--repair", "--store", store.root]) == 0
    assert json.loads(key_file.read_bytes()) == json.loads(original)
    key_file.write_bytes(b"{}")
    store.entry(make_key())  # whoever opens the entry by its key puts key.json right
    assert json.loads(key_file.read_bytes()) == json.loads(original)


def test_entries_written_before_checksums_are_read_and_reported_unverified(tmp_path):
    """A format-1 chunk (no crc32c, record without digests) reads as before; verify says it
    cannot be verified; a missing block is still an error, not zeros."""
    store = ActivationStore(str(tmp_path / "store"))
    entry = store.entry(make_key())
    rows = np.random.default_rng(0).random((3, 4), dtype="float32")
    zarr.create_array(store.url(f"{entry.rel}/chunks/old-1"), data=rows, chunks=(3, 4), compressors=None)
    Path(store.base, entry.rel, "commits").mkdir()
    Path(store.base, entry.rel, "commits", "old-1.json").write_text(json.dumps(
        {"chunk": "old-1", "ids": ["a", "b", "c"], "shape": [3, 4], "dtype": "float32", "committed_at": 0}))
    entry.commit(["d"], np.ones((1, 4), "float32"))

    reader = store.entry(entry.key)
    np.testing.assert_array_equal(reader.read(["c", "a", "d"]), np.stack([rows[2], rows[0], np.ones(4)]))
    report = reader.verify()
    assert report.unverified == ["old-1"] and len(report.verified) == 1 and report.ok
    Path(store.base, entry.rel, "chunks", "old-1", "c", "0", "0").unlink()
    with pytest.raises(CacheCorruption, match="chunks/old-1/c/0/0 is missing"):
        store.entry(entry.key).read(["a"])


def _run_in_namespace(mount: str, target: Path, script: str) -> subprocess.CompletedProcess:
    """``script`` in a user + mount namespace where ``target`` is re-mounted (e.g. read-only):
    a real EROFS / ENOSPC for this process only, nothing left mounted afterwards."""
    code = textwrap.dedent(script)
    cmd = f'{mount} && exec "{sys.executable}" -c "$0"'
    return subprocess.run(["unshare", "-rm", "sh", "-c", cmd, code], cwd=PROJECT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def namespaces():
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.fail("user namespaces (unshare -rm) are needed for the read-only and full-disk tests")


def test_read_only_store_serves_reads_and_training(tmp_path, namespaces):
    store = ActivationStore(str(tmp_path / "store"))
    images = tmp_path / "images"
    write_images(images, N)
    entry, ids, expected, _ = fill(store, images)
    np.save(tmp_path / "expected.npy", expected)
    Path(store.base, entry.rel, "last_used").unlink()  # reading must try to record a use
    result = _run_in_namespace(f'mount --bind "{store.base}" "{store.base}" && '
                               f'mount -o remount,bind,ro "{store.base}"', Path(store.base), f"""
        import numpy as np, torch, logging
        logging.basicConfig(level=logging.WARNING)
        from precompute.store import ActivationStore, ResultCache
        from precompute.validate import check_store
        from precompute.train import ArrayRows, fit_head_on_cache
        from precompute.heads import Head
        from tests._precompute_worker import make_key
        assert check_store({store.base!r}, read_only_ok=True) is False
        entry = ActivationStore({store.base!r}).entry(make_key())
        ids = {ids!r}
        x = entry.read(ids)
        assert np.array_equal(x, np.load({str(tmp_path / 'expected.npy')!r}))
        y = np.arange(len(ids)) % 2
        torch.manual_seed(0)
        hist = fit_head_on_cache(Head(x.shape[1] // 2, 2), ArrayRows(x[:16], y[:16]), ArrayRows(x[16:], y[16:]),
                                 epochs=1, lr=1e-2)
        assert ResultCache(entry).put("head-x.pt", b"x") is False
        print("OK", len(hist))
    """)
    assert result.returncode == 0 and "OK 1" in result.stdout, result.stderr
    assert "could not record a use" in result.stderr and "could not keep head-x.pt" in result.stderr
    assert not list(Path(store.base).rglob("*.tmp-*"))


def test_full_disk_leaves_no_temp_files_and_reads_go_on(tmp_path, namespaces):
    disk = tmp_path / "disk"
    disk.mkdir()
    result = _run_in_namespace(f'mount -t tmpfs -o size=256k tmpfs "{disk}"', disk, f"""
        import os, numpy as np
        from precompute.store import ActivationStore
        from tests._precompute_worker import make_key
        store = ActivationStore({str(disk / 'store')!r})
        entry = store.entry(make_key())
        entry.commit(["a"], np.ones((1, 4), "float32"))
        with open({str(disk / 'filler')!r}, "wb", buffering=0) as f:  # fill the disk
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError:
                pass
        try:
            entry.commit(["b"], np.ones((1, 4), "float32"))
            raise SystemExit("a commit on a full disk succeeded")
        except OSError:
            pass
        fresh = store.entry(make_key())
        assert fresh.read(["a"]).tolist() == [[1, 1, 1, 1]]  # the use is not recorded; the read works
        leftovers = [os.path.join(d, f) for d, _, fs in os.walk({str(disk / 'store')!r}) for f in fs if ".tmp-" in f]
        assert not leftovers, leftovers
        print("OK")
    """)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


def test_gc_during_a_write_loses_nothing(tmp_path):
    """An entry last used 90 days ago gets new images; two `cache gc` runs at once, again and
    again, while the precompute adds them: the writer's lease (and its commits, which count as
    a use) keep the entry, every row lands, both gcs exit 0 every time. The writer is held after
    its first batch until two rounds of gc have run, so the overlap does not depend on timing."""
    images = tmp_path / "images"
    write_images(images, 16)
    store_root = tmp_path / "store"
    store = ActivationStore(str(store_root))
    entry, *_ = fill(store, images)
    old = time.time() - 90 * 86400
    store.put(f"{entry.rel}/last_used", str(old).encode())
    write_images(images, 48, seed=1, prefix="new")
    hold = tmp_path / "hold"
    hold.touch()
    worker = subprocess.Popen([sys.executable, "tests/_precompute_worker.py", "--store", str(store_root),
                               "--images", str(images), "--chunk-rows", "8", "--batch-size", "4",
                               "--sleep-per-batch", "0.05", "--pause-while", str(hold)], cwd=PROJECT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gc = [sys.executable, "-m", "precompute.cli", "cache", "gc", "--store", str(store_root)]
    runs = 0
    try:
        deadline = time.monotonic() + 120
        while not list(store_root.rglob("leases/*.json")):  # the writer has begun: now gc may not take it
            assert worker.poll() is None and time.monotonic() < deadline, worker.stderr.read()
            time.sleep(0.01)
        while worker.poll() is None:
            pair = [subprocess.Popen(gc, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for _ in range(2)]
            for p in pair:
                out, err = p.communicate(timeout=120)
                assert p.returncode == 0, err
            runs += 1
            if runs == 2:
                hold.unlink()  # two rounds ran against the held writer: let it finish under more gcs
        out, err = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    assert runs >= 2, "the gcs did not overlap the write"
    stats = json.loads(out.strip().splitlines()[-1])
    assert (stats["computed"], stats["reused"]) == (48, 16)
    entry = store.entry(make_key())
    ids = list(manifest_of(images)["image_id"])
    assert entry.missing(ids) == [] and entry.read(ids).shape[0] == 64 and entry.verify().ok
    assert entry.last_used() > old + 80 * 86400  # writing counted as a use
    assert not list(store_root.rglob("leases/*.json"))  # the lease went with the writer


def test_gc_collects_keyless_folders_expired_leases_and_leftover_temp_files(tmp_path, capsys):
    store = ActivationStore(str(tmp_path / "store"))
    entry = store.entry(make_key())
    entry.commit(["a"], np.ones((1, 4), "float32"))
    keyless = store.entry(make_key(arch="resnet50"))
    keyless.commit(["b"], np.ones((1, 4), "float32"))
    Path(store.base, keyless.rel, "key.json").unlink()  # what a gc interrupted mid-removal leaves
    old = time.time() - 2 * 3600
    junk = [Path(store.base, entry.rel, "last_used.tmp-0f0f"), Path(store.base, ".probe-abc"),
            Path(store.base, entry.rel, "leases", "dead.json")]
    for path in junk:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"expires": old}) if path.suffix == ".json" else "")
    fresh_tmp = Path(store.base, entry.rel, "key.json.tmp-1a1a")
    fresh_tmp.write_text("")  # a write in progress right now: kept
    for path in [*junk, *Path(store.base, keyless.rel).rglob("*")]:
        os.utime(path, (old, old))

    assert cli(["cache", "list", "--store", store.root]) == 0
    assert "key.json is missing" in capsys.readouterr().out
    removed = store.remove_unused(unused_for_s=30 * 86400)
    assert keyless.rel in removed and not Path(store.base, keyless.rel).exists()
    assert not any(p.exists() for p in junk) and fresh_tmp.exists()
    np.testing.assert_array_equal(store.entry(entry.key).read(["a"]), np.ones((1, 4)))


def test_dagster_rerun_repairs_deleted_blocks_and_the_head_sees_the_same_rows(env):
    """The issue's run: an entry's block files deleted, the job run again. The activations asset
    drops the damaged chunks and recomputes their rows (not zeros: the checks say so), and the
    head reads exactly the rows it read before."""
    import dagster as dg

    from assets import activations
    from tests.test_pipeline import CACHE_STAGE, PARTITION, SMALL

    resources, instance, _, tmp_path = env
    stage = CACHE_STAGE
    config = {"ops": {k: SMALL["ops"][k] for k in ("lr_find_head", "head_on_cache")}}
    config["ops"]["activations"] = {"config": {**SMALL["ops"]["activations"]["config"], "batch_size": 8}}
    assert dg.materialize(stage, partition_key=PARTITION, resources=resources, instance=instance,
                          run_config=config).success
    first = instance.get_latest_materialization_event(activations.key).asset_materialization.metadata
    store = resources["store"].get()
    entry = store.open_rel(first["entry"].text)
    ids = list(entry.index(refresh=True))
    before = entry.read(ids)
    blocks = [p for p in Path(store.base, entry.rel, "chunks").rglob("c/*/*") if p.is_file()]
    assert len(blocks) >= 2
    for p in blocks:
        p.unlink()

    result = dg.materialize(stage, partition_key=PARTITION, resources=resources, instance=instance, run_config=config)
    assert result.success
    meta = instance.get_latest_materialization_event(activations.key).asset_materialization.metadata
    assert len(meta["chunks_repaired"].value) == len(blocks) and meta["computed"].value == len(ids)
    assert all(e.passed for e in result.get_asset_check_evaluations())
    np.testing.assert_allclose(store.open_rel(entry.rel).read(ids), before, rtol=1e-5, atol=1e-6)
    assert not (before == 0).all(axis=1).any()
