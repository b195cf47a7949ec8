"""head_sweep: many heads on one partition's cache (precompute.sweep), tracked and reusable.

Each configuration is an MLflow child run (its params and per-epoch metrics) under one sweep run,
itself under the pipeline run's parent. Unchanged cache (the activations' view key), grid, batch
size and seed return the earlier sweep, kept beside the cache entry: nothing trains, no run starts.
"""

import tempfile
from pathlib import Path
from typing import Optional

import dagster as dg

from assets._util import LazyModule, png_markdown
from assets.partitions import arch_and_cut, arch_cut
from precompute.errors import ConfigError
from precompute.versions import SWEEP_CODE_VERSION
from resources import ActivationStoreResource, ComputeDevice, MlflowTracking

records_module = LazyModule("precompute.records")  # torch loads when a step runs, not with the definitions
rows = LazyModule("precompute.rows")
cache_fill = LazyModule("precompute.stages.cache_fill")
sweep = LazyModule("precompute.sweep")
labels = LazyModule("precompute.labels")  # pandas, likewise


class HeadSweepConfig(dg.Config):
    search: str = "grid"                              # grid | random
    lr: list[float] = [1e-3, 3e-3, 1e-2]              # grid values; random: [lo, hi], log-uniform
    ps: list[Optional[float]] = [None, 0.5]           # dropout per block; None: fastai's 0.25 ... 0.5
    xtra_fc: list[list[int]] = [[512]]                # hidden layer sizes
    epochs: list[int] = [3]
    wd: list[float] = [1e-2]
    label_smoothing: list[float] = [0.0]
    n_random: int = 20                                # configurations drawn when search = random
    batch_size: int = 64
    seed: int = 0
    reuse: bool = True                                # same cache, grid and seed: the earlier sweep

    def configs(self) -> "list[sweep.HeadConfig]":
        space = dict(ps=self.ps, xtra_fc=[tuple(x) for x in self.xtra_fc], epochs=self.epochs, wd=self.wd,
                     label_smoothing=self.label_smoothing)
        if self.search == "grid":
            return sweep.grid(lr=self.lr, **space)
        if self.search == "random":
            if len(self.lr) != 2:
                raise ConfigError("search: random takes lr as a range [lo, hi]")
            return sweep.random_search(self.n_random, self.seed, lr=(min(self.lr), max(self.lr)), **space)
        raise ConfigError(f"search {self.search!r}: choose grid or random")


def _metadata(summary: dict, fingerprint: str, reused: bool, tracking_uri: str) -> dict:
    import pandas as pd

    table = pd.DataFrame(summary["table"])
    plot = sweep.plot_sweep(table, Path(tempfile.mkdtemp(prefix="head_sweep-")) / "head_sweep.png")
    best = summary["table"][summary["best_index"]]
    return {"reused": reused, "fingerprint": fingerprint, "n_configs": len(table),
            "best_config": dg.MetadataValue.json(summary["best"]),
            "best_valid_accuracy": float(best["valid_accuracy"]), "best_valid_loss": float(best["valid_loss"]),
            "sweep_seconds": float(summary["seconds"]), "mlflow_run_id": summary.get("mlflow_run_id", ""),
            "mlflow_tracking_uri": tracking_uri,
            "table": dg.MetadataValue.md(sweep.markdown_table(table, summary["best_index"])),
            "plot": dg.MetadataValue.md(png_markdown(plot, "head sweep: valid accuracy and loss vs lr"))}


@dg.asset(group_name="recipe", partitions_def=arch_cut, code_version=SWEEP_CODE_VERSION,
          tags={"precompute/cacheable": "true"})
