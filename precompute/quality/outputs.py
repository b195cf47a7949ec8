"""What a data-quality check leaves for a person: its files in one folder (the findings CSV, the image
ids it saw, a contact sheet per finding kind, the overrides applied) and the counts read first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from precompute.quality import QualityReport
from precompute.quality.overrides import applied_overrides
from precompute.quality.sheets import contact_sheets

TABLE_COLUMNS = ["finding", "score", "relpath", "label", "suggested_label", "other_relpath", "note"]


@dataclass
class QualityOutputs:
    csv: Path                   # data_quality.csv: every finding (copy rows to the overrides CSV to act)
    seen_ids: Path              # the image ids checked: the next check's drift reference
    sheets: dict[str, Path]     # finding kind -> contact sheet (PNG)
    overrides: pd.DataFrame     # the user's overrides the manifest had applied
    overrides_csv: Path | None  # the same as a file, when there are any
    counts: dict[str, int]      # leaks, duplicates, label_issues, outliers, drifted, overrides_applied

    @property
    def files(self) -> list[Path]:
        """What goes to the tracking run as artifacts."""
        return [self.csv, *self.sheets.values(), *([self.overrides_csv] if self.overrides_csv else [])]


def write_outputs(report: QualityReport, manifest: pd.DataFrame, folder: Path, top: int = 12) -> QualityOutputs:
    """The report's files in ``folder`` (created), ``top`` findings per kind on each contact sheet."""
    folder.mkdir(parents=True, exist_ok=True)
    csv, seen = folder / "data_quality.csv", folder / "seen_ids.txt"
    report.findings.to_csv(csv, index=False)
    seen.write_text("\n".join(report.seen_ids))
    sheets = contact_sheets(report.findings, manifest, folder, top)
    overrides = applied_overrides(manifest)
    overrides_csv = folder / "overrides_applied.csv" if len(overrides) else None
    if overrides_csv:
        overrides.to_csv(overrides_csv, index=False)
    s = report.summary
    counts = {"leaks": s["leaks"], "duplicates": s["pairs"] - s["leaks"], "label_issues": s["label_issues"],
              "outliers": s["outliers"], "drifted": int((report.findings["finding"] == "drift").sum()),
              "overrides_applied": len(overrides)}
    return QualityOutputs(csv, seen, sheets, overrides, overrides_csv, counts)


def tracked_metrics(report: QualityReport, outputs: QualityOutputs) -> dict[str, float]:
    """The numbers a tracking run logs: the counts, the label issue rate and the drift measures."""
    s = report.summary
    return {**outputs.counts, "label_issue_rate": s["label_issue_rate"],
            **{k: s[k] for k in ("drift_median_percentile", "drift_domain_auc") if k in s}}


def markdown(frame: pd.DataFrame, columns: list[str] | None = None, rows: int | None = 20) -> str:
    """A table's first ``rows`` (None: all) as Markdown (only ``columns``), or "none"."""
    if not len(frame):
        return "none"
    frame = frame[columns] if columns else frame
    return (frame.head(rows) if rows else frame).to_markdown(index=False)
