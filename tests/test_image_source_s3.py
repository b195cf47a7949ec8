"""Images in object storage, against moto's S3 server: the same manifest as from a local folder,
a warm scan that fetches no unchanged object, CSV keys under a prefix, and the recipe on top
(manifest -> activations -> head on the cache) reading every image from the bucket.

Requests are counted with a botocore hook on the very s3fs client the scan uses
(``precompute.sources.filesystem`` returns fsspec's cached instance for the same options).
"""

from __future__ import annotations

import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from precompute import sources
from precompute.features import compute_activations
from precompute.heads import Head
from precompute.labels import class_names
from precompute.manifest import ManifestError, build_manifest, ok_rows
from precompute.rows import cached_rows
from precompute.scan_index import Scan, ScanIndex
from precompute.store import ActivationStore
from precompute.train import fit_head_on_cache
from precompute.transforms import eval_transform
from tests._precompute_worker import TRANSFORM, SlowBody, make_key

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

COMPARED = ["image_id", "relpath", "label", "split", "width", "height", "status", "reason"]


@pytest.fixture
def images(tiny_tree, tmp_path) -> Path:
    """The tiny dogscats tree plus objects that are not usable images, as a local folder."""
    root = tiny_tree
    (root / "train" / "cats" / "empty.jpg").write_bytes(b"")
    (root / "train" / "dogs" / "notes.jpg").write_text("not a JPEG\n")
    whole = next((root / "train" / "cats").glob("cat*.jpg")).read_bytes()
    (root / "train" / "cats" / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "train" / "stray.jpg").write_bytes(whole)  # directly in a split: no class
    (root / "train" / "birds").mkdir()
    (root / "train" / "birds" / "readme.txt").write_text("to do")  # a class folder without images
    (root / "train" / "cats" / "readme.txt").write_text("skipped, not an image")
    return root


def upload(client, bucket: str, prefix: str, folder: Path) -> int:
    n = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
        n += 1
    return n


class Requests:
    """S3 operations (and keys) the scan's s3fs client sends, via botocore's parameter hook."""

    def __init__(self, url: str, options: dict):
        fs, _ = sources.filesystem(url, options)
        fs.connect()
        self.calls: list[tuple[str, str | None]] = []
        fs.s3.meta.events.register("before-parameter-build.s3", self._record)

    def _record(self, params, model, **_):
        self.calls.append((model.name, params.get("Key")))

    def take(self) -> list[tuple[str, str | None]]:
        calls, self.calls = self.calls, []
        return calls


def test_a_prefix_gives_the_manifest_of_the_same_local_folder(bucket, images):
    name, client, options = bucket
    upload(client, name, "data", images)
    remote = build_manifest(f"s3://{name}/data/", storage_options=options)
    local = build_manifest(images)
    pd.testing.assert_frame_equal(remote[COMPARED], local[COMPARED])
    assert {"ok", "empty", "not_image", "unreadable", "unknown_label", "empty_class"} <= set(remote["status"])
    assert all(p.startswith(f"s3://{name}/data/") for p in remote["path"])
    with pytest.raises(ManifestError, match="does not exist"):
        build_manifest(f"s3://{name}/nothing-here/", storage_options=options)


def test_a_warm_scan_fetches_no_unchanged_object(bucket, images):
    name, client, options = bucket
    upload(client, name, "data", images)
    url = f"s3://{name}/data/"
    requests = Requests(url, options)
    index = ScanIndex(f"s3://{name}/acts/_scan_index", options)  # beside a store on the same bucket

    cold = Scan(index=index)
    first = build_manifest(url, storage_options=options, scan=cold)
    got = Counter(op for op, _ in requests.take())
    fetched = {k for k in (o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix="data/")["Contents"])
               if k.endswith(".jpg") and client.head_object(Bucket=name, Key=k)["ContentLength"] > 0}
    assert cold.stats["object_reads"] == len(fetched) and got["PutObject"] == 1  # one PUT: the whole index

    warm = Scan(index=index)
    again = build_manifest(url, storage_options=options, scan=warm)
    calls = requests.take()
    image_gets = [k for op, k in calls if op == "GetObject" and k.startswith("data/")]
    assert image_gets == [] and warm.stats["object_reads"] == 0, calls
    ops = Counter(op for op, _ in calls)
    assert ops["ListObjectsV2"] == 1 and ops["GetObject"] == 1 and ops["PutObject"] == 0, ops  # GET: the index
    pd.testing.assert_frame_equal(again, first)

    victim = next(k for k in sorted(fetched) if "/dogs/" in k)  # replaced by other bytes
    other = next(k for k in sorted(fetched) if "/cats/cat" in k)
    client.copy_object(Bucket=name, Key=victim, CopySource={"Bucket": name, "Key": other})
    changed = build_manifest(url, storage_options=options, scan=Scan(index=index))
    calls = requests.take()
    assert [k for op, k in calls if op == "GetObject" and k.startswith("data/")] == [victim]
    row = changed.set_index("relpath").loc[victim[len("data/"):]]
    assert row["status"] == "conflicting_label"  # now the same bytes as a cat: no copy is used

    # an object added since this process listed the prefix (fsspec caches listings per folder)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    client.put_object(Bucket=name, Key="data/valid/dogs/new.jpg", Body=buf.getvalue())
    added = build_manifest(url, storage_options=options, scan=Scan(index=index))
    gets = [k for op, k in requests.take() if op == "GetObject" and k.startswith("data/")]
    assert gets == ["data/valid/dogs/new.jpg"]
    assert added.set_index("relpath").loc["valid/dogs/new.jpg", "status"] == "ok"


