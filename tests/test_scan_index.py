"""The scan index: a manifest scan reads only new and changed files, and gives the same manifest.

Every scan here is compared with a scan without an index (``build_manifest(root)``): the index
may only ever save reads, never change a row. Files are dated a minute back (``age``) before a
scan that should record them: a file modified within a second of a scan is read again next time
(git's "racily clean" rule, scan_index.RACY_NS).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from assets.manifest import image_manifest
from pipelines.sensors import new_images_sensor
from precompute import manifest
from precompute.manifest import build_manifest
from precompute.scan_index import Scan, ScanBudgetExceeded, ScanIndex, _decode, manifest_digest
from resources import ImageSource
from tests.conftest import needs_photos, opened_files

PROJECT = Path(__file__).resolve().parents[1]
PX = 12  # BMP: a file's size depends only on its dimensions, so an image can be replaced by one of equal size


def write_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (PX, PX, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "BMP")
    return path


def write_tree(root: Path, n: int) -> Path:
    """``n`` distinct images over train/valid and two classes, every class in train."""
    for i in range(n):
        write_image(root / ("valid" if i % 4 == 3 else "train") / "ab"[i % 2] / f"img{i:03d}.bmp", seed=i)
    return root


def age(*paths: Path, seconds: int = 60) -> None:
    """Date files (and folders) back, as files that have existed for a while are."""
    past = time.time_ns() - seconds * 10**9
    for top in paths:
        for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
            try:
                os.utime(p, ns=(past, past), follow_symlinks=False)
            except OSError:
                pass


class Reads(list):
    """Names of the files manifest._inspect checks (hashes and decodes), in order, unless paused."""

    paused = False
    delay = 0.0  # seconds per file: lets two scans interleave


_reads: Reads | None = None


@pytest.fixture
def reads(monkeypatch):
    global _reads
    seen = _reads = Reads()
    real = manifest._inspect

    @functools.wraps(real)
    def spy(path, *args, **kwargs):
        if not seen.paused:
            seen.append(Path(path).name)
        time.sleep(seen.delay)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(manifest, "_inspect", spy)
    yield seen
    _reads = None


def scan(root: Path, index: ScanIndex, **kw) -> tuple[pd.DataFrame, dict]:
    """A scan through the index, checked against a scan without one (whose reads are not counted)."""
    s = Scan(index=index, **kw)
    manifest = build_manifest(root, scan=s)
    if _reads is not None:
        _reads.paused = True
    try:
        pd.testing.assert_frame_equal(manifest, build_manifest(root))
    finally:
        if _reads is not None:
            _reads.paused = False
    return manifest, s.stats


def index_entries(index: ScanIndex) -> dict:
    files = list(Path(index.base).glob("*.parquet"))
    assert len(files) == 1, files
    return _decode(files[0].read_bytes(), ".parquet")[1].as_dict()


# --------------------------------------------------------------------------- never opened again


@needs_photos
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_every_awkward_input_gives_the_same_rows_and_unchanged_files_are_not_opened(messy, tmp_path):
    root, outside, expected = messy
    age(root, outside)
    index = ScanIndex(tmp_path / "index")
    cold, stats = scan(root, index)
    assert stats["read"] == stats["files"] and stats["index_written"]
    assert set(expected.values()) <= set(cold["status"])  # the folder holds every kind of bad input

    warm_scan = Scan(index=index)
    with opened_files() as opened:
        warm = build_manifest(root, scan=warm_scan)
    pd.testing.assert_frame_equal(warm, cold)
    stats = warm_scan.stats
    real_root = str(root.resolve())
    opened_here = sorted({os.path.relpath(p, real_root) for p in opened if p.startswith(real_root)})
    # Nothing under the root is opened: every file's result comes from the index (a file without a
    # class too: the index holds what its bytes give), and whatever is refused without a read (empty,
    # missing, a fifo, outside the root, a name that is not UTF-8) is refused again without one.
    assert opened_here == [], opened_here
    assert not stats["index_written"]  # nothing new to record: the index file is not rewritten


# --------------------------------------------------------------------------- add / replace / remove / touch


def test_add_replace_remove_touch(tmp_path, reads):
    root = write_tree(tmp_path / "images", 12)
    age(root)
    index = ScanIndex(tmp_path / "index")
    first, stats = scan(root, index)
    assert len(reads) == stats["read"] == 12
    digest = manifest_digest(first)

    reads.clear()
    same, stats = scan(root, index)
    assert reads == [] and stats["reused"] == 12 and not stats["index_written"]
    assert manifest_digest(same) == digest

    # add: only the new file is read
    reads.clear()
    age(write_image(root / "train" / "a" / "new.bmp", seed=100))
    added, stats = scan(root, index)
    assert reads == ["new.bmp"] and len(added) == 13
    assert manifest_digest(added) != digest
    digest = manifest_digest(added)

    # replace in place with other bytes of the same size, mtime put back: the ctime tells
    victim = root / "train" / "b" / "img001.bmp"
    st = victim.stat()
    old_id = added.set_index("relpath").loc["train/b/img001.bmp", "image_id"]
    write_image(victim, seed=200)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    reads.clear()
    replaced, stats = scan(root, index)
    assert reads == ["img001.bmp"]
    assert replaced.set_index("relpath").loc["train/b/img001.bmp", "image_id"] != old_id
    assert manifest_digest(replaced) != digest
    digest = manifest_digest(replaced)

    # touch: read again (mtime moved), same image id, same manifest digest
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    reads.clear()
    touched, stats = scan(root, index)
    assert reads == ["img001.bmp"] and manifest_digest(touched) == digest
    pd.testing.assert_frame_equal(touched, replaced)

    # remove: nothing read, the row and the index entry are gone
    (root / "train" / "a" / "img000.bmp").unlink()
    reads.clear()
    removed, stats = scan(root, index)
    assert reads == [] and stats["index_written"]
    assert "train/a/img000.bmp" not in set(removed["relpath"]) and len(removed) == 12
    assert "train/a/img000.bmp" not in index_entries(index) and len(index_entries(index)) == 12
    assert manifest_digest(removed) != digest

    # a relabel (moved to the other class folder): a new path, read once; same image id, other manifest
    (root / "train" / "b" / "img005.bmp").rename(root / "train" / "a" / "img005.bmp")
    reads.clear()
    relabelled, _ = scan(root, index)
    assert reads == ["img005.bmp"]
    assert set(relabelled["image_id"]) == set(removed["image_id"])
    assert manifest_digest(relabelled) != manifest_digest(removed)


def test_full_rescan_and_files_too_new_to_trust(tmp_path, reads):
    root = write_tree(tmp_path / "images", 6)
    index = ScanIndex(tmp_path / "index")
    scan(root, index)  # just written: within a second of the scan, so not recorded
    reads.clear()
    scan(root, index)
    assert len(reads) == 6
    age(root)
    scan(root, index)
    reads.clear()
    _, stats = scan(root, index)
    assert reads == [] and stats["reused"] == 6
    _, stats = scan(root, index, full_rescan=True)
    assert len(reads) == 6 and stats["read"] == 6
    with pytest.raises(ScanBudgetExceeded):  # nothing is read when the budget cannot be met
        write_image(root / "train" / "a" / "x.bmp", 7)
        write_image(root / "train" / "a" / "y.bmp", 8)
        reads.clear()
        build_manifest(root, scan=Scan(index=index, max_reads=1))
    assert reads == []


def test_an_index_that_cannot_be_written_never_fails_a_scan(tmp_path, caplog):
    root = write_tree(tmp_path / "images", 4)
    age(root)
    (tmp_path / "not_a_folder").write_text("a file where the index folder would go")
    with caplog.at_level("WARNING", "precompute.scan_index"):
        _, stats = scan(root, ScanIndex(tmp_path / "not_a_folder" / "index"))
    assert stats["read"] == 4 and not stats["index_written"] and "cannot be written" in caplog.text


# --------------------------------------------------------------------------- kill -9 and two at once


def test_a_scan_killed_mid_way_resumes_and_equals_a_clean_scan(tmp_path, reads):
    root = write_tree(tmp_path / "images", 40)
    age(root)
    location = tmp_path / "index"
    script = textwrap.dedent("""
        import functools, sys, time
        from precompute import manifest, scan_index
        real = manifest._inspect

        calls = []

        @functools.wraps(real)
        def slow(*args, **kwargs):
            calls.append(1)
            # after 12 images the scan hangs until it is killed: the kill lands mid-scan however
            # slow or fast the machine is
            time.sleep(0.15 if len(calls) <= 12 else 3600)
            return real(*args, **kwargs)

        manifest._inspect = slow
        index = scan_index.ScanIndex(sys.argv[2], save_every_n=4)
        manifest.build_manifest(sys.argv[1], scan=scan_index.Scan(index=index))
        print("finished", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(root), str(location)], cwd=PROJECT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    index = ScanIndex(location)
    deadline = time.monotonic() + 120
    saved = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if list(location.glob("*.parquet")):
            saved = len(index_entries(index))
            if saved >= 8:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and "finished" not in out, err[-2000:]
    saved = len(index_entries(index))
    assert 8 <= saved < 40, saved

    reads.clear()
    resumed, stats = scan(root, index)  # equal to a clean scan (checked inside)
    assert stats["read"] == 40 - saved == len(reads)
    assert len(index_entries(index)) == 40
    assert [p.name for p in location.iterdir()] == [f"{Path(stats['index']).name}"]  # a killed save's temp file is gone


