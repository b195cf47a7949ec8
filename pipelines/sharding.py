"""Precompute one partition in shards by image hash, one Dagster step per shard.

Run this job with the multiprocess executor here, or with dagster-k8s / dagster-celery or on a Dask
cluster (PRECOMPUTE_EXECUTOR, see executor_from_env): each step computes the images of its shard into
the shared store (a path or an S3 URL) with its own, disjoint chunks. Materializing `activations` afterwards finds every row
committed and computes nothing; its checks verify the result.

The source is scanned once per run, by `scan_manifest`: every shard receives that manifest as its
input (through the run's IO manager: a pickle under DAGSTER_HOME with the multiprocess executor;
in a cluster configure a shared one, e.g. dagster-aws's s3_pickle_io_manager) and never lists or
reads the images to find them. The scan itself reads only what the scan index does not know.
"""

import os

import dagster as dg

from assets._util import LazyModule
from assets.activations import ActivationsConfig, progress_logger
from assets.partitions import arch_and_cut, arch_cut
from resources import ActivationStoreResource, ComputeDevice, ImageSource

recipe = LazyModule("precompute.recipe")  # torch loads when a shard runs, not with the definitions


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


DASK_SCHEDULER_ENV = "PRECOMPUTE_DASK_SCHEDULER"
NO_WORKERS_TIMEOUT_S = float(os.environ.get("PRECOMPUTE_DASK_NO_WORKERS_TIMEOUT_S", "120"))


def _step_on_dask_worker(recon_job, dagster_run, run_config, step_key, instance_ref, known_state, retry_mode,
                         repository_load_data):
    """Run one step in a Dask worker process; it logs to the run's instance and returns its events (serialized)."""
    from dagster._core.execution.api import create_execution_plan, execute_plan
    from dagster._core.execution.context_creation_job import create_context_free_log_manager
    from dagster._core.events import DagsterEvent
    from distributed import get_worker

    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        address = get_worker().address
        # Dask runs a task again when its worker dies: say so, the first start is in this run's log
        before = [r.dagster_event.event_specific_data.metadata for r in instance.all_logs(
            dagster_run.run_id, of_type=dg.DagsterEventType.STEP_WORKER_STARTED) if r.step_key == step_key]
        again = (" It started before on Dask worker(s) " + ", ".join(
            f"{m['dask_worker'].value} (pid {m['pid'].value})" for m in before if "dask_worker" in m)
            + ", which the cluster lost; the chunks committed there are kept.") if before else ""
        started = DagsterEvent.step_worker_started(
            create_context_free_log_manager(instance, dagster_run), dagster_run.job_name,
            message=f'Executing step "{step_key}" on Dask worker {address} (pid {os.getpid()}).{again}',
            metadata={"dask_worker": address, "pid": str(os.getpid())}, step_key=step_key)
        job = recon_job.get_subset(op_selection=dagster_run.resolved_op_selection)
        plan = create_execution_plan(job, run_config=run_config, step_keys_to_execute=[step_key],
                                     known_state=known_state, repository_load_data=repository_load_data)
        events = [started, *execute_plan(plan, job, instance, dagster_run, run_config=run_config,
                                         retry_mode=retry_mode.for_inner_plan())]
        return dg.serialize_value(events)  # a string: Dask's sizeof fails on a list of events


