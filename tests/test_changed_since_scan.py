"""The bytes decoded are the bytes hashed (issue 19, item 1): an image replaced after the scan is a
failed row ``changed_since_scan`` naming the file, never a row under the old image's hash.

Each case replaces a file between ``build_manifest`` and the precompute, then checks that the
entry has no row under the original hash, that the failure names the file, and (where the
original is put back) that the next run computes the true row. Through the library, local files,
a symlink, a pipe, S3 objects, shards, the GPU decoder's bytes path, the Learner and a Dagster run.
Also here: a CSV row without an image extension is a row (item 5), and a Learner on a read-only
store that lacks rows stops before the body runs (item 5).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from precompute import Learner
from precompute.archs import get_arch
from precompute.backbone import load_backbone, transform_for
from precompute.features import _collate, _Isolated, compute_activations
from precompute.heads import concat_pool
from precompute.images import ChangedSinceScan, load_rgb, read_checked
from precompute.manifest import build_manifest, ok_rows
from precompute.rows import without_failed
from precompute.stages.cache_fill import activation_key, open_entry, precompute, verify_entry
from precompute.store import ActivationStore
from precompute.transforms import EncodedImageDataset, ImageDataset, TransformSpec, eval_transform
from tests._precompute_worker import TRANSFORM, SlowBody, make_key

PROJECT = Path(__file__).resolve().parents[1]
SIZE = 32


def spare(dogscats: Path, n: int = 0) -> Path:
    """A photo that is not in ``tiny_tree`` (which copies the first 8 of each class)."""
    return sorted((dogscats / "train" / "dogs").glob("*.jpg"))[20 + n]


def id_of(manifest, path: Path) -> str:
    return manifest.set_index("path").loc[str(path), "image_id"]


def assert_changed(failed, path: Path | str, image_id: str) -> None:
    assert [(i, p) for i, p, _ in failed] == [(image_id, str(path))], failed
    reason = failed[0][2]
    assert reason.startswith("changed_since_scan") and image_id[:16] in reason and "Scan again" in reason


@pytest.fixture
def resnet(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(get_arch("resnet18").build().state_dict(), weights)
    bb = load_backbone("resnet18", weights_path=str(weights))
    return bb, transform_for(bb.spec, SIZE), weights


def forward(bb, ts, path: Path) -> np.ndarray:
    with torch.no_grad():
        return concat_pool(bb.body.eval()(eval_transform(ts)(load_rgb(path))[None])).numpy()[0]


# --------------------------------------------------------------------------- the library


def test_replaced_image_is_a_failed_row_and_the_original_is_computed_when_it_is_back(tmp_path, tiny_tree, dogscats,
                                                                                      resnet):
    """The issue's repro: the row under the original hash used to be the replacing picture's."""
    bb, ts, _ = resnet
    store = ActivationStore(str(tmp_path / "store"))
    manifest = build_manifest(tiny_tree)
    victim = sorted((tiny_tree / "train" / "cats").iterdir())[0]
    original, image_id = victim.read_bytes(), id_of(manifest, victim)
    victim.write_bytes(spare(dogscats).read_bytes())

    entry, stats, view = precompute(manifest, store, bb, ts, batch_size=8)

    n = ok_rows(manifest)["image_id"].nunique()
    assert (stats.computed, len(stats.failed)) == (n - 1, 1)
    assert_changed(stats.failed, victim, image_id)
    assert entry.missing([image_id]) == [image_id]  # nothing stored under the old hash
    checks = verify_entry(entry, manifest, stats.failed)
    assert not checks["rows_match_manifest"][0] and not checks["every_image_accounted_for"][0]
    named = " ".join(checks["rows_match_manifest"][1]["missing_images"])
    assert f"{victim}: changed_since_scan" in named
    marked = without_failed(manifest, stats.failed)
    row = marked.set_index("path").loc[str(victim)]
    assert row.status == "failed" and row.reason.startswith("changed_since_scan")
    assert [r["damaged"] for r in store.verify()] == [{}]  # `cache verify`: what is stored is sound

    victim.write_bytes(original)  # back as it was: the same manifest again, and the true row
    again = build_manifest(tiny_tree)
    assert id_of(again, victim) == image_id
    entry, stats, _ = precompute(again, store, bb, ts, batch_size=8)
    assert (stats.computed, stats.reused, stats.failed) == (1, n - 1, [])
    np.testing.assert_allclose(entry.read([image_id])[0], forward(bb, ts, victim), rtol=1e-5, atol=1e-5)


def test_a_file_swapped_for_a_symlink_or_a_pipe_after_the_scan(tmp_path, tiny_tree, dogscats):
    manifest = ok_rows(build_manifest(tiny_tree))
    cats = sorted((tiny_tree / "train" / "cats").iterdir())
    linked, piped = cats[0], cats[1]
    ids = {p: id_of(manifest, p) for p in (linked, piped)}
    outside = tmp_path / "elsewhere.jpg"  # outside the root, another picture
    shutil.copy(spare(dogscats), outside)
    linked.unlink()
    linked.symlink_to(outside)
    piped.unlink()
    os.mkfifo(piped)  # no writer: a plain open() would block forever
    entry = ActivationStore(str(tmp_path / "store")).entry(make_key())

    stats = compute_activations(SlowBody(), manifest, eval_transform(TRANSFORM), entry, batch_size=4)

    reasons = {p: r for _, p, r in stats.failed}
    assert set(reasons) == {str(linked), str(piped)} and stats.computed == len(manifest) - 2
    assert reasons[str(linked)].startswith("changed_since_scan")
    assert "no longer a regular file" in reasons[str(piped)]
    assert sorted(entry.missing(ids.values())) == sorted(ids.values())


def test_checked_read_decodes_the_bytes_it_hashed(tmp_path, tiny_tree):
    """``ImageDataset`` with ids: the same pixels as before when nothing changed; ChangedSinceScan
    (an ImageLoadError, pickled across workers) naming the file when it did."""
    manifest = ok_rows(build_manifest(tiny_tree))
    paths, ids = list(manifest["path"][:3]), list(manifest["image_id"][:3])
    tf = eval_transform(TRANSFORM)
    checked, plain = ImageDataset(paths, None, tf, image_ids=ids), ImageDataset(paths, None, tf)
    assert torch.equal(checked[0][0], plain[0][0])
    Path(paths[1]).write_bytes(Path(paths[2]).read_bytes())
    with pytest.raises(ChangedSinceScan) as err:
        checked[1]
    assert err.value.path == paths[1] and str(err.value).startswith(f"{paths[1]}: changed_since_scan")
    import copy  # DataLoader workers send it back pickled: it must survive the round trip
    assert copy.deepcopy(err.value).reason == err.value.reason
    assert read_checked(paths[2], ids[2]) == Path(paths[2]).read_bytes()
    with pytest.raises(ValueError, match="3 paths but 2 image ids"):
        ImageDataset(paths, None, tf, image_ids=ids[:2])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_shards_each_check_their_own_images(tmp_path, tiny_tree, dogscats, num_workers):
    manifest = ok_rows(build_manifest(tiny_tree))
    victim = sorted((tiny_tree / "valid" / "dogs").iterdir())[0]
    image_id = id_of(manifest, victim)
    victim.write_bytes(spare(dogscats).read_bytes())
    entry = ActivationStore(str(tmp_path / "store")).entry(make_key())
    failed = []
    for shard in range(2):
        stats = compute_activations(SlowBody(), manifest, eval_transform(TRANSFORM), entry, batch_size=4,
                                    num_workers=num_workers, shard=(shard, 2))
        failed += stats.failed
    assert_changed(failed, victim, image_id)
    assert entry.missing(manifest["image_id"]) == [image_id]


def test_device_decoder_gets_only_checked_bytes(tmp_path, tiny_tree, dogscats):
    """The nvjpeg path's dataset (its CPU side): the JPEG bytes it hands to the device are the
    bytes checked; a replaced file never reaches the decoder."""
    manifest = ok_rows(build_manifest(tiny_tree))
    paths, ids = list(manifest["path"][:4]), list(manifest["image_id"][:4])
    Path(paths[1]).write_bytes(spare(dogscats).read_bytes())
    tf = eval_transform(TransformSpec(size=SIZE))
    items = _Isolated(EncodedImageDataset(paths, tf, image_ids=ids))
    batch = _collate([items[i] for i in range(len(paths))])
    assert batch.jpeg_index == [0, 2, 3] and [i for i, _ in batch.bad] == [1]
    assert batch.bad[0][1].startswith("changed_since_scan")
    assert [bytes(j.numpy()) for j in batch.jpegs] == [Path(paths[i]).read_bytes() for i in (0, 2, 3)]


def test_s3_object_overwritten_after_the_scan(bucket, tiny_tree, dogscats, tmp_path):
    name, client, options = bucket
    for path in sorted(p for p in tiny_tree.rglob("*.jpg")):
        client.put_object(Bucket=name, Key=f"data/{path.relative_to(tiny_tree).as_posix()}", Body=path.read_bytes())
    manifest = ok_rows(build_manifest(f"s3://{name}/data", storage_options=options))
    url = sorted(p for p in manifest["path"] if "/train/cats/" in p)[0]
    image_id = id_of(manifest, url)
    client.put_object(Bucket=name, Key=url.split(f"{name}/", 1)[1], Body=spare(dogscats).read_bytes())
    entry = ActivationStore(str(tmp_path / "store")).entry(make_key())

    stats = compute_activations(SlowBody(), manifest, eval_transform(TRANSFORM), entry, batch_size=8)

    assert_changed(stats.failed, url, image_id)
    assert stats.computed == len(manifest) - 1 and entry.missing([image_id]) == [image_id]


# --------------------------------------------------------------------------- the Learner


def test_learner_leaves_a_replaced_image_out_and_a_new_learner_computes_the_original(tmp_path, tiny_tree, dogscats,
                                                                                       resnet):
    bb, ts, weights = resnet
    store = tmp_path / "store"
    manifest = build_manifest(tiny_tree)
    victim = sorted((tiny_tree / "train" / "dogs").iterdir())[3]
    original, image_id = victim.read_bytes(), id_of(manifest, victim)
    victim.write_bytes(spare(dogscats).read_bytes())

    def learner(data):
        return Learner.pretrained("resnet18", data, size=SIZE, store=store, weights_path=str(weights), bs=8,
                                  verbose=False)

    learn = learner(manifest)
    assert_changed(learn.precompute_stats.failed, victim, image_id)
    row = learn.data.set_index("path").loc[str(victim)]
    assert row.status == "failed" and row.reason.startswith("changed_since_scan")
    learn.fit(1e-3, 1)  # trains without it
    assert len(learn.history) == 1
    entry = ActivationStore(str(store)).entry(activation_key(bb, ts))
    assert entry.missing([image_id]) == [image_id]

    victim.write_bytes(original)
    again = learner(tiny_tree)
    s = again.precompute_stats
    assert (s.computed, s.failed) == (1, [])
    np.testing.assert_allclose(entry.read([image_id])[0], forward(bb, ts, victim), rtol=1e-5, atol=1e-5)


def test_learner_on_a_read_only_store_lacking_rows_fails_before_the_body_runs(tmp_path, tiny_tree, dogscats, resnet):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.fail("user namespaces (unshare -rm) are needed for the read-only store test")
    _, _, weights = resnet
    store = tmp_path / "store"
    Learner.pretrained("resnet18", tiny_tree, size=SIZE, store=store, weights_path=str(weights), bs=8, verbose=False)
    shutil.copy(spare(dogscats), tiny_tree / "train" / "dogs" / "new.jpg")  # a row the store lacks
    code = textwrap.dedent(f"""
        from pathlib import Path
        from precompute import Learner
        from precompute.manifest import build_manifest
        from precompute.stages import cache_fill  # where the cache fill calls the body

        def body_runs(*a, **k):
            raise SystemExit("the body ran")
        compute_activations, cache_fill.compute_activations = cache_fill.compute_activations, body_runs
        tree, new = Path({str(tiny_tree)!r}), Path({str(tiny_tree / "train" / "dogs" / "new.jpg")!r})
        kw = dict(size={SIZE}, store={str(store)!r}, weights_path={str(weights)!r}, bs=8, verbose=False)
        try:
            Learner.pretrained("resnet18", tree, **kw)
            raise SystemExit("no error")
        except cache_fill.ReadOnlyStore as e:
            print("REFUSED", e)
        old = build_manifest(tree)
        old = old[old.path != str(new)]
        cache_fill.compute_activations = compute_activations
        learn = Learner.pretrained("resnet18", old, **kw)  # every row there: served read-only
        print("SERVED", learn.precompute_stats.computed, learn.precompute_stats.reused)
    """)
    mount = f'mount --bind "{store}" "{store}" && mount -o remount,bind,ro "{store}"'
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f'{mount} && exec "{sys.executable}" -c "$0"', code],
                            cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    refused = result.stdout.split("REFUSED ", 1)[1].splitlines()[0]
    assert "is read-only" in refused and "lacks 1 of 25 rows" in refused and "point PRECOMPUTE_STORE" in refused
    assert "SERVED 0 24" in result.stdout


# --------------------------------------------------------------------------- a Dagster run


def test_dagster_run_shows_the_replaced_image_and_stores_no_stale_row(tmp_path, dogscats, monkeypatch):
    import dagster as dg

    from assets import activations, image_manifest
    from pipelines.definitions import defs
    from pipelines.sensors import new_images_sensor
    from resources import ActivationStoreResource, ComputeDevice, ImageSource
    from tests.conftest import copy_tree

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    images = copy_tree(dogscats, tmp_path / "images", {"train": 3, "valid": 2})
    resources = {"images": ImageSource(source=str(images)), "store": ActivationStoreResource(root=str(tmp_path / "store")),
                 "compute": ComputeDevice(device="cpu")}
    config = {"ops": {"activations": {"config": {"size": 64, "chunk_rows": 4}}}}
    (tmp_path / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home"))
    partition = "tf_efficientnet_lite0|0"
    try:
        def sensor_tick(cursor):
            return new_images_sensor.evaluate_tick(dg.build_sensor_context(
                instance=instance, cursor=cursor, repository_def=defs.get_repository_def(),
                resources={"images": resources["images"]}))

        assert dg.materialize([image_manifest], resources=resources, instance=instance).success  # the scan
        seen = sensor_tick(None).cursor  # the sensor's view of the folder at the scan
        victim = sorted((images / "valid" / "cats").iterdir())[0]
        original = victim.read_bytes()
        victim.write_bytes(spare(dogscats).read_bytes())

        def activations_alone():
            return dg.materialize([image_manifest, activations], partition_key=partition, resources=resources,
                                  instance=instance, run_config=config, selection=[activations], raise_on_error=False)

        result = activations_alone()
        assert result.success  # the other images are cached; the checks fail, naming the replaced one
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert not checks["rows_match_manifest"].passed and not checks["every_image_accounted_for"].passed
        named = " ".join(checks["rows_match_manifest"].metadata["missing_images"].value)
        assert f"{victim}: changed_since_scan" in named
        meta = instance.get_latest_materialization_event(activations.key).asset_materialization.metadata
        assert meta["failed"].value == 1 and meta["computed"].value == 9
        ref = result.output_for_node("activations")
        (image_id, path, reason), = ref.failed_images
        assert path == str(victim) and reason.startswith("changed_since_scan")
        entry = open_entry(ActivationStore(str(tmp_path / "store")), ref)
        assert entry.missing([image_id]) == [image_id]  # no stale row
        assert sensor_tick(seen).run_requests  # the sensor sees the changed file: a run that scans again

        victim.write_bytes(original)  # back: the stored manifest is right again, and the row is computed
        again = activations_alone()
        assert all(e.passed for e in again.get_asset_check_evaluations())
        meta = instance.get_latest_materialization_event(activations.key).asset_materialization.metadata
        assert (meta["computed"].value, meta["reused"].value, meta["failed"].value) == (1, 9, 0)
    finally:
        instance.dispose()


# --------------------------------------------------------------------------- CSV rows without an image extension


def test_csv_row_without_an_image_extension_is_a_row(tmp_path, tiny_tree, caplog):
    photo = sorted((tiny_tree / "train" / "cats").iterdir())[0]
    (tiny_tree / "notes.txt").write_text("not an image")
    (tiny_tree / "train" / "cats" / "scan").write_bytes(photo.read_bytes())  # a photo without an extension
    csv = tiny_tree / "labels.csv"
    csv.write_text("path,label,split\n"
                   f"{photo.relative_to(tiny_tree)},cats,train\n"
                   "notes.txt,cats,train\n"
                   "train/cats/scan,cats,valid\n")
    with caplog.at_level("WARNING"):
        df = build_manifest(csv).set_index("relpath")
    assert len(df) == 3 and df.loc[photo.relative_to(tiny_tree).as_posix(), "status"] == "ok"
    for rel, line, ext, split in (("notes.txt", 3, "'.txt'", "train"), ("train/cats/scan", 4, "'(none)'", "valid")):
        row = df.loc[rel]
        assert (row.status, row.label, row.split, row.image_id) == ("not_image", "cats", split, "")
        assert row.reason.startswith(f"line {line}: extension {ext} is not an image type") and "never read" in row.reason
    assert "2 CSV rows" in caplog.text and "not_image" in caplog.text
