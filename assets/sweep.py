"""head_sweep: many heads on one partition's cache (precompute.sweep), tracked and reusable.

Each configuration is an MLflow child run (its params and per-epoch metrics) under one sweep run,
itself under the pipeline run's parent. Unchanged cache (the activations' view key), grid, batch
size and seed return the earlier sweep, kept beside the cache entry: nothing trains, no run starts.
"""

import tempfile
from pathlib import Path

import dagster as dg

from assets._config import SettingsConfig
from assets._util import LazyModule, png_markdown
from assets.metadata import HeadSweepMetadata
from assets.partitions import arch_and_cut, arch_cut
from precompute.errors import ConfigError
from precompute.settings import SweepSettings
from precompute.versions import SWEEP_CODE_VERSION
from resources import ActivationStoreResource, ComputeDevice, MlflowTracking

rows = LazyModule("precompute.rows")  # torch loads when a step runs, not with the definitions
cache_fill = LazyModule("precompute.stages.cache_fill")
sweep = LazyModule("precompute.sweep")
precompute_tracking = LazyModule("precompute.tracking")  # mlflow, likewise; `tracking` is the resource


class HeadSweepConfig(SettingsConfig, SweepSettings):
    """head_sweep's settings (precompute.settings.SweepSettings): search grid or random."""

    def configs(self) -> "list[sweep.SweepConfig]":
        space = dict(ps=self.ps, xtra_fc=[tuple(x) for x in self.xtra_fc], epochs=self.epochs, wd=self.wd,
                     label_smoothing=self.label_smoothing)
        if self.search == "grid":
            return sweep.grid(lr=self.lr, **space)
        return sweep.random_search(self.n_random, self.seed, lr=(min(self.lr), max(self.lr)), **space)


def _output(summary: dict, fingerprint: str, reused: bool, tracking_uri: str) -> dg.Output:
    import pandas as pd

    table = pd.DataFrame(summary["table"])
    plot = sweep.plot_sweep(table, Path(tempfile.mkdtemp(prefix="head_sweep-")) / "head_sweep.png")
    best = summary["table"][summary["best_index"]]
    metadata = HeadSweepMetadata(
        reused, fingerprint, len(table), summary["best"], float(best["valid_accuracy"]), float(best["valid_loss"]),
        float(summary["seconds"]), summary.get("mlflow_run_id", ""), tracking_uri,
        sweep.markdown_table(table, summary["best_index"]),
        png_markdown(plot, "head sweep: valid accuracy and loss vs lr"))
    return dg.Output(summary, data_version=dg.DataVersion(fingerprint), metadata=metadata.to_metadata())


def _no_retry(call):
    """``call()``; a ConfigError fails the step at once: a retry cannot pass."""
    try:
        return call()
    except ConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc


def _track(context, tracking: MlflowTracking, config: HeadSweepConfig, result, summary: dict, fingerprint: str,
           view_key: str) -> dict:
    """The sweep in MLflow (a run, and a child run per configuration); what the summary keeps of it."""
    arch, xtra_cut = arch_and_cut(context)
    tracker = tracking.tracker()
    tags = tracker.stage_tags(context.run.run_id, context.partition_key, "head_sweep",
                              {"dagster.partition": context.partition_key, "arch": arch})
    params = {"arch": arch, "cut": xtra_cut, "n_configs": len(result.configs), "fingerprint": fingerprint,
              "view_key": view_key, **config.model_dump(exclude={"reuse"})}
    run_id, children = precompute_tracking.log_sweep(
        tracker, f"head_sweep {arch} cut={xtra_cut}", params, tags, result, summary,
        {"seed": config.seed, "batch_size": config.batch_size})
    return {"mlflow_run_id": run_id, "child_run_ids": children, "fingerprint": fingerprint, "view_key": view_key,
            "batch_size": config.batch_size, "seed": config.seed}


@dg.asset(group_name="recipe", partitions_def=arch_cut, code_version=SWEEP_CODE_VERSION,
          tags={"precompute/cacheable": "true"})
def head_sweep(context: dg.AssetExecutionContext, config: HeadSweepConfig, image_manifest, activations,
               store: ActivationStoreResource, tracking: MlflowTracking, compute: ComputeDevice):
    """Many heads on the cached activations in one process (same-shape heads batched together);
    a table, a plot and the best configuration."""
    configs = _no_retry(config.configs)
    compute.setup()
    entry = cache_fill.open_entry(store.get(), activations)
    fingerprint = sweep.sweep_fingerprint(activations.view_key, configs, config.batch_size, config.seed)
    found = sweep.load_sweep(entry, fingerprint) if config.reuse else None
    if found is not None:
        context.log.info(f"head_sweep reused: same activations ({activations.view_key}), grid and seed as "
                         f"MLflow run {found.get('mlflow_run_id')}; nothing trained")
        return _output(found, fingerprint, True, tracking.tracking_uri)
    manifest = rows.without_failed(image_manifest, activations.failed_images)
    result, classes = _no_retry(lambda: sweep.sweep_entry(entry, manifest, configs, config.batch_size, config.seed))
    summary = sweep.summary(result)
    summary.update(**_track(context, tracking, config, result, summary, fingerprint, activations.view_key),
                   classes=classes)
    sweep.save_sweep(entry, fingerprint, summary)
    best = summary["table"][summary["best_index"]]
    context.log.info(f"head_sweep: {len(configs)} configurations in {result.seconds:.1f}s; best config "
                     f"{summary['best_index']} {summary['best']} valid_accuracy {best['valid_accuracy']:.4f}")
    return _output(summary, fingerprint, False, tracking.tracking_uri)


def best_of_sweep(context, activations, store: ActivationStoreResource) -> dict:
    """For head_on_cache's ``from_sweep: true``: the config fields of the best head of this
    partition's latest head_sweep. Its result is kept beside the cache entry (the store resource),
    under the fingerprint its latest materialization shows (``HeadSweepMetadata``)."""
    records = context.instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=head_sweep.key, asset_partitions=[context.partition_key]), limit=1).records
    if not records:
        raise dg.Failure(f"from_sweep: head_sweep has no materialization for partition {context.partition_key}: "
                         "materialize head_sweep first, or set from_sweep: false", allow_retries=False)
    fingerprint = HeadSweepMetadata.from_metadata(records[0].asset_materialization.metadata).fingerprint
    found = sweep.load_sweep(cache_fill.open_entry(store.get(), activations), fingerprint)
    if found is None:
        raise dg.Failure(f"from_sweep: head_sweep's result {fingerprint} is no longer beside the cache entry "
                         "(removed by cache gc?): materialize head_sweep again", allow_retries=False)
    settings = _no_retry(lambda: sweep.head_on_cache_settings(found, activations.view_key))
    context.log.info(f"head_on_cache from_sweep: config {found['best_index']} of head_sweep {fingerprint}: {found['best']}")
    return settings