def test_two_scans_at_once_never_tear_the_index(tmp_path, reads):
    root = write_tree(tmp_path / "images", 16)
    age(root)
    location = tmp_path / "index"
    results, torn, done = [], [], threading.Event()
    reads.delay = 0.01  # each scan takes ~0.2 s, saving after every file: their saves interleave

    def run():
        results.append(build_manifest(root, scan=Scan(index=ScanIndex(location, save_every_n=1))))

    def read_continuously():
        while not done.is_set():
            for f in location.glob("*.parquet"):
                try:
                    _decode(f.read_bytes(), ".parquet")
                except FileNotFoundError:
                    pass
                except Exception as e:  # noqa: BLE001 - a torn file is what this looks for
                    torn.append(repr(e))

    reader = threading.Thread(target=read_continuously)
    reader.start()
    scanners = [threading.Thread(target=run) for _ in range(2)]
    for t in scanners:
        t.start()
    for t in scanners:
        t.join()
    done.set()
    reader.join()
    assert torn == [] and len(results) == 2
    plain = build_manifest(root)
    for result in results:
        pd.testing.assert_frame_equal(result, plain)
    assert len(reads) >= 32  # both read everything (they started together), saving after every file
    reads.clear()
    _, stats = scan(root, ScanIndex(location))
    assert reads == [] and stats["reused"] == 16


