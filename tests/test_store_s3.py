"""The activation store on S3: the code path a shared team cache takes, against moto's S3 server.

Everything goes through ``ActivationStore("s3://...", storage_options=...)`` exactly as with a
real bucket (s3fs for the index and records, zarr's fsspec store for the chunks); only the
endpoint differs. The "other machine" in these tests is a plain boto3 client, so no cache
inside this process's s3fs can hide what it wrote.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from tests._precompute_worker import SlowBody, TRANSFORM, make_key, manifest_of
from precompute.transforms import eval_transform
from precompute.features import compute_activations
from precompute.store import ActivationStore

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")


def keys_under(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_commit_and_read_round_trip(bucket):
    name, client, options = bucket
    store = ActivationStore(f"s3://{name}/acts", storage_options=options)
    store.check_reachable()
    entry = store.entry(make_key())
    a = np.random.default_rng(0).random((3, 5), dtype="float32")
    b = np.random.default_rng(1).random((2, 5), dtype="float32")
    chunk_a = entry.commit(["a0", "a1", "a2"], a)
    entry.commit(["b0", "b1"], b)

    np.testing.assert_array_equal(entry.read(["b1", "a0", "a2", "b0"]), np.stack([b[1], a[0], a[2], b[0]]))
    assert len(entry) == 5
    assert entry.missing(["a1", "c0", "b0", "c1"]) == ["c0", "c1"]
    assert entry.nbytes_on_disk() > 0
    with pytest.raises(KeyError, match="materialize the activations"):
        entry.read(["a0", "zz"])

    # the objects are where the layout says, in the bucket itself
    keys = keys_under(client, name, f"acts/{entry.rel}/")
    assert f"acts/{entry.rel}/key.json" in keys
    assert f"acts/{entry.rel}/commits/{chunk_a}.json" in keys
    assert any(k.startswith(f"acts/{entry.rel}/chunks/{chunk_a}/") for k in keys)
    key_json = client.get_object(Bucket=name, Key=f"acts/{entry.rel}/key.json")["Body"].read()
    assert json.loads(key_json)["arch"] == make_key().arch

    # a second store object (another process's view) reads the same rows
    again = ActivationStore(f"s3://{name}/acts/", storage_options=options).entry(make_key())
    np.testing.assert_array_equal(again.read(["a1", "b0"]), np.stack([a[1], b[0]]))


def test_compute_activations_is_incremental_on_s3(bucket, tiny_tree, tmp_path):
    name, _, options = bucket
    manifest = manifest_of(tiny_tree)
    ids = list(manifest["image_id"])
    tf = eval_transform(TRANSFORM)
    entry = ActivationStore(f"s3://{name}/acts", storage_options=options).entry(make_key())

    runs = []
    for rows in (manifest.iloc[:-3], manifest, manifest):
        body = SlowBody()
        stats = compute_activations(body, rows, tf, entry, batch_size=4, chunk_rows=8)
        runs.append((body.seen, stats.computed, stats.reused))
    n = len(ids)
    assert runs == [(n - 3, n - 3, 0), (3, 3, n - 3), (0, 0, n)]

    local = ActivationStore(str(tmp_path / "local")).entry(make_key())
    compute_activations(SlowBody(), manifest, tf, local, batch_size=4, chunk_rows=8)
    np.testing.assert_allclose(entry.read(ids), local.read(ids), rtol=1e-5, atol=1e-6)


def test_chunk_without_commit_record_is_invisible_until_committed(bucket):
    name, client, options = bucket
    store = ActivationStore(f"s3://{name}/acts", storage_options=options)
    entry = store.entry(make_key())
    entry.commit(["k0"], np.zeros((1, 4), "float32"))
    assert entry.missing(["k0", "x0", "x1"]) == ["x0", "x1"]  # the index is listed (and maybe cached) now

    # what a crash between a chunk's data and its record leaves on the bucket
    data = np.arange(8, dtype="float32").reshape(2, 4)
    chunk = "orphan-0000"
    zarr.create_array(store.url(f"{entry.rel}/chunks/{chunk}"), data=data, storage_options=options)
    assert any(k.startswith(f"acts/{entry.rel}/chunks/{chunk}/") for k in keys_under(client, name, "acts/"))
    assert entry.missing(["k0", "x0", "x1"]) == ["x0", "x1"]
    assert len(entry) == 1
    with pytest.raises(KeyError):
        entry.read(["x0"])

    # another machine writes the record: the very same store object must see it on its next look
    record = {"chunk": chunk, "ids": ["x0", "x1"], "shape": [2, 4], "dtype": "float32"}
    client.put_object(Bucket=name, Key=f"acts/{entry.rel}/commits/{chunk}.json", Body=json.dumps(record).encode())
    assert entry.missing(["k0", "x0", "x1"]) == []
    np.testing.assert_array_equal(entry.read(["x1", "k0", "x0"]), np.stack([data[1], np.zeros(4), data[0]]))
