"""data_quality: duplicates, train/valid leaks, likely label errors, outliers and drift of new
images, from the activations already cached (the body never runs). The library loads when the step
runs (``LazyModule``), so loading the definitions stays light.

Where a person sees it: counts and the top findings in the Dagster metadata, one contact sheet
per finding kind (shown inline), the same plus data_quality.csv in MLflow, and two checks:
no_train_valid_leaks (WARN, or ERROR with ``leak_severity: ERROR``) and label_issue_rate (WARN
above ``max_label_issue_rate``). Acting on it: copy rows of data_quality.csv to the overrides CSV
(precompute/quality/overrides.py) with action drop or relabel; image_manifest applies it.
"""

from pathlib import Path
from typing import Optional

import dagster as dg

from assets._config import SettingsConfig
from assets._util import LazyModule, png_markdown
from assets.metadata import DataQualityMetadata
from assets.partitions import arch_and_cut, arch_cut
from precompute.settings import QualitySettings
from resources import ActivationStoreResource, MlflowTracking, project_home

# numpy, pandas, faiss and torch load when the step runs, not with the definitions
quality = LazyModule("precompute.quality")
outputs = LazyModule("precompute.quality.outputs")
rows = LazyModule("precompute.rows")
cache_fill = LazyModule("precompute.stages.cache_fill")

CHECKS = {
    "no_train_valid_leaks": "no image of the validation split is a near-copy of a training image",
    "label_issue_rate": "the share of likely label errors is at most the configured rate",
}


class DataQualityConfig(SettingsConfig, QualitySettings):
    """data_quality's settings (precompute.settings.QualitySettings)."""

    def options(self):
        from precompute.quality import QualityOptions

        return QualityOptions(self.k, self.duplicate_z, self.exact_cosine, self.outlier_z, self.folds, self.seed,
                              self.drift_percentile)


def _previous(context) -> tuple[Optional[list], str]:
    """The image ids the last data_quality materialization of this partition saw, and its name."""
    records = context.instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=context.asset_key, asset_partitions=[context.partition_key]), limit=1).records
    if not records:
        return None, ""
    seen = DataQualityMetadata.from_metadata(records[0].asset_materialization.metadata).seen_ids_path
    path = Path(seen) if seen else None
    if path is None or not path.is_file():
        context.log.warning(f"the last data_quality run's image list ({path}) is gone: no drift reference this time")
        return None, ""
    return path.read_text().split(), f"seen by data_quality run {records[0].run_id[:8]}"


def _severity(name: str):
    try:
        return dg.AssetCheckSeverity(name.upper())
    except ValueError:
        raise dg.Failure(f"leak_severity={name!r}: use WARN or ERROR", allow_retries=False) from None


def _metadata(report, out, run_id: str) -> DataQualityMetadata:
    s = report.summary
    return DataQualityMetadata(
        **out.counts, images=s["images"], label_issue_rate=s["label_issue_rate"], summary=s, csv=str(out.csv),
        seen_ids_path=str(out.seen_ids), top_findings=outputs.markdown(report.findings, outputs.TABLE_COLUMNS),
        overrides=outputs.markdown(out.overrides, rows=None), mlflow_run_id=run_id,
        sheets={kind: png_markdown(p, kind) for kind, p in out.sheets.items()})


def _checks(report, severity, max_label_issue_rate: float):
    """The two checks' results: no_train_valid_leaks and label_issue_rate."""
    s, leaks = report.summary, report.of("leak")
    yield dg.AssetCheckResult(
        check_name="no_train_valid_leaks", passed=len(leaks) == 0, severity=severity,
        metadata={"leaks": len(leaks), "pairs": dg.MetadataValue.md(
            outputs.markdown(leaks, ["relpath", "other_relpath", "similarity"]))})
    refused = s.get("labels_refused")
    yield dg.AssetCheckResult(
        check_name="label_issue_rate", passed=bool(refused) or s["label_issue_rate"] <= max_label_issue_rate,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"label_issue_rate": s["label_issue_rate"], "max_label_issue_rate": max_label_issue_rate,
                  "label_issues": s["label_issues"], **({"not_checked": refused} if refused else {})})


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags={"precompute/cacheable": "false"},
          check_specs=[dg.AssetCheckSpec(name, asset="data_quality", description=d) for name, d in CHECKS.items()])
def data_quality(context: dg.AssetExecutionContext, config: DataQualityConfig, image_manifest, activations,
                 store: ActivationStoreResource, tracking: MlflowTracking):
    """Duplicates and train/valid leaks, likely label errors, outliers and drift, from the cache."""
    severity = _severity(config.leak_severity)
    arch, xtra_cut = arch_and_cut(context)
    manifest = rows.without_failed(image_manifest, activations.failed_images)
    previous, reference = _previous(context)
    report = quality.data_quality_tables(cache_fill.open_entry(store.get(), activations), manifest, previous,
                                         config.options(), reference, context.log)
    folder = project_home() / "data_quality" / arch / f"cut={xtra_cut}" / context.run.run_id
    out = outputs.write_outputs(report, manifest, folder, config.top)
    with tracking.open_run(context, "data_quality", config.model_dump(), arch, xtra_cut, manifest,
                           activations.view_key) as run:
        run.metrics(outputs.tracked_metrics(report, out))
        run.json(report.summary, "data_quality_summary.json")
        for path in out.files:
            run.artifact(path, "data_quality")
    context.log.info(f"data_quality: {out.counts}; {out.csv}; MLflow run {run.run_id}")
    yield dg.Output({"summary": report.summary, "csv": str(out.csv), "sheets": {k: str(p) for k, p in out.sheets.items()},
                     "mlflow_run_id": run.run_id}, metadata=_metadata(report, out, run.run_id).to_metadata())
    yield from _checks(report, severity, config.max_label_issue_rate)
