"""arch_leaderboard: every evaluated arch x cut partition side by side (precompute.leaderboard).

The numbers come from the Dagster instance's materialization metadata, not from the report files or
the IO manager: metadata lives in the instance's event log (SQLite here, PostgreSQL in production),
so it is there wherever a step ran, for any IO manager, and for any subset of partitions. An input
with AllPartitionMapping would fail until every partition is materialized; the reports folder is
local to the machine that wrote it. Per partition it takes the latest evaluation_report, and the
activations, head_on_cache and head_sweep materializations at or before that report.
"""

import tempfile
from pathlib import Path

import dagster as dg

from assets._util import LazyModule, png_markdown
from assets.evaluation import evaluation_report
from assets.metadata import (ActivationsMetadata, AssetMetadata, EvaluationMetadata, HeadSweepMetadata,
                             LeaderboardMetadata, StageMetadata)
from assets.partitions import arch_cut
from resources import MlflowTracking

leaderboard = LazyModule("precompute.leaderboard")  # pandas and matplotlib load when the step runs

ACTIVATIONS, HEAD, SWEEP = dg.AssetKey("activations"), dg.AssetKey("head_on_cache"), dg.AssetKey("head_sweep")


def _latest(instance, key: dg.AssetKey, partition: str, before: int | None, kind: type[AssetMetadata], limit: int = 1):
    """The metadata of the latest ``limit`` materializations of ``key`` in ``partition`` (before the
    storage id ``before``), newest first, as the asset's metadata type."""
    flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition], before_storage_id=before)
    return [kind.from_metadata(r.asset_materialization.metadata)
            for r in instance.fetch_materializations(flt, limit=limit).records]


def _precompute_speed(instance, partition: str, before: int) -> tuple[float | None, int | None]:
    """(img/s, bytes on disk) of the partition's cache entry: the size from the latest activations
    materialization, the speed from the latest one of the same entry that computed rows (a rerun that
    reused every row says 0 img/s, which is no speed at all)."""
    found = _latest(instance, ACTIVATIONS, partition, before, ActivationsMetadata, limit=50)
    if not found:
        return None, None
    speed = next((m.images_per_s for m in found if m.entry_key == found[0].entry_key and (m.computed or 0) > 0), None)
    return speed, found[0].bytes_on_disk


def _head_epoch_seconds(client, instance, partition: str, before: int, log) -> float | None:
    """Mean seconds per epoch of the head_on_cache run (MLflow's per-epoch ``seconds`` metric)."""
    found = _latest(instance, HEAD, partition, before, StageMetadata)
    run_id = found[0].mlflow_run_id if found else None
    if not run_id:
        return None
    try:
        history = client.get_metric_history(run_id, "seconds")
    except Exception as exc:  # noqa: BLE001 - a missing or unreachable run costs one column, not the board
        log.warning(f"head_on_cache MLflow run {run_id} of {partition}: no epoch seconds ({exc})")
        return None
    return sum(m.value for m in history) / len(history) if history else None


def gather(instance, client, log) -> list[dict]:
    """One plain dict per partition with an evaluation report (see precompute.leaderboard)."""
    out = []
    for partition in sorted(instance.get_materialized_partitions(evaluation_report.key)):
        records = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=evaluation_report.key, asset_partitions=[partition]), limit=1).records
        if not records:
            continue
        report, at = EvaluationMetadata.from_metadata(records[0].asset_materialization.metadata), records[0].storage_id + 1
        keys = arch_cut.get_partition_key_from_str(partition).keys_by_dimension
        speed, cache_bytes = _precompute_speed(instance, partition, at)
        sweep = _latest(instance, SWEEP, partition, at, HeadSweepMetadata)
        out.append({
            "arch": keys["arch"], "cut": int(keys["cut"]),
            # "(on cache)": the cached head scored on the cache, the same number as head_on_cache's
            "accuracy": {k: v for k, v in report.accuracy.items() if "(on cache)" not in k},
            "tta_accuracy": report.tta_accuracy, "images_per_s": speed, "cache_bytes": cache_bytes,
            "head_epoch_s": _head_epoch_seconds(client, instance, partition, at, log),
            "sweep_best_accuracy": sweep[0].best_valid_accuracy if sweep else None,
            "report": report.report_path, "mlflow_run_id": report.mlflow_run_id,
        })
    return out


def _write(df, folder: Path) -> tuple[str, Path]:
    """The board as leaderboard.md, .csv and .png in ``folder``: (its Markdown, the plot)."""
    md = leaderboard.markdown(df)
    plot = leaderboard.plot(df, folder / "leaderboard.png")
    (folder / "leaderboard.md").write_text(md + "\n")
    df.to_csv(folder / "leaderboard.csv", index=False)
    return md, plot


@dg.asset(group_name="recipe", deps=[evaluation_report], tags={"precompute/cacheable": "false"})
def arch_leaderboard(context: dg.AssetExecutionContext, tracking: MlflowTracking):
    """Every evaluated arch x cut: each stage's accuracy beside precompute img/s, cache size and head
    epoch seconds; a plot of accuracy against cost. Also an MLflow run with the table and the plot."""
    tracker = tracking.tracker()
    partitions = gather(context.instance, tracker.client, context.log)
    df = leaderboard.table(partitions)
    folder = Path(tempfile.mkdtemp(prefix="leaderboard-"))
    md, plot = _write(df, folder)
    top = leaderboard.best(df)
    with tracker.run("arch_leaderboard", {"partitions": len(df)},
                     tracker.stage_tags(context.run.run_id, "", "arch_leaderboard")) as run:
        for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.png"):
            run.artifact(folder / name, "leaderboard")
        if top:
            run.params({"best.arch": top["arch"], "best.cut": top["cut"]})
    context.log.info(f"arch_leaderboard: {len(df)} partition(s); MLflow run {run.run_id}")
    metadata = LeaderboardMetadata(len(df), run.run_id, tracking.tracking_uri,
                                   {k: top[k] for k in ("arch", "cut")} if top else {}, md,
                                   png_markdown(plot, "accuracy against cost"))
    return dg.Output(partitions, metadata=metadata.to_metadata())
