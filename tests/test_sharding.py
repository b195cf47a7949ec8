"""A 2-shard precompute on Dagster's multiprocess executor gives exactly the cache of a 1-shard run."""

import dagster as dg
import numpy as np

from precompute import recipe
from precompute.data import build_manifest, ok_rows
from precompute.features import in_shard
from precompute.store import ActivationStore

PARTITION = "tf_efficientnet_lite0|0"


def sharded_job():
    """The job as Dagster's multiprocess executor loads it in each step's process (env-configured).

    The executor is named, not taken from $PRECOMPUTE_EXECUTOR at import: test_dask_shards may have
    imported the job in this process with the dask one."""
    from pipelines.definitions import defs

    return defs.resolve_job_def("precompute_sharded").with_executor_def(dg.multiprocess_executor)


def single_run(manifest, store_root, size: int, chunk_rows: int, xtra_cut: int = 0):
    """The reference: the same images precomputed in this process, in one shard."""
    bb = recipe.load_backbone("tf_efficientnet_lite0", xtra_cut)
    single, _, _ = recipe.precompute(manifest, ActivationStore(str(store_root)), bb,
                                     recipe.transform_for(bb.spec, size), chunk_rows=chunk_rows)
    return single


def assert_same_entry(sharded, single, ids, mean_atol: float | None = 1e-6) -> None:
    """The same rows under the same key; values equal to float32 rounding.

    oneDNN picks its channels-last kernels by batch size and thread count (the shard processes run
    1 thread, this one 2), so sums run in another order. Seen at cut 0, 32 px: at most 1.5e-5
    absolute on values up to ~5, a few elements in 60k. A row in the wrong place or another image's
    features differ by ~0.1-1."""
    assert sharded.rel == single.rel and set(sharded.index(refresh=True)) == set(single.index()) == set(ids)
    got, want = sharded.read(ids), single.read(ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if mean_atol is not None:
        assert np.abs(got - want).mean() < mean_atol  # the bulk agrees far more tightly than the worst element


def test_two_shards_equal_one(tmp_path, tiny_tree, monkeypatch):
    for var, value in {"PRECOMPUTE_HOME": tmp_path / "home", "PRECOMPUTE_DATA": tiny_tree,
                       "PRECOMPUTE_STORE": tmp_path / "sharded"}.items():
        monkeypatch.setenv(var, str(value))  # the step processes build their resources from these
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "dh").mkdir()
    with dg.DagsterInstance.local_temp(str(tmp_path / "dh")) as instance:
        with dg.execute_job(
                dg.reconstructable(sharded_job), instance, tags={"dagster/partition": PARTITION},
                run_config={"ops": {op: {"config": {"size": 32, "chunk_rows": 4, "shards": 2}}
                                    for op in ("plan_shards", "compute_shard")},
                            "execution": {"config": {"max_concurrent": 2}}}) as result:
            assert result.success
            steps = {e.step_key: e.pid for e in result.all_events if e.event_type_value == "STEP_START"}
            shard_results = dict(result.output_for_node("compute_shard"))
    assert len({pid for step, pid in steps.items() if step.startswith("compute_shard")}) == 2  # two processes
    # one scan for the run: the shards get its manifest and cannot reach the image source themselves
    assert [step for step in steps if "scan" in step] == ["scan_manifest"]
    from pipelines.sharding import compute_shard
    assert "images" not in compute_shard.required_resource_keys
    assert set(shard_results) == {"shard_0", "shard_1"}
    assert all(r["computed"] > 0 for r in shard_results.values())  # both shards did work
    manifest = build_manifest(tiny_tree)
    ids = list(ok_rows(manifest)["image_id"])
    assert sum(r["computed"] for r in shard_results.values()) == len(set(ids))

    single = single_run(manifest, tmp_path / "single", size=32, chunk_rows=4)
    sharded = ActivationStore(str(tmp_path / "sharded")).entry(single.key)
    assert_same_entry(sharded, single, ids)
    # disjoint chunks: every committed chunk holds images of one shard only
    for record in (sharded.index(refresh=True), sharded.records)[1].values():  # chunk -> its commit record
        assert len({in_shard(i, 0, 2) for i in record["ids"]}) == 1