# --------------------------------------------------------------------------- the manifest's data version


def test_manifest_built_by_column_sorts_as_pandas_and_the_index_loads_compactly(tmp_path):
    """Issue 21 (memory at ImageNet size): the manifest is built column by column from rows sorted in
    Python, not from records then sorted by pandas; the order and dtypes must be what pandas gave, names in
    any script and case included. The index loads its stat fields as machine integers."""
    root = tmp_path / "imgs"
    names = ["B.bmp", "a.bmp", "\u00e9.bmp", "Z.bmp", "_x.bmp", "10.bmp", "9.bmp", "\u00df.bmp", "\u65e5.bmp"]
    for k, cls in enumerate(["Zebra", "apple", "\u00c4pfel"]):
        for i, name in enumerate(names):
            write_image(root / ("valid" if i % 3 == 2 else "train") / cls / name, seed=10 * k + i)
    age(root)
    index = ScanIndex(tmp_path / "index")
    built, _ = scan(root, index)  # through the index, equal to a scan without one
    rows = built.sample(frac=1, random_state=0).to_dict("records")
    by_pandas = (pd.DataFrame(rows, columns=manifest.MANIFEST_COLUMNS).astype({"width": "Int64", "height": "Int64"})
                 .sort_values(["split", "label", "relpath"], kind="stable", ignore_index=True))
    pd.testing.assert_frame_equal(manifest._frame([dict(r) for r in rows]), by_pandas)
    pd.testing.assert_frame_equal(built, by_pandas)
    loaded = _decode(next(Path(index.base).glob("*.parquet")).read_bytes(), ".parquet")[1]
    assert [type(c).__name__ for c in loaded.cols[:4]] == ["array"] * 4
    warm, stats = scan(root, index)
    assert stats["read"] == 0 and warm.equals(built)


