"""data_quality: duplicates, train/valid leaks, likely label errors, outliers and drift of new
images, from the activations already cached (the body never runs). Heavy imports stay inside
the function, so loading the definitions stays light.

Where a person sees it: counts and the top findings in the Dagster metadata, one contact sheet
per finding kind (shown inline), the same plus data_quality.csv in MLflow, and two checks:
no_train_valid_leaks (WARN, or ERROR with ``leak_severity: ERROR``) and label_issue_rate (WARN
above ``max_label_issue_rate``). Acting on it: copy rows of data_quality.csv to the overrides CSV
(precompute/quality/overrides.py) with action drop or relabel; image_manifest applies it.
"""

from pathlib import Path
from typing import Optional

import dagster as dg

from assets.partitions import arch_and_cut, arch_cut
from resources import ActivationStoreResource, MlflowTracking, project_home

CHECKS = {
    "no_train_valid_leaks": "no image of the validation split is a near-copy of a training image",
    "label_issue_rate": "the share of likely label errors is at most the configured rate",
}
TABLE_COLUMNS = ["finding", "score", "relpath", "label", "suggested_label", "other_relpath", "note"]


class DataQualityConfig(dg.Config):
    k: int = 10                          # neighbours for duplicates, outliers and drift
    duplicate_z: float = 4.0             # a pair's similarity margin over its neighbourhood, robust sigmas
    exact_cosine: float = 0.985          # raw cosine at or above which a pair is a duplicate anyway
    outlier_z: float = 4.0               # k-NN distance, robust sigmas above the median image
    folds: int = 5                       # label heads (K-fold, stratified, seeded)
    seed: int = 0
    drift_percentile: float = 95.0       # new images at/above this percentile of the reference's k-NN distance
    top: int = 12                        # findings per kind on a contact sheet
    leak_severity: str = "WARN"          # no_train_valid_leaks: WARN or ERROR
    max_label_issue_rate: float = 0.05   # label_issue_rate warns above this share of checked labels

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
    meta = records[0].asset_materialization.metadata
    seen = meta.get("seen_ids_path")
    path = Path(str(seen.value)) if seen is not None else None
    if path is None or not path.is_file():
        context.log.warning(f"the last data_quality run's image list ({path}) is gone: no drift reference this time")
        return None, ""
    return path.read_text().split(), f"seen by data_quality run {records[0].run_id[:8]}"


def _severity(name: str):
    try:
        return dg.AssetCheckSeverity(name.upper())
    except ValueError:
        raise dg.Failure(f"leak_severity={name!r}: use WARN or ERROR", allow_retries=False) from None


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags={"precompute/cacheable": "false"},
          check_specs=[dg.AssetCheckSpec(name, asset="data_quality", description=d) for name, d in CHECKS.items()])
def data_quality(context: dg.AssetExecutionContext, config: DataQualityConfig, image_manifest, activations,
                 store: ActivationStoreResource, tracking: MlflowTracking):
    """Duplicates and train/valid leaks, likely label errors, outliers and drift, from the cache."""
    from assets._util import as_metadata, png_markdown
    from assets.training import _mlflow_run
    from precompute.quality import data_quality_tables
    from precompute.quality.overrides import applied_overrides
    from precompute.quality.sheets import contact_sheets
    from precompute.records import ActivationsRef
    from precompute.rows import without_failed
    from precompute.stages.cache_fill import open_entry

    severity = _severity(config.leak_severity)
    arch, xtra_cut = arch_and_cut(context)
    ref = ActivationsRef.coerce(activations)
    manifest = without_failed(image_manifest, ref.failed_images)
    previous, reference = _previous(context)
    report = data_quality_tables(open_entry(store.get(), ref), manifest, previous, config.options(),
                                 reference, context.log)
    folder = project_home() / "data_quality" / arch / f"cut={xtra_cut}" / context.run.run_id
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / "data_quality.csv"
    report.findings.to_csv(csv, index=False)
    (folder / "seen_ids.txt").write_text("\n".join(report.seen_ids))
    sheets = contact_sheets(report.findings, manifest, folder, config.top)
    overrides = applied_overrides(manifest)
    if len(overrides):
        overrides.to_csv(folder / "overrides_applied.csv", index=False)
    s = report.summary
    counts = {"leaks": s["leaks"], "duplicates": s["pairs"] - s["leaks"], "label_issues": s["label_issues"],
              "outliers": s["outliers"], "drifted": int((report.findings["finding"] == "drift").sum()),
              "overrides_applied": len(overrides)}
    with _mlflow_run(context, tracking, "data_quality", config.model_dump(), manifest) as run:
        run.metrics({**counts, "label_issue_rate": s["label_issue_rate"],
                     **{k: s[k] for k in ("drift_median_percentile", "drift_domain_auc") if k in s}})
        run.json(s, "data_quality_summary.json")
        for path in [csv, *sheets.values(), *([folder / "overrides_applied.csv"] if len(overrides) else [])]:
            run.artifact(path, "data_quality")
    context.log.info(f"data_quality: {counts}; {csv}; MLflow run {run.run_id}")
    top = report.findings[TABLE_COLUMNS].head(20)
    metadata = {**counts, "images": s["images"], "label_issue_rate": s["label_issue_rate"],
                "summary": s, "csv": dg.MetadataValue.path(str(csv)),
                "seen_ids_path": dg.MetadataValue.path(str(folder / "seen_ids.txt")),
                "top_findings": dg.MetadataValue.md(top.to_markdown(index=False) if len(top) else "none"),
                "overrides": dg.MetadataValue.md(overrides.to_markdown(index=False) if len(overrides) else "none"),
                "mlflow_run_id": run.run_id,
                **{f"sheet_{kind}": dg.MetadataValue.md(png_markdown(p, kind)) for kind, p in sheets.items()}}
    yield dg.Output({"summary": s, "csv": str(csv), "sheets": {k: str(p) for k, p in sheets.items()},
                     "mlflow_run_id": run.run_id}, metadata=as_metadata(metadata))
    leaks = report.of("leak")
    yield dg.AssetCheckResult(
        check_name="no_train_valid_leaks", passed=len(leaks) == 0, severity=severity,
        metadata={"leaks": len(leaks), "pairs": dg.MetadataValue.md(
            leaks[["relpath", "other_relpath", "similarity"]].head(20).to_markdown(index=False) if len(leaks) else "none")})
    refused = s.get("labels_refused")
    yield dg.AssetCheckResult(
        check_name="label_issue_rate", passed=bool(refused) or s["label_issue_rate"] <= config.max_label_issue_rate,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"label_issue_rate": s["label_issue_rate"], "max_label_issue_rate": config.max_label_issue_rate,
                  "label_issues": s["label_issues"], **({"not_checked": refused} if refused else {})})