def head_sweep(context: dg.AssetExecutionContext, config: HeadSweepConfig, image_manifest, activations,
               store: ActivationStoreResource, tracking: MlflowTracking, compute: ComputeDevice):
    """Many heads on the cached activations in one process (same-shape heads batched together);
    a table, a plot and the best configuration."""
    activations = records_module.ActivationsRef.coerce(activations)
    image_manifest = rows.without_failed(image_manifest, activations.failed_images)
    try:
        configs = config.configs()
    except ConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    compute.setup()
    entry = cache_fill.open_entry(store.get(), activations)
    fingerprint = sweep.sweep_fingerprint(activations.view_key, configs, config.batch_size, config.seed)
    found = sweep.load_sweep(entry, fingerprint) if config.reuse else None
    if found is not None:
        context.log.info(f"head_sweep reused: same activations ({activations.view_key}), grid and seed as "
                         f"MLflow run {found.get('mlflow_run_id')}; nothing trained")
        return dg.Output(found, data_version=dg.DataVersion(fingerprint),
                         metadata=_metadata(found, fingerprint, True, tracking.tracking_uri))
    from precompute.task import Task

    task = Task.from_manifest(image_manifest)  # one class per image, or several labels: the sweep trains either
    classes = list(task.classes)
    train = rows.cached_rows(entry, image_manifest, task, "train", rows.DEFAULT_MEMORY_BUDGET)
    valid = rows.cached_rows(entry, image_manifest, task, "valid", rows.DEFAULT_MEMORY_BUDGET)
    try:
        result = sweep.head_sweep(train, valid, len(classes), configs, config.batch_size, config.seed, task=task)
    except ConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    summary = sweep.summary(result)
    arch, xtra_cut = arch_and_cut(context)
    tracker = tracking.tracker()
    tags = tracker.stage_tags(context.run.run_id, context.partition_key, "head_sweep",
                              {"dagster.partition": context.partition_key, "arch": arch})
    params = {"arch": arch, "cut": xtra_cut, "n_configs": len(configs), "fingerprint": fingerprint,
              "view_key": activations.view_key, **config.model_dump(exclude={"reuse"})}
    with tracker.run(f"head_sweep {arch} cut={xtra_cut}", params, tags) as parent:
        children = []
        for i, (cfg, history) in enumerate(zip(configs, result.histories)):
            child_tags = {**tags, "stage": "head_sweep.config", "mlflow.parentRunId": parent.run_id}
            with tracker.run(f"head_sweep config {i}", {"config": i, **cfg.as_dict(), "seed": config.seed,
                                                        "batch_size": config.batch_size}, child_tags) as child:
                child.history(history)
            children.append(child.run_id)
        best = summary["table"][summary["best_index"]]
        parent.metrics({"best_valid_accuracy": best["valid_accuracy"], "best_valid_loss": best["valid_loss"],
                        "best_config": summary["best_index"], "seconds": result.seconds})
        parent.json(summary["table"], "sweep_table.json")
        parent.params({f"best.{k}": v for k, v in summary["best"].items()})
    summary.update(mlflow_run_id=parent.run_id, child_run_ids=children, fingerprint=fingerprint,
                   view_key=activations.view_key, classes=list(classes), batch_size=config.batch_size,
                   seed=config.seed)
    sweep.save_sweep(entry, fingerprint, summary)
    context.log.info(f"head_sweep: {len(configs)} configurations in {result.seconds:.1f}s; best config "
                     f"{summary['best_index']} {summary['best']} valid_accuracy {best['valid_accuracy']:.4f}")
    return dg.Output(summary, data_version=dg.DataVersion(fingerprint),
                     metadata=_metadata(summary, fingerprint, False, tracking.tracking_uri))


def best_of_sweep(context, activations, store: ActivationStoreResource) -> dict:
    """For head_on_cache's ``from_sweep: true``: the config fields of the best head of this
    partition's latest head_sweep (its result is kept beside the cache entry)."""
    records = context.instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=head_sweep.key, asset_partitions=[context.partition_key]), limit=1).records
    if not records:
        raise dg.Failure(f"from_sweep: head_sweep has no materialization for partition {context.partition_key}: "
                         "materialize head_sweep first, or set from_sweep: false", allow_retries=False)
    fingerprint = str(records[0].asset_materialization.metadata["fingerprint"].value)
    activations = records_module.ActivationsRef.coerce(activations)
    found = sweep.load_sweep(cache_fill.open_entry(store.get(), activations), fingerprint)
    try:
        if found is None:
            raise ConfigError(f"from_sweep: head_sweep's result {fingerprint} is no longer beside the cache entry "
                              "(removed by cache gc?): materialize head_sweep again")
        settings = sweep.head_on_cache_settings(found, activations.view_key)
    except ConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    context.log.info(f"head_on_cache from_sweep: config {found['best_index']} of head_sweep {fingerprint}: {found['best']}")
    return settings