def test_manifest_data_version_is_its_content(tmp_path):
    root = write_tree(tmp_path / "images", 8)
    age(root)
    images = ImageSource(source=str(root), scan_index=str(tmp_path / "index"))
    instance = dg.DagsterInstance.ephemeral()

    def version() -> str:
        result = dg.materialize([image_manifest], resources={"images": images}, instance=instance)
        (mat,) = result.asset_materializations_for_node("image_manifest")
        return mat.tags["dagster/data_version"]

    first = version()
    assert first == manifest_digest(build_manifest(root))
    assert version() == first  # nothing changed
    victim = root / "train" / "a" / "img000.bmp"
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert version() == first  # touched: the same bytes
    write_image(victim, seed=99)
    changed = version()
    assert changed != first  # one image's bytes
    victim.rename(root / "train" / "b" / "img000.bmp")
    assert version() not in (first, changed)  # one image's label

    shuffled = build_manifest(root).sample(frac=1, random_state=0)
    shuffled["path"] = "/elsewhere/" + shuffled["relpath"]
    assert manifest_digest(shuffled) == manifest_digest(build_manifest(root))  # order and location are not content


# --------------------------------------------------------------------------- the sensor reads through the index


def test_sensor_reads_only_changed_files_through_the_index(tmp_path, reads, monkeypatch):
    root = write_tree(tmp_path / "images", 10)
    age(root)
    images = ImageSource(source=str(root), scan_index=str(tmp_path / "index"))
    from pipelines.definitions import defs

    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor):
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=defs.get_repository_def(),
                                      resources={"images": images})
        return new_images_sensor.evaluate_tick(ctx)

    first = tick(None)
    assert first.run_requests and len(reads) == 10
    victim = root / "train" / "a" / "img000.bmp"
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reads.clear()
    touched = tick(first.cursor)
    assert touched.run_requests == [] and reads == ["img000.bmp"] and "1 of 10 files read" in touched.skip_message
    assert json.loads(touched.cursor)["digest"] == json.loads(first.cursor)["digest"]

    monkeypatch.setenv("PRECOMPUTE_SENSOR_READ_BUDGET", "0")  # too many to read in a tick: launch, read nothing
    write_image(root / "train" / "b" / "new.bmp", 5)
    reads.clear()
    over = tick(touched.cursor)
    assert over.run_requests and reads == [] and json.loads(over.cursor)["digest"] is None

    monkeypatch.setenv("PRECOMPUTE_SENSOR_READ_BUDGET", "2000")
    monkeypatch.setenv("PRECOMPUTE_SENSOR_SCAN_MAX_FILES", "10")  # 11 files: over the content check's limit
    victim = root / "train" / "a" / "img002.bmp"
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reads.clear()
    big = tick(over.cursor)  # touched only, but too many files to rebuild the manifest inside a tick: launch
    assert big.run_requests and reads == [] and json.loads(big.cursor)["digest"] is None
    monkeypatch.setenv("PRECOMPUTE_SENSOR_SCAN_MAX_FILES", "11")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    reads.clear()
    small = tick(big.cursor)  # at the limit: the content check runs again, reading the touched and new files
    assert sorted(reads) == ["img002.bmp", "new.bmp"] and json.loads(small.cursor)["digest"] == manifest_digest(build_manifest(root))
