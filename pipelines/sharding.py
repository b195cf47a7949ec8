"""Precompute one partition in shards by image hash, each shard a Dask task.

The job has one step, ``precompute_shards``: it scans the source once (through the scan index),
then submits one task per shard to the Dask cluster of the ``dask`` resource (``DaskCluster``: a
scheduler address, or a LocalCluster for the run) with Dask's own ``retries``, and gathers their
stats. Each task gets only its shard's manifest rows and writes its own, disjoint chunks into the
shared store (a path or an S3 URL the workers reach). The workers report start and progress as Dask
events (``Worker.log_event``); the step subscribes to them and writes them to the Dagster log. A
worker that dies mid-shard has its task rescheduled by the Dask scheduler on another worker, which
keeps the committed chunks and computes the rest. Materializing ``activations`` afterwards finds every
row committed and computes nothing; its checks verify the result.

Only public APIs: Dagster's op and job, Dask's Client.submit / wait / subscribe_topic.
"""

import json
import os
import queue
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Optional

import dagster as dg
from pydantic import Field

from assets.activations import ActivationsConfig
from assets.partitions import arch_and_cut, arch_cut
from resources import ActivationStoreResource, ComputeDevice, DaskCluster, ImageSource

PROGRESS_EVERY_S = 2.0  # a worker reports its shard's progress at most this often


class ShardedPrecomputeConfig(ActivationsConfig):
    shards: int = Field(2, ge=1)  # Dask tasks, each a share of the rows


@dataclass(frozen=True)
class ShardJob:
    """Everything a shard task needs, as plain values (the workers build their own store and backbone)."""
    arch: str
    xtra_cut: int
    settings: dict            # cache_fill.CacheSettings fields
    store_root: str
    store_options: dict
    compressor: str
    device: str
    num_threads: int
    num_workers: int
    shards: int
    topic: str                # the Dask event topic the step listens on


def compute_shard(job: ShardJob, manifest, shard: int) -> dict:
    """One shard, in a Dask worker: its rows of ``manifest`` into the store; returns its stats."""
    from distributed import get_worker

    from precompute.backbone import load_backbone, transform_for
    from precompute.stages.cache_fill import CacheSettings, precompute
    from precompute.store import DEFAULT_COMPRESSOR, ActivationStore
    from resources import resolve_device

    worker, pid, start, last = get_worker(), os.getpid(), time.perf_counter(), [0.0]
    worker.log_event(job.topic, {"shard": shard, "event": "start", "worker": worker.address, "pid": pid})

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            worker.log_event(job.topic, {"shard": shard, "event": "progress", "worker": worker.address,
                                         "done": done, "total": total, "seconds": now - start})

    device = resolve_device(job.device, job.num_threads)
    settings = CacheSettings(**job.settings)
    bb = load_backbone(job.arch, job.xtra_cut, settings.weights, settings.weights_path)
    store = ActivationStore(job.store_root, job.store_options, job.compressor or DEFAULT_COMPRESSOR)
    entry, stats, _ = precompute(manifest, store, bb, transform_for(bb.spec, settings.size),
                                 settings.pooled, settings.dtype, settings.batch_size, settings.chunk_rows,
                                 job.num_workers, device, progress, shard=(shard, job.shards),
                                 decoder=settings.decoder)
    return {"shard": shard, "entry": entry.rel, "worker": worker.address, "pid": pid, **stats.as_dict()}


class _WorkerLog:
    """The workers' events, written to the Dagster log by the step's own thread (Dask calls the
    handler on its event loop); a shard that starts again says where it ran before."""

    def __init__(self, log, shards: int):
        self.log, self.shards, self.events = log, shards, queue.Queue()
        self.started: dict = {}

    def handler(self, event) -> None:
        self.events.put(event[1])  # (timestamp, msg)

    def drain(self) -> None:
        while True:
            try:
                msg = self.events.get_nowait()
            except queue.Empty:
                return
            k, where = msg["shard"], f"Dask worker {msg['worker']}"
            if msg["event"] == "start":
                before = self.started.setdefault(k, [])
                again = (f"; it started before on {', '.join(before)} (Dask runs it again: its worker was lost, "
                         "or it raised and has retries left); the chunks committed there are kept") if before else ""
                before.append(f"{msg['worker']} (pid {msg['pid']})")
                self.log.info(f"shard {k}/{self.shards} started on {where} (pid {msg['pid']}){again}")
            else:
                rate = msg["done"] / max(msg["seconds"], 1e-9)
                self.log.info(f"shard {k}/{self.shards} on {where}: {msg['done']}/{msg['total']} images, "
                              f"{rate:.1f} img/s, ETA {(msg['total'] - msg['done']) / max(rate, 1e-9):.0f}s")


