"""A 2-shard precompute on Dask (a LocalCluster the resource starts) gives exactly the cache of a 1-shard run."""

import os

import dagster as dg
import numpy as np

from precompute.backbone import load_backbone, transform_for
from precompute.features import in_shard
from precompute.manifest import build_manifest, ok_rows
from precompute.stages.cache_fill import precompute
from precompute.store import ActivationStore
from resources import ActivationStoreResource, ComputeDevice, DaskCluster, ImageSource

PARTITION = "tf_efficientnet_lite0|0"


def single_run(manifest, store_root, size: int, chunk_rows: int, xtra_cut: int = 0):
    """The reference: the same images precomputed in this process, in one shard."""
    bb = load_backbone("tf_efficientnet_lite0", xtra_cut)
    single, _, _ = precompute(manifest, ActivationStore(str(store_root)), bb,
                              transform_for(bb.spec, size), chunk_rows=chunk_rows)
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


def run_sharded(images, store_root, dask: DaskCluster, config: dict, partition: str = PARTITION,
                instance: dg.DagsterInstance | None = None) -> dg.ExecuteInProcessResult:
    """The job's one step in this process; its shard tasks on ``dask``'s cluster."""
    from pipelines.sharding import precompute_sharded

    resources = {"images": ImageSource(source=str(images)), "store": ActivationStoreResource(root=str(store_root)),
                 "compute": ComputeDevice(device="cpu", num_threads=1), "dask": dask}
    return precompute_sharded.execute_in_process(
        run_config={"ops": {"precompute_shards": {"config": config}}}, resources=resources, partition_key=partition,
        instance=instance or dg.DagsterInstance.ephemeral(), raise_on_error=False)


def test_two_shards_on_a_local_cluster_equal_one(tmp_path, tiny_tree):
    """No scheduler address: the resource starts a 2-worker LocalCluster for the run and stops it."""
    result = run_sharded(tiny_tree, tmp_path / "sharded", DaskCluster(local_workers=2),
                         {"size": 32, "chunk_rows": 4, "shards": 2})
    assert result.success
    out = result.output_for_node("precompute_shards")
    shards = out["shards"]
    assert [s["shard"] for s in shards] == [0, 1]
    # each shard ran in a worker process of its own, not in this one (no silent fallback)
    pids = {s["pid"] for s in shards}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(s["computed"] > 0 for s in shards)  # both shards did work
    manifest = build_manifest(tiny_tree)
    ids = list(ok_rows(manifest)["image_id"])
    assert out["computed"] == sum(s["computed"] for s in shards) == len(set(ids)) and out["reused"] == 0

    single = single_run(manifest, tmp_path / "single", size=32, chunk_rows=4)
    sharded = ActivationStore(str(tmp_path / "sharded")).entry(single.key)
    assert_same_entry(sharded, single, ids)
    # disjoint chunks: every committed chunk holds images of one shard only
    sharded.index(refresh=True)
    assert sharded.records and all(len({in_shard(i, 0, 2) for i in r["ids"]}) == 1 for r in sharded.records.values())


def test_sharded_job_is_one_step_with_the_dask_resource():
    """The shards are Dask tasks inside one step, not Dagster steps (no custom executor, no DynamicOut)."""
    from pipelines.definitions import defs

    job = defs.resolve_job_def("precompute_sharded")
    assert [n.name for n in job.graph.nodes] == ["precompute_shards"]
    assert {"images", "store", "compute", "dask"} <= job.graph.node_named("precompute_shards").definition.required_resource_keys
    assert isinstance(defs.resources["dask"], DaskCluster)