def test_csv_keys_relative_to_a_prefix(bucket, images):
    name, client, options = bucket
    upload(client, name, "data", images)
    photos = sorted(p.relative_to(images).as_posix() for p in images.glob("*/*/*.jpg") if p.stat().st_size > 1000)
    lines = [f"{p},{p.split('/')[1]},{p.split('/')[0]}" for p in photos[:6]]
    lines += ["train/cats/gone.jpg,cats,train", f"{photos[0]},cats,train"]
    client.put_object(Bucket=name, Key="lists/labels.csv", Body=("path,label,split\n" + "\n".join(lines)).encode())
    manifest = build_manifest(f"s3://{name}/lists/labels.csv", root=f"s3://{name}/data", storage_options=options)
    by_path = manifest.set_index("relpath")["status"]
    assert by_path["train/cats/gone.jpg"] == "missing"
    assert (manifest["status"] == "duplicate").sum() == 1  # the repeated row, as for a local CSV
    assert (manifest["status"] == "ok").sum() == 6
    local_csv = images / "labels.csv"
    local_csv.write_text("path,label,split\n" + "\n".join(lines))
    local = build_manifest(local_csv)
    pd.testing.assert_frame_equal(manifest[COMPARED], local[COMPARED])

    client.put_object(Bucket=name, Key="lists/escape.csv", Body=b"path,label\n../../secret/x.jpg,cats\n")
    with pytest.raises(ManifestError, match=f"outside the root s3://{name}/data"):
        build_manifest(f"s3://{name}/lists/escape.csv", root=f"s3://{name}/data", storage_options=options)


def test_recipe_on_an_s3_source_manifest_activations_head(bucket, images, tmp_path):
    name, client, options = bucket
    upload(client, name, "data", images)
    url = f"s3://{name}/data"
    manifest = build_manifest(url, storage_options=options,
                              scan=Scan(index=ScanIndex.beside_store(f"s3://{name}/acts", options)))
    rows = ok_rows(manifest)
    assert len(rows) == 24 and all(p.startswith("s3://") for p in rows["path"])

    # activations read every image from the bucket (load_rgb through fsspec), into a store on it too
    entry = ActivationStore(f"s3://{name}/acts", storage_options=options).entry(make_key())
    stats = compute_activations(SlowBody(), rows, eval_transform(TRANSFORM), entry, batch_size=8, chunk_rows=16)
    assert stats.computed == 24
    local_rows = ok_rows(build_manifest(images))
    local = ActivationStore(str(tmp_path / "local")).entry(make_key())
    compute_activations(SlowBody(), local_rows, eval_transform(TRANSFORM), local, batch_size=8, chunk_rows=16)
    ids = list(rows["image_id"])
    np.testing.assert_allclose(entry.read(ids), local.read(ids), rtol=1e-5, atol=1e-6)  # the same pixels

    # the head trains on the cached rows alone
    classes = class_names(manifest)
    train = cached_rows(entry, manifest, classes, "train", 1 << 30)
    valid = cached_rows(entry, manifest, classes, "valid", 1 << 30)
    history = fit_head_on_cache(Head(entry.read(ids[:1]).shape[1] // 2, len(classes)), train, valid, epochs=2,
                                lr=1e-2, batch_size=8)
    assert len(history) == 2 and np.isfinite(history[-1]["valid_loss"])
    shutil.rmtree(tmp_path / "local")