def run_shards(client, job: ShardJob, manifest, log, retries: int, no_workers_timeout_s: float) -> list[dict]:
    """Submit one task per shard, log the workers' events as they come, return the shards' stats in order."""
    import distributed

    from precompute.features import in_shard
    from precompute.manifest import ok_rows

    rows = ok_rows(manifest)
    worker_log = _WorkerLog(log, job.shards)
    client.subscribe_topic(job.topic, worker_log.handler)
    futures = {}
    for k in range(job.shards):
        part = rows[[in_shard(i, k, job.shards) for i in rows["image_id"]]] if job.shards > 1 else rows
        futures[client.submit(compute_shard, job, part, k, key=f"{job.topic}-shard-{k}", retries=retries,
                              pure=False)] = k
    log.info(f"{job.shards} shard task(s) of {len(rows)} images submitted to the Dask scheduler at "
             f"{client.scheduler.address}")
    results: dict = {}
    no_workers_since: Optional[float] = None
    try:
        pending = set(futures)
        while pending:
            try:
                distributed.wait(pending, timeout=1, return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
            worker_log.drain()
            for future in [f for f in pending if f.done()]:
                pending.discard(future)
                k = futures[future]
                try:
                    results[k] = future.result()
                except distributed.KilledWorker as e:
                    raise dg.Failure(f"shard {k}: the Dask cluster lost every worker that ran it ({e}); the chunks "
                                     "they committed are kept, run the job again") from e
                log.info(f"shard {k}/{job.shards} done on {results[k]['worker']}: {results[k]['computed']} computed, "
                         f"{results[k]['reused']} reused, {results[k]['images_per_s']} img/s")
            if not pending:
                break
            if client.scheduler_info(n_workers=1)["workers"]:
                no_workers_since = None
            elif no_workers_since is None:
                no_workers_since = time.monotonic()
            elif time.monotonic() - no_workers_since > no_workers_timeout_s:
                raise dg.Failure(f"the Dask cluster at {client.scheduler.address} has had no workers for "
                                 f"{no_workers_timeout_s:.0f} s while shards {sorted(futures[f] for f in pending)} "
                                 "wait: start workers (`dask worker <scheduler address>`) or check why they exit")
    finally:
        client.cancel([f for f in futures if not f.done()])
        client.unsubscribe_topic(job.topic)
        worker_log.drain()
    return [results[k] for k in range(job.shards)]


def shard_job(context, config: ShardedPrecomputeConfig, store: ActivationStoreResource,
              compute: ComputeDevice) -> ShardJob:
    """The shard tasks' job, its settings checked first, in this step: a task would only fail (and be
    retried by Dask) on them."""
    from precompute.body_spec import BodySpec
    from precompute.errors import ConfigError
    from precompute.settings import all_checks
    from precompute.validate import validate_run

    arch, xtra_cut = arch_and_cut(context)
    settings = config.model_dump(exclude={"shards"})  # checked when the step built the config (settings)
    try:
        all_checks(lambda: BodySpec(arch, xtra_cut, config.size),
                   lambda: validate_run(arch=arch, weights=config.weights, weights_path=config.weights_path))
    except ConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    return ShardJob(arch, xtra_cut, settings, store.root, json.loads(store.storage_options_json), store.compressor,
                    compute.device, compute.num_threads, compute.num_workers, config.shards,
                    topic=f"precompute-{context.run_id[:8]}")


def open_client(stack: ExitStack, dask: DaskCluster):
    """The cluster's client for the rest of ``stack``; an unreachable scheduler fails the step, no retry."""
    try:
        return stack.enter_context(dask.client())
    except (ConnectionError, ValueError) as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc


def gathered(results: list[dict], scan_stats: dict) -> tuple[dict, dict]:
    """The shards' stats summed, and the step's metadata; shards that wrote different entries fail it."""
    entries = {r["entry"] for r in results}
    if len(entries) != 1:
        raise dg.Failure(f"shards wrote different entries {sorted(entries)}: their configs differ")
    total = {k: sum(r[k] for r in results) for k in ("images", "computed", "reused", "chunks", "failed")}
    return total, {"entry": entries.pop(), **total, "shards": len(results),
                   "scan": dg.MetadataValue.json({k: v for k, v in scan_stats.items() if v is not None}),
                   "workers": dg.MetadataValue.json({str(r["shard"]): r["worker"] for r in results})}


@dg.op(description="Scan once, then one Dask task per shard (the dask resource's cluster); gather their stats")
def precompute_shards(context: dg.OpExecutionContext, config: ShardedPrecomputeConfig, images: ImageSource,
                      store: ActivationStoreResource, compute: ComputeDevice, dask: DaskCluster) -> dict:
    job = shard_job(context, config, store, compute)
    with ExitStack() as stack:
        client = open_client(stack, dask)  # first: an unreachable scheduler fails before the scan
        scan = images.scan()  # the one scan of the run: the shards get their rows, never the source
        manifest = images.manifest(scan)
        results = run_shards(client, job, manifest, context.log, dask.task_retries, dask.no_workers_timeout_s)
    total, metadata = gathered(results, scan.stats)
    context.add_output_metadata(metadata)
    return {**total, "shards": results}


@dg.job(partitions_def=arch_cut,
        description="Fill one partition's activation entry in parallel shards on a Dask cluster; then "
                    "materialize activations")
def precompute_sharded():
    precompute_shards()
