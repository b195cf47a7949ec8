"""Change one thing at a time; each time the cache must serve exactly what a fresh forward pass gives."""

import shutil

import numpy as np
import pytest
import torch

from precompute.archs import get_arch
from precompute.backbone import load_backbone, transform_for
from precompute.heads import concat_pool
from precompute.images import load_rgb
from precompute.manifest import build_manifest, ok_rows
from precompute.stages.cache_fill import precompute
from precompute.store import ActivationStore
from precompute.transforms import eval_transform

SIZE = 32


@pytest.fixture
def setup(tmp_path, tiny_tree):
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(get_arch("resnet18").build().state_dict(), weights)
    return tmp_path, tiny_tree, weights


def fresh(bb, ts, paths, pooled=True):
    with torch.no_grad():
        x = torch.stack([eval_transform(ts)(load_rgb(p)) for p in paths])
        out = bb.body.eval()(x)
    return concat_pool(out).numpy() if pooled else out.numpy()


def run(store, tree, weights, xtra_cut=0, pooled=True, dtype="float32", **ts_changes):
    bb = load_backbone("resnet18", xtra_cut, weights_path=str(weights))
    ts = transform_for(bb.spec, SIZE)
    ts = type(ts)(**{**ts.key(), "resize": None, **ts_changes})
    manifest = build_manifest(tree)
    entry, stats, view = precompute(manifest, store, bb, ts, pooled, dtype, batch_size=8)
    rows = ok_rows(manifest)
    got = entry.read(list(rows["image_id"]))
    want = fresh(bb, ts, rows["path"], pooled).astype(dtype)
    np.testing.assert_allclose(got, want, rtol=1e-3 if dtype == "float16" else 1e-5, atol=1e-3 if dtype == "float16" else 1e-5)
    return entry, stats, view, rows


def test_every_change_uses_a_different_entry_and_never_a_stale_row(setup):
    tmp_path, tree, weights = setup
    store = ActivationStore(str(tmp_path / "store"))
    base, stats, view, rows = run(store, tree, weights)
    assert stats.computed == len(rows)

    # an image replaced by another under the same name (same count): served by content, never stale
    cats, dogs = sorted((tree / "train" / "cats").iterdir()), sorted((tree / "train" / "dogs").iterdir())
    shutil.copy(dogs[0], cats[0])  # cat 0 now holds dog 0's bytes, whose row exists already
    entry, stats, view2, rows2 = run(store, tree, weights)
    assert entry.path == base.path and view2 != view and stats.computed == 0
    with open(cats[1], "ab") as f:
        f.write(b"\0")  # different bytes, same picture: a new content hash, computed alone
    entry, stats, view3, _ = run(store, tree, weights)
    assert stats.computed == 1 and view3 != view2

    # two images swapped between classes: same rows, different labels, different view key
    a, b = cats[2], dogs[2]
    tmp = a.with_suffix(".swap")
    a.rename(tmp), b.rename(a), tmp.rename(b)
    manifest = build_manifest(tree)
    _, stats, view4, _ = run(store, tree, weights)
    assert stats.computed == 0 and view4 != view3
    swapped = manifest.set_index("relpath")["image_id"]
    assert swapped[f"train/cats/{a.name}"] != swapped[f"train/dogs/{b.name}"]

    # every part of the key: a different entry, rows computed afresh and equal to a forward pass
    paths = {base.path}
    for changes in [dict(resize=48), dict(crop="none"), dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
                    dict(xtra_cut=1), dict(pooled=False), dict(dtype="float16"), dict(size=40)]:
        entry, stats, _, rows = run(store, tree, weights, **changes)
        assert entry.path not in paths, changes
        assert stats.computed == rows["image_id"].nunique(), changes
        paths.add(entry.path)

    # new weights in the same file: the weights' sha256 changes the entry
    state = torch.load(weights, weights_only=True)
    state["conv1.weight"] += 0.01
    torch.save(state, weights)
    entry, stats, _, rows = run(store, tree, weights)
    assert entry.path not in paths and stats.computed == rows["image_id"].nunique()