def _dask_executor_def():
    """dagster-dask's executor with the multiprocess executor's step loop, so that mapped steps run.

    dagster-dask's own executor submits the plan's steps once, level by level: the steps a
    DynamicOut maps (every compute_shard) are not in the plan then, never run, and the run still
    reports success (dagster-io/dagster#9785). This one submits each step to the Dask cluster when
    Dagster's ActiveExecution says it is ready, as the multiprocess executor does with processes,
    so dynamic outputs resolve and op RetryPolicies apply. Same config as dagster-dask's executor
    (cluster: existing / local), plus retries; without a cluster in the run config it connects to
    $PRECOMPUTE_DASK_SCHEDULER. A step whose worker dies is run again by Dask on another worker
    (up to the scheduler's allowed-failures); the store's committed chunks are kept.
    """
    import sys
    import time
    import uuid
    from contextlib import ExitStack

    import distributed
    from dagster._core.events import EngineEventData
    from dagster._core.execution.plan.active import ActiveExecution
    from dagster._core.execution.retries import RetryMode, get_retries_config
    from dagster._utils.error import serializable_error_info_from_exc_info
    from dagster_dask import dask_executor
    from dagster_dask.executor import DaskExecutor

    class ShardDaskExecutor(DaskExecutor):
        def __init__(self, cluster_type, cluster_configuration, retries: RetryMode):
            super().__init__(cluster_type, cluster_configuration)
            self._retries = retries

        @property
        def retries(self):
            return self._retries

        def _client(self, stack: ExitStack, job_name: str) -> distributed.Client:
            if self.cluster_type == "existing":
                return stack.enter_context(distributed.Client(self.cluster_configuration["address"]))
            if self.cluster_type == "local":
                cluster = stack.enter_context(distributed.LocalCluster(**self.build_dict(job_name)))
                return stack.enter_context(distributed.Client(cluster))
            raise dg.DagsterInvariantViolationError(
                f"dask cluster type {self.cluster_type!r}: this executor takes `existing` (a scheduler address; "
                "start the cluster with your own tooling) or `local`")

        def execute(self, plan_context, execution_plan):
            if not plan_context.instance.is_persistent:
                raise dg.DagsterInvariantViolationError(
                    "the Dask executor needs a persistent Dagster instance that the workers reach too: set "
                    "DAGSTER_HOME to a folder with a dagster.yaml (a shared one, or PostgreSQL storage, in a cluster)")
            recon_job = plan_context.reconstructable_job
            instance_ref = plan_context.instance.get_ref()
            futures: dict = {}  # dask future -> step key
            no_workers_since = None
            with ExitStack() as stack:
                client = self._client(stack, plan_context.job_name)
                yield dg.DagsterEvent.engine_event(
                    plan_context, f"Executing steps on the Dask cluster at {client.scheduler.address}",
                    EngineEventData(metadata={"dask_scheduler": client.scheduler.address}))
                active = stack.enter_context(ActiveExecution(execution_plan, retry_mode=self.retries))
                try:
                    while not active.is_complete:
                        if active.check_for_interrupts():
                            active.mark_interrupted()
                            yield dg.DagsterEvent.engine_event(
                                plan_context, f"Interrupted: cancelling the Dask tasks of {sorted(futures.values())}",
                                EngineEventData.interrupted(list(futures.values())))
                            break
                        for step in active.get_steps_to_execute():
                            futures[client.submit(
                                _step_on_dask_worker, recon_job, plan_context.dagster_run, plan_context.run_config,
                                step.key, instance_ref, active.get_known_state(), self.retries,
                                execution_plan.repository_load_data,
                                key=f"{step.key}-{uuid.uuid4().hex[:8]}", pure=False)] = step.key
                        if not futures:
                            time.sleep(max(0.05, min(active.sleep_interval(), 1.0)))
                        else:
                            try:
                                distributed.wait(list(futures), timeout=1, return_when="FIRST_COMPLETED")
                            except TimeoutError:
                                pass
                            if client.scheduler_info(n_workers=1)["workers"]:
                                no_workers_since = None
                            elif no_workers_since is None:
                                no_workers_since = time.monotonic()
                            elif time.monotonic() - no_workers_since > NO_WORKERS_TIMEOUT_S:
                                raise RuntimeError(
                                    f"the Dask cluster at {client.scheduler.address} has had no workers for "
                                    f"{NO_WORKERS_TIMEOUT_S:.0f} s while steps {sorted(futures.values())} wait: "
                                    "start workers (`dask worker <scheduler address>`) or check why they exit")
                        for future in [f for f in futures if f.done()]:
                            key = futures.pop(future)
                            try:
                                events = dg.deserialize_value(future.result(), list)
                            except Exception:  # noqa: BLE001 - the task, not the step, failed: e.g. KilledWorker
                                step_context = plan_context.for_step(active.get_step_by_key(key))
                                error = serializable_error_info_from_exc_info(sys.exc_info())
                                yield dg.DagsterEvent.engine_event(
                                    step_context, f"The Dask task of step {key} failed: {error.message.strip()}",
                                    EngineEventData.engine_error(error))
                                events = [self.log_failure_or_retry_event_after_error(
                                    step_context, error, active.get_known_state())]
                            finally:
                                future.release()  # else Dask recomputes it (reruns the step) if its worker dies
                            for event in events:
                                yield event
                                active.handle_event(event)
                            active.verify_complete(plan_context, key)
                        yield from active.plan_events_iterator(plan_context)
                finally:
                    if futures:
                        client.cancel(list(futures))

    @dg.executor(name="dask", requirements=dg.multiple_process_executor_requirements(),
                 config_schema={"cluster": dg.Field(dask_executor.config_schema.config_type.fields["cluster"].config_type,
                                                    is_required=False,
                                                    description=f"default: existing at ${DASK_SCHEDULER_ENV}"),
                                "retries": get_retries_config()})
    def dask_shard_executor(init_context):
        config = init_context.executor_config
        cluster = config.get("cluster")
        if not cluster:
            address = os.environ.get(DASK_SCHEDULER_ENV, "").strip()
            if not address:
                raise dg.DagsterInvariantViolationError(
                    f"PRECOMPUTE_EXECUTOR=dask needs a Dask scheduler: set {DASK_SCHEDULER_ENV}=tcp://HOST:8786, or "
                    "give execution.config.cluster in the run config (existing: {address: ...} or local: {...})")
            cluster = {"existing": {"address": address}}
        ((cluster_type, cluster_config),) = cluster.items()
        return ShardDaskExecutor(cluster_type, cluster_config, RetryMode.from_config(config["retries"]))

    return dask_shard_executor


def executor_from_env():
    """$PRECOMPUTE_EXECUTOR picks Dagster's own engine: multiprocess (default), k8s, celery or dask.

    The cluster ones need their package installed (dagster-k8s, dagster-celery, dagster-dask);
    they are configured by run config, see deploy/k8s/; dask also by $PRECOMPUTE_DASK_SCHEDULER.
    """
    kind = os.environ.get("PRECOMPUTE_EXECUTOR", "multiprocess")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor
        return k8s_job_executor
    if kind == "celery":
        from dagster_celery import celery_executor
        return celery_executor
    if kind == "dask":
        return _dask_executor_def()
    if kind != "multiprocess":
        raise ValueError(f"PRECOMPUTE_EXECUTOR={kind!r}: use multiprocess, k8s, celery or dask")
    return dg.multiprocess_executor


@dg.job(partitions_def=arch_cut, executor_def=executor_from_env(),
        description="Fill one partition's activation entry in parallel shards; then materialize activations")
def precompute_sharded():
    manifest = scan_manifest()
    summarize_shards(plan_shards().map(lambda shard: compute_shard(shard, manifest)).collect())
