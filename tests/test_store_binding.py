"""Every chunk and commit record is bound to its entry (issue 19): rows copied in from another
entry (same row shape, another image size) are never served; reads and `verify` name both entries,
repair drops them, and a key.json that belongs to another folder is flagged by `list` and `verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from precompute.cli import main as cli
from precompute.features import compute_activations
from precompute.store import ActivationStore, CacheCorruption
from precompute.store.key import digest
from precompute.transforms import TransformSpec, eval_transform
from tests._precompute_worker import TRANSFORM, SlowBody, make_key, manifest_of, write_images

OTHER = TransformSpec(size=40)  # entry B: another image size, the same pooled row shape


def fill(store: ActivationStore, images: Path, ts: TransformSpec):
    manifest = manifest_of(images)
    entry = store.entry(make_key(transform=ts))
    compute_activations(SlowBody(), manifest, eval_transform(ts), entry, batch_size=4, chunk_rows=8)
    ids = list(manifest["image_id"])
    return entry, ids, entry.read(ids)


def as_format_2(commits: Path) -> None:
    """Rewrite the records as format 2 wrote them (no entry in them): only zarr.json binds them."""
    for path in commits.glob("*.json"):
        r = json.loads(path.read_text())
        r = {k: v for k, v in r.items() if k not in ("entry", "key_digest", "sha256")}
        r["format"] = 2
        r["sha256"] = digest(r)
        path.write_text(json.dumps(r))


@pytest.fixture
def two_entries(tmp_path):
    images = tmp_path / "images"
    write_images(images, 16)
    store = ActivationStore(str(tmp_path / "store"))
    a, ids, rows_a = fill(store, images, TRANSFORM)
    b, _, rows_b = fill(store, images, OTHER)
    assert rows_a.shape == rows_b.shape and np.abs(rows_a - rows_b).max() > 0.1
    return store, images, a, b, ids, rows_a, rows_b


@pytest.mark.parametrize("record_format", [3, 2])
def test_chunks_copied_from_another_entry_are_never_served(two_entries, capsys, record_format):
    store, images, a, b, ids, rows_a, rows_b = two_entries
    root = Path(store.base)
    for folder in ("commits", "chunks"):  # B's rows replaced by A's files
        shutil.rmtree(root / b.rel / folder)
        shutil.copytree(root / a.rel / folder, root / b.rel / folder)
    if record_format == 2:
        as_format_2(root / b.rel / "commits")
        as_format_2(root / a.rel / "commits")
        np.testing.assert_array_equal(store.entry(a.key).read(ids), rows_a)  # old records stay readable

    with pytest.raises(CacheCorruption) as err:
        store.entry(b.key).read(ids)
    assert a.rel in str(err.value) and b.rel in str(err.value)
    assert cli(["cache", "verify", "--store", store.root]) == 1
    out = capsys.readouterr().out
    assert f"belongs to entry {a.rel}" in out and "DAMAGED" in out

    assert cli(["cache", "verify", "--repair", "--store", store.root]) == 0
    stats = compute_activations(SlowBody(), manifest_of(images), eval_transform(OTHER), store.entry(b.key),
                                batch_size=4, chunk_rows=8)
    assert stats.computed == len(ids)
    np.testing.assert_allclose(store.entry(b.key).read(ids), rows_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(store.entry(a.key).read(ids), rows_a)  # A untouched
    assert cli(["cache", "verify", "--store", store.root]) == 0


def test_copied_chunks_beside_the_entry_own_ones_are_left_out(two_entries, capsys):
    """A's files added beside B's own: B's reads serve only B's rows; verify flags the strays."""
    store, _, a, b, ids, _, rows_b = two_entries
    root = Path(store.base)
    for folder in ("commits", "chunks"):
        shutil.copytree(root / a.rel / folder, root / b.rel / folder, dirs_exist_ok=True)
    for _ in range(3):  # whichever chunk name sorts first, B's own rows are served
        np.testing.assert_allclose(store.entry(b.key).read(ids), rows_b, rtol=1e-5, atol=1e-6)
    assert cli(["cache", "verify", "--store", store.root]) == 1
    assert cli(["cache", "list", "--store", store.root]) == 0
    assert f"belongs to entry {a.rel}" in capsys.readouterr().out


def test_a_swapped_key_json_is_flagged_by_list_and_verify(two_entries, capsys):
    store, _, a, b, ids, _, rows_b = two_entries
    root = Path(store.base)
    original = (root / b.rel / "key.json").read_bytes()
    shutil.copy(root / a.rel / "key.json", root / b.rel / "key.json")

    assert cli(["cache", "list", "--store", store.root]) == 0
    out = capsys.readouterr().out
    assert f"is the key of entry {a.rel}, not of this folder" in out and "1 damaged" in out
    assert cli(["cache", "verify", "--store", store.root]) == 1
    assert cli(["cache", "verify", "--repair", "--store", store.root]) == 0
    assert json.loads((root / b.rel / "key.json").read_bytes()) == json.loads(original)
    np.testing.assert_allclose(store.entry(b.key).read(ids), rows_b, rtol=1e-5, atol=1e-6)
