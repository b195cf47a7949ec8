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
from assets.partitions import arch_cut
from resources import MlflowTracking

leaderboard = LazyModule("precompute.leaderboard")  # pandas and matplotlib load when the step runs

ACTIVATIONS, HEAD, SWEEP = dg.AssetKey("activations"), dg.AssetKey("head_on_cache"), dg.AssetKey("head_sweep")


def _plain(metadata: dict) -> dict:
    return {k: getattr(v, "value", v) for k, v in metadata.items()}


def _records(instance, key: dg.AssetKey, partition: str, before: int | None = None, limit: int = 1):
    flt = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition], before_storage_id=before)
    return instance.fetch_materializations(flt, limit=limit).records


def _precompute_speed(instance, partition: str, before: int) -> tuple[float | None, int | None]:
    """(img/s, bytes on disk) of the partition's cache entry: the size from the latest activations
    materialization, the speed from the latest one of the same entry that computed rows (a rerun that
    reused every row says 0 img/s, which is no speed at all)."""
    records = _records(instance, ACTIVATIONS, partition, before, limit=50)
    if not records:
        return None, None
    latest = _plain(records[0].asset_materialization.metadata)
    speed = next((m.get("images_per_s") for m in (_plain(r.asset_materialization.metadata) for r in records)
                  if m.get("entry_key") == latest.get("entry_key") and (m.get("computed") or 0) > 0), None)
    return speed, latest.get("bytes_on_disk")


def _head_epoch_seconds(client, instance, partition: str, before: int, log) -> float | None:
    """Mean seconds per epoch of the head_on_cache run (MLflow's per-epoch ``seconds`` metric)."""
    records = _records(instance, HEAD, partition, before)
    run_id = _plain(records[0].asset_materialization.metadata).get("mlflow_run_id") if records else None
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
        records = _records(instance, evaluation_report.key, partition)
        if not records:
            continue
        report, at = _plain(records[0].asset_materialization.metadata), records[0].storage_id + 1
        keys = arch_cut.get_partition_key_from_str(partition).keys_by_dimension
        speed, cache_bytes = _precompute_speed(instance, partition, at)
        sweep = _records(instance, SWEEP, partition, at)
        out.append({
            "arch": keys["arch"], "cut": int(keys["cut"]),
            "accuracy": {k.removesuffix("_accuracy"): v for k, v in report.items()  # "(on cache)": the same number
                         if k.endswith("_accuracy") and not k.endswith("_tta_accuracy") and "(on cache)" not in k},
            "tta_accuracy": {k.removesuffix("_tta_accuracy"): v for k, v in report.items() if k.endswith("_tta_accuracy")},
            "images_per_s": speed, "cache_bytes": cache_bytes,
            "head_epoch_s": _head_epoch_seconds(client, instance, partition, at, log),
            "sweep_best_accuracy": (_plain(sweep[0].asset_materialization.metadata).get("best_valid_accuracy")
                                    if sweep else None),
            "report": report.get("report_path", ""), "mlflow_run_id": report.get("mlflow_run_id", ""),
        })
    return out


@dg.asset(group_name="recipe", deps=[evaluation_report], tags={"precompute/cacheable": "false"})
def arch_leaderboard(context: dg.AssetExecutionContext, tracking: MlflowTracking):
    """Every evaluated arch x cut: each stage's accuracy beside precompute img/s, cache size and head
    epoch seconds; a plot of accuracy against cost. Also an MLflow run with the table and the plot."""
    tracker = tracking.tracker()
    partitions = gather(context.instance, tracker.client, context.log)
    df = leaderboard.table(partitions)
    md = leaderboard.markdown(df)
    folder = Path(tempfile.mkdtemp(prefix="leaderboard-"))
    plot = leaderboard.plot(df, folder / "leaderboard.png")
    (folder / "leaderboard.md").write_text(md + "\n")
    df.to_csv(folder / "leaderboard.csv", index=False)
    top = leaderboard.best(df)
    tags = tracker.stage_tags(context.run.run_id, "", "arch_leaderboard")
    with tracker.run("arch_leaderboard", {"partitions": len(df)}, tags) as run:
        for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.png"):
            run.artifact(folder / name, "leaderboard")
        if top:
            run.params({"best.arch": top["arch"], "best.cut": top["cut"]})
    context.log.info(f"arch_leaderboard: {len(df)} partition(s); MLflow run {run.run_id}")
    return dg.Output(partitions, metadata={
        "partitions": len(df), "mlflow_run_id": run.run_id, "mlflow_tracking_uri": tracking.tracking_uri,
        "best": dg.MetadataValue.json({k: top[k] for k in ("arch", "cut")} if top else {}),
        "table": dg.MetadataValue.md(md),
        "plot": dg.MetadataValue.md(png_markdown(plot, "accuracy against cost")),
    })
