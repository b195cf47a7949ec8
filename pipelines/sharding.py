"""Precompute one partition in shards by image hash, one Dagster step per shard.

Run this job with the multiprocess executor here, or with dagster-k8s / dagster-celery / dagster-dask
in a cluster: each step computes the images of its shard into the shared store (a path or an S3
URL) with its own, disjoint chunks. Materializing `activations` afterwards finds every row
committed and computes nothing; its checks verify the result.

The source is scanned once per run, by `scan_manifest`: every shard receives that manifest as its
input (through the run's IO manager: a pickle under DAGSTER_HOME with the multiprocess executor;
in a cluster configure a shared one, e.g. dagster-aws's s3_pickle_io_manager) and never lists or
reads the images to find them. The scan itself reads only what the scan index does not know.
"""

import os

import dagster as dg

from assets.activations import ActivationsConfig, progress_logger
from assets.partitions import arch_and_cut, arch_cut
from precompute import recipe
from resources import ActivationStoreResource, ComputeDevice, ImageSource


class ShardedPrecomputeConfig(ActivationsConfig):
    shards: int = 2


@dg.op(out=dg.DynamicOut(int))
def plan_shards(config: ShardedPrecomputeConfig):
    if config.shards < 1:
        raise dg.Failure("shards must be >= 1", allow_retries=False)
    for i in range(config.shards):
        yield dg.DynamicOutput(i, mapping_key=f"shard_{i}")


@dg.op
def scan_manifest(context: dg.OpExecutionContext, images: ImageSource):
    """The one scan of the run: the manifest every shard computes from."""
    scan = images.scan()
    manifest = images.manifest(scan)
    context.add_output_metadata({"images": len(manifest), "ok": int((manifest["status"] == "ok").sum()),
                                 "scan": dg.MetadataValue.json({k: v for k, v in scan.stats.items() if v is not None})})
    return manifest


@dg.op
def compute_shard(context: dg.OpExecutionContext, config: ShardedPrecomputeConfig, shard: int, manifest,
                  store: ActivationStoreResource, compute: ComputeDevice) -> dict:
    arch, xtra_cut = arch_and_cut(context)
    device = compute.setup()
    bb = recipe.load_backbone(arch, xtra_cut, config.weights, config.weights_path)
    entry, stats, _ = recipe.precompute(manifest, store.get(), bb, recipe.transform_for(bb.spec, config.size),
                                        config.pooled, config.dtype, config.batch_size, config.chunk_rows,
                                        compute.num_workers, device, progress_logger(context, f"shard {shard}"),
                                        shard=(shard, config.shards))
    context.log.info(f"shard {shard}/{config.shards}: {stats.computed} computed, {stats.reused} reused")
    return {"entry": entry.rel, **stats.as_dict()}


@dg.op
def summarize_shards(context: dg.OpExecutionContext, results: list) -> dict:
    entries = {r["entry"] for r in results}
    if len(entries) != 1:
        raise dg.Failure(f"shards wrote different entries {sorted(entries)}: their configs differ")
    total = {k: sum(r[k] for r in results) for k in ("images", "computed", "reused", "chunks")}
    context.add_output_metadata({"entry": entries.pop(), **total, "shards": len(results)})
    return total


def executor_from_env():
    """$PRECOMPUTE_EXECUTOR picks Dagster's own engine: multiprocess (default), k8s, celery or dask.

    The cluster ones need their package installed (dagster-k8s, dagster-celery, dagster-dask);
    they are configured by run config, see deploy/k8s/.
    """
    kind = os.environ.get("PRECOMPUTE_EXECUTOR", "multiprocess")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor
        return k8s_job_executor
    if kind == "celery":
        from dagster_celery import celery_executor
        return celery_executor
    if kind == "dask":
        from dagster_dask import dask_executor
        return dask_executor
    if kind != "multiprocess":
        raise ValueError(f"PRECOMPUTE_EXECUTOR={kind!r}: use multiprocess, k8s, celery or dask")
    return dg.multiprocess_executor


@dg.job(partitions_def=arch_cut, executor_def=executor_from_env(),
        description="Fill one partition's activation entry in parallel shards; then materialize activations")
def precompute_sharded():
    manifest = scan_manifest()
    summarize_shards(plan_shards().map(lambda shard: compute_shard(shard, manifest)).collect())
