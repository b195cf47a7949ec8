import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from precompute.features import compute_activations
from precompute.images import load_rgb
from precompute.manifest import build_manifest, ok_rows
from precompute.store import ActivationStore, CacheKey, view_key
from precompute.transforms import TransformSpec, eval_transform


def make_key(**changes) -> CacheKey:
    key = CacheKey(arch="resnet18", weights_id="sha256:abc", xtra_cut=0, cut_index=8,
                   transform=TransformSpec(size=64), pooled=True, dtype="float32")
    return replace(key, **changes)


class CountingBody(nn.Module):
    """A small real conv body that counts the images it runs on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2))
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return self.net(x)


def test_round_trip_in_any_order(tmp_path):
    store = ActivationStore(str(tmp_path / "store"))
    entry = store.entry(make_key())
    a, b = np.random.rand(3, 5).astype("float32"), np.random.rand(2, 5).astype("float32")
    entry.commit(["a0", "a1", "a2"], a)
    entry.commit(["b0", "b1"], b)
    out = entry.read(["b1", "a0", "a2", "b0"])
    np.testing.assert_array_equal(out, np.stack([b[1], a[0], a[2], b[0]]))
    assert len(entry) == 5
    assert entry.missing(["a1", "c0", "b0", "c1"]) == ["c0", "c1"]
    assert json.loads((tmp_path / "store" / entry.rel / "key.json").read_text())["arch"] == "resnet18"
    with pytest.raises(KeyError, match="materialize the activations"):
        entry.read(["a0", "zz"])


def test_float16_storage_and_compression(tmp_path):
    store = ActivationStore(str(tmp_path / "store"), compressor="blosc-lz4-noshuffle")
    entry = store.entry(make_key(dtype="float16"))
    x = np.maximum(np.random.randn(64, 256), 0).astype("float32")  # ReLU-like: many zeros
    entry.commit([f"i{i}" for i in range(64)], x)
    out = entry.read([f"i{i}" for i in range(64)])
    assert out.dtype == np.float16
    np.testing.assert_allclose(out, x, rtol=1e-3, atol=1e-3)
    assert 0 < entry.nbytes_on_disk() < x.astype("float16").nbytes


def test_chunk_without_commit_record_is_invisible(tmp_path):
    store = ActivationStore(str(tmp_path / "store"))
    entry = store.entry(make_key())
    # what a crash between writing the data and the record leaves behind
    zarr.create_array(str(tmp_path / "store" / entry.rel / "chunks" / "orphan"), data=np.ones((2, 4), "float32"))
    assert entry.missing(["x", "y"]) == ["x", "y"]
    assert len(entry) == 0


@pytest.mark.parametrize("change", [
    {"arch": "resnet34"}, {"weights_id": "sha256:def"}, {"xtra_cut": 1}, {"cut_index": 7},
    {"transform": TransformSpec(size=96)}, {"transform": TransformSpec(size=64, crop="none")},
    {"transform": TransformSpec(size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))},
    {"pooled": False}, {"dtype": "float16"}, {"versions": {"torch": "0.0"}},
])
def test_every_key_part_changes_the_entry(tmp_path, change):
    store = ActivationStore(str(tmp_path / "store"))
    assert store.entry(make_key()).path != store.entry(make_key(**change)).path


def test_view_key_sees_content_and_labels():
    key = make_key()
    base = view_key(key, ["h1", "h2"], ["cat", "dog"])
    assert view_key(key, ["h1", "h2"], ["dog", "cat"]) != base   # two images swapped between classes
    assert view_key(key, ["h1", "h3"], ["cat", "dog"]) != base   # one image replaced, same count
    assert view_key(key, ["h1", "h2"], ["cat", "dog"]) == base


def test_compute_is_incremental_and_matches_a_direct_forward(tmp_path, tiny_tree):
    manifest = ok_rows(build_manifest(tiny_tree))
    ts = TransformSpec(size=64)
    store = ActivationStore(str(tmp_path / "store"))
    entry = store.entry(make_key())
    body = CountingBody()
    first = manifest.iloc[:-3]
    stats = compute_activations(body, first, eval_transform(ts), entry, batch_size=4, chunk_rows=8)
    assert (stats.computed, stats.reused, body.seen) == (len(first), 0, len(first))
    assert stats.chunks == -(-len(first) // 8)
    body.seen = 0
    stats = compute_activations(body, manifest, eval_transform(ts), entry, batch_size=4, chunk_rows=8)
    assert (stats.computed, stats.reused, body.seen) == (3, len(first), 3)
    # the cached rows are what the body gives for those images, pooled as fastai did
    row = manifest.iloc[5]
    x = eval_transform(ts)(load_rgb(row.path))[None]
    with torch.no_grad():
        y = body.net(x)
    expected = torch.cat([y.amax((2, 3)), y.mean((2, 3))], 1)[0].numpy()
    np.testing.assert_allclose(entry.read([row.image_id])[0], expected, rtol=1e-5, atol=1e-5)


def test_streamed_rows_visit_every_row_once_and_train_like_in_memory(tmp_path):
    from precompute.train import ArrayRows, StreamedRows, fit_head_on_cache
    from precompute.heads import Head

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    x = (np.eye(2)[y].repeat(4, 1) * 3 + rng.normal(0, 1, (100, 8))).astype("float32")
    x[:, 0] = np.arange(100)  # row identity, to check coverage
    entry = ActivationStore(str(tmp_path / "store")).entry(make_key())
    ids = [f"img{i}" for i in range(100)]
    for start in range(0, 100, 20):  # five chunks
        entry.commit(ids[start:start + 20], x[start:start + 20])
    streamed = StreamedRows(entry, ids, y)
    seen = np.concatenate([b[:, 0].numpy() for b, _ in streamed.batches(7, torch.Generator().manual_seed(1))])
    assert sorted(seen.tolist()) == list(range(100)) and seen.tolist() != list(range(100))  # all, shuffled
    x[:, 0] = 0
    entry2 = ActivationStore(str(tmp_path / "store2")).entry(make_key())
    for start in range(0, 100, 20):
        entry2.commit(ids[start:start + 20], x[start:start + 20])
    torch.manual_seed(0)
    hist = fit_head_on_cache(Head(4, 2), StreamedRows(entry2, ids[:80], y[:80]), StreamedRows(entry2, ids[80:], y[80:]),
                             epochs=3, lr=1e-2)
    assert hist[-1]["valid_accuracy"] > 0.9


def test_streamed_rows_from_a_store_written_class_by_class_train_like_in_memory(tmp_path):
    """Issue 21: a folder per class is scanned, and so cached, class by class: at ImageNet's size every
    chunk held one class. Shuffling chunk order and rows within a chunk gave one-class batches, and a
    streamed epoch reached 0.5% where in memory it learned. Batches now come from a shuffle buffer of many
    chunks; a buffer of one batch (the old behaviour, near enough) stays near chance here."""
    from precompute.heads import Head
    from precompute.train import ArrayRows, StreamedRows, fit_head_on_cache

    rng = np.random.default_rng(0)
    n_classes, per_class, dim = 50, 60, 64
    y = np.repeat(np.arange(n_classes), per_class)  # class by class, a chunk per class
    x = (rng.normal(0, 4, dim) + rng.normal(0, 0.6, (n_classes, dim))[y] + rng.normal(0, 1, (len(y), dim)))
    x = x.astype("float32")
    entry = ActivationStore(str(tmp_path / "store")).entry(make_key())
    ids = [f"img{i}" for i in range(len(y))]
    for start in range(0, len(y), per_class):
        entry.commit(ids[start:start + per_class], x[start:start + per_class])
    train, valid = np.arange(len(y)) % 6 != 5, np.arange(len(y)) % 6 == 5

    def accuracy(rows) -> float:
        hist = fit_head_on_cache(Head(dim // 2, n_classes), rows(train), rows(valid), epochs=1, lr=3e-2, batch_size=32)
        return hist[-1]["valid_accuracy"]

    def streamed(**kw):
        return lambda mask: StreamedRows(entry, [i for i, m in zip(ids, mask) if m], y[mask], **kw)

    in_memory = accuracy(lambda mask: ArrayRows(x[mask], y[mask]))
    assert in_memory > 0.7
    assert accuracy(streamed()) > in_memory - 0.05
    assert accuracy(streamed(buffer_bytes=1)) < 0.3
    rows = streamed(buffer_bytes=40 * dim * 4)(train)  # a buffer of 40 rows: batches cross chunks
    batches = list(rows.batches(32, torch.Generator().manual_seed(0)))
    assert len(batches) == rows.n_batches(32) and sum(len(b) for _, b in batches) == len(rows)
    assert np.mean([len(set(b.tolist())) for _, b in batches]) > 1.5
    reads = []
    real = entry.iter_blocks
    entry.iter_blocks = lambda ids: (reads.append(len(ids)), real(ids))[1]
    first = next(iter(streamed()(train).batches(32, torch.Generator().manual_seed(0))))
    assert len(first[1]) == 32 and len(reads) == n_classes  # the default buffer holds every chunk here
    reads.clear()
    unshuffled = streamed()(valid)  # an evaluation streams: a whole batch out of the first chunk
    assert len(next(iter(unshuffled.batches(8)))[1]) == 8 and len(reads) == 1
    order = np.concatenate([b.numpy() for _, b in unshuffled.batches(8)])
    assert order.tolist() == y[valid][unshuffled.order()].tolist()


@pytest.mark.parametrize("compressor", ["blosc-lz4-noshuffle", "blosc-zstd", "none", "zstd"])
def test_block_reader_equals_zarr(tmp_path, monkeypatch, compressor):
    """Entry.read decodes blocks itself (numcodecs, no event loop) after checking each one's
    crc32c; it must give exactly what zarr reads from the same files: partial last blocks, an
    all-zero block (written like any other: a missing block file is damage, never zeros),
    subsets in any order, across chunks."""
    from precompute.store import entry as entry_module

    monkeypatch.setattr(entry_module, "BLOCK_BYTES", 8 * 64 * 16 * 16 * 4)  # 8 rows per Zarr block
    store = ActivationStore(str(tmp_path / "store"), compressor=compressor)
    entry = store.entry(make_key(pooled=False))
    rng = np.random.default_rng(0)
    big = np.maximum(rng.standard_normal((37, 64, 16, 16)), 0).astype("float32")  # blocks of 8, last of 5
    big[:8] = 0.0  # the first block is all fill value
    small = rng.standard_normal((5, 64, 16, 16)).astype("float32")
    ids_big, ids_small = [f"b{i}" for i in range(37)], [f"s{i}" for i in range(5)]
    entry.commit(ids_big, big)
    entry.commit(ids_small, small)
    entry.index(refresh=True)
    assert all(entry._layout(c).checksum for c in entry.records)
    big_chunk = next(c for c, r in entry.records.items() if r["ids"][0] == "b0")
    assert (tmp_path / "store" / entry.rel / "chunks" / big_chunk / "c" / "0" / "0" / "0" / "0").exists()
    rows = {**{f"b{i}": big[i] for i in range(37)}, **{f"s{i}": small[i] for i in range(5)}}
    ids = ["s4", "b36", "b0", "s0", "b7", "b8", "b20"] + ids_big[10:30]
    np.testing.assert_array_equal(entry.read(ids), np.stack([rows[i] for i in ids]))
    np.testing.assert_array_equal(store.entry(entry.key).read(ids_big + ids_small), np.concatenate([big, small]))
    for chunk, record in entry.records.items():  # zarr reads the same values from the same files
        arr = zarr.open_array(f"{entry.path}/chunks/{chunk}", mode="r")
        np.testing.assert_array_equal(arr[:], np.stack([rows[i] for i in record["ids"]]))


def test_auto_codec_compresses_maps_not_pooled_vectors(tmp_path):
    """The default: LZ4 where it pays (spatial maps), raw bytes for pooled vectors (read speed)."""
    store = ActivationStore(str(tmp_path / "store"))
    assert store.compressor == "auto"
    x = np.maximum(np.random.default_rng(0).standard_normal((16, 8, 4, 4)), 0).astype("float32")
    for pooled, data, codecs in ((True, x.reshape(16, -1), ["bytes", "crc32c"]),
                                 (False, x, ["bytes", "blosc", "crc32c"])):
        entry = store.entry(make_key(pooled=pooled))
        chunk = entry.commit([f"i{i}" for i in range(16)], data)
        meta = json.loads((tmp_path / "store" / entry.rel / "chunks" / chunk / "zarr.json").read_text())
        assert [c["name"] for c in meta["codecs"]] == codecs
        np.testing.assert_array_equal(entry.read([f"i{i}" for i in range(16)]), data)
    with pytest.raises(ValueError, match="choose auto or one of"):
        ActivationStore(str(tmp_path / "other"), compressor="lz5")


def test_reachability_probe_creates_nothing_and_says_what_to_fix(tmp_path):
    """One probe (precompute.validate.check_store) behind ActivationStore.check_reachable: a new store
    is writable without creating its folder; a store under a file is a ConfigError naming it."""
    from precompute.train import ConfigError
    from precompute.tracking import Tracker

    store = ActivationStore(str(tmp_path / "new" / "store"))
    assert store.check_reachable() is True and not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        ActivationStore(str(tmp_path / "file" / "store")).check_reachable()
    with pytest.raises(ConfigError, match="unreachable"):
        Tracker("http://127.0.0.1:9").check_reachable()  # nothing listens on port 9


# A key as the code before CacheKey.transform was a TransformSpec wrote it (precompute/store/key.py at
# 7c3c907): key.json is json.dumps(parts, indent=2, sort_keys=True), and the digest names the folder.
PINNED_VERSIONS = {"torch": "2.3.0", "torchvision": "0.18.0", "timm": "1.0.3", "zarr": "2.18.2", "precompute_code": "7"}
PINNED_KEY_JSON = json.dumps({
    "arch": "resnet34", "cut_index": 7, "dtype": "float16", "pooled": False,
    "transform": {"crop": "center", "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406], "resize": 73,
                  "size": 64, "std": [0.229, 0.224, 0.225]},
    "versions": PINNED_VERSIONS, "weights_id": "torchvision:ResNet34_Weights.IMAGENET1K_V1", "xtra_cut": 1,
}, indent=2, sort_keys=True)


def test_key_digest_and_key_json_are_unchanged_by_the_typed_transform(tmp_path):
    """Every existing cache stays in use: the same inputs give the digest (and folder, and view key) that
    the dict-typed key gave, and a key.json written by it reads back as an equal key."""
    key = CacheKey(arch="resnet34", weights_id="torchvision:ResNet34_Weights.IMAGENET1K_V1", xtra_cut=1, cut_index=7,
                   transform=TransformSpec(size=64), pooled=False, dtype="float16", versions=PINNED_VERSIONS)
    assert key.digest() == "18d45b90a7b8e9c2da219317"
    assert key.rel() == "resnet34/cut=1/18d45b90a7b8e9c2da219317"
    assert view_key(key, ["a", "b"], ["x", "y"]) == "875e48ff25deb5d58c4228db"
    nvjpeg = CacheKey(arch="tf_efficientnet_lite0", weights_id="sha256:abc", xtra_cut=0, cut_index=5,
                      transform=TransformSpec(224, 256, "none", (0.5,) * 3, (0.5,) * 3, "bicubic"),
                      versions={"torch": "x"}, decoder="nvjpeg")
    assert nvjpeg.digest() == "b13dd847bdebe22cd12327cd"

    old = CacheKey.from_parts(json.loads(PINNED_KEY_JSON))
    assert old == key and old.transform == TransformSpec(size=64, resize=73) and isinstance(old.transform, TransformSpec)
    assert json.dumps(key.parts(), indent=2, sort_keys=True) == PINNED_KEY_JSON

    store = ActivationStore(str(tmp_path / "store"))  # an entry folder the old code made is found by the new key
    (tmp_path / "store" / key.rel()).mkdir(parents=True)
    (tmp_path / "store" / key.rel() / "key.json").write_text(PINNED_KEY_JSON)
    assert store.open_rel(key.rel()).key == key


def test_a_cache_key_takes_a_transform_spec_not_a_dict():
    with pytest.raises(TypeError, match="TransformSpec"):
        make_key(transform=TransformSpec(size=64).key())
    with pytest.raises(ValueError, match="not the parts of a cache key"):
        CacheKey.from_parts({"arch": "resnet18"})


def test_transform_spec_names_torchvisions_interpolations():
    from torchvision.transforms import InterpolationMode

    from precompute.transform_spec import INTERPOLATIONS

    assert set(INTERPOLATIONS) == {m.value for m in InterpolationMode}
    assert TransformSpec(interpolation="bicubic").interpolation_mode is InterpolationMode.BICUBIC
