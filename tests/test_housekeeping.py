import os
import time
from dataclasses import replace

import dagster as dg
import numpy as np
import zarr

from precompute.cli import main as cli
from precompute.store import ActivationStore
from tests.test_store import make_key

DAY = 86400


def _entry(store, arch, age_days):
    entry = store.entry(make_key(arch=arch))
    entry.commit(["a", "b"], np.ones((2, 4), "float32"))
    store.put(f"{entry.rel}/last_used", str(time.time() - age_days * DAY).encode())
    return entry


def test_gc_removes_only_unused_entries_and_crash_leftovers(tmp_path, capsys):
    store = ActivationStore(str(tmp_path / "store"))
    kept_by_name = _entry(store, "resnet18", age_days=90)
    old = _entry(store, "resnet34", age_days=90)
    recent = _entry(store, "resnet50", age_days=1)
    orphan = tmp_path / "store" / recent.rel / "chunks" / "crashed"
    zarr.create_array(str(orphan), data=np.zeros((2, 4), "float32"))
    os.utime(orphan / "zarr.json", (time.time() - 2 * 3600,) * 2)

    assert cli(["cache", "list", "--store", str(tmp_path / "store")]) == 0
    listing = capsys.readouterr().out
    assert all(e.rel in listing for e in (kept_by_name, old, recent)) and "3 entries" in listing
    assert cli(["cache", "gc", "--store", str(tmp_path / "store"), "--dry-run", "--unused-days", "30"]) == 0
    assert old.rel in capsys.readouterr().out and (tmp_path / "store" / old.rel).exists()

    removed = store.remove_unused(keep={kept_by_name.rel}, unused_for_s=30 * DAY)
    assert set(removed) == {old.rel, f"{recent.rel}/chunks/crashed"}
    assert not (tmp_path / "store" / old.rel).exists()
    np.testing.assert_array_equal(recent.read(["a", "b"]), np.ones((2, 4)))  # committed rows untouched
    np.testing.assert_array_equal(kept_by_name.read(["a"]), np.ones((1, 4)))
    assert {e["entry"] for e in store.entries()} == {kept_by_name.rel, recent.rel}


def test_reading_an_entry_counts_as_use(tmp_path):
    store = ActivationStore(str(tmp_path / "store"))
    entry = _entry(store, "resnet34", age_days=90)
    store.entry(entry.key).read(["a"])  # a reader (a new Entry, as in another process)
    assert store.remove_unused(unused_for_s=30 * DAY) == []


def test_housekeeping_job_keeps_what_partitions_use(tmp_path, tiny_tree, monkeypatch):
    from assets import activations, image_manifest
    from pipelines.housekeeping import cache_housekeeping
    from resources import ActivationStoreResource, ComputeDevice, ImageSource

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    store_res = ActivationStoreResource(root=str(tmp_path / "store"))
    (tmp_path / "dh").mkdir()
    with dg.DagsterInstance.local_temp(str(tmp_path / "dh")) as instance:
        assert dg.materialize([image_manifest, activations], partition_key="tf_efficientnet_lite0|0",
                              instance=instance, run_config={"ops": {"activations": {"config": {"size": 32}}}},
                              resources={"images": ImageSource(source=str(tiny_tree)), "store": store_res,
                                         "compute": ComputeDevice()}).success
        store = store_res.get()
        in_use = store.entries()[0]["entry"]
        stale = _entry(store, "resnet34", age_days=90)
        result = cache_housekeeping.execute_in_process(
            instance=instance, resources={"store": store_res},
            run_config={"ops": {"remove_unused_cache_entries": {"config": {"unused_days": 0}}}})
        assert result.success
        assert result.output_for_node("remove_unused_cache_entries") == [stale.rel]
        assert [e["entry"] for e in store.entries()] == [in_use]
