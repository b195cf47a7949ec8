"""Data quality from the activation cache: duplicates and train/valid leaks, likely label errors,
outliers and drift of new images, all from the cached vectors (the body never runs).

``data_quality_tables(entry, manifest)`` is the library entry point (the ``data_quality`` asset
and ``Learner.data_quality()`` call it); ``apply_overrides`` (``overrides``) turns a user's CSV
of rows to drop or relabel into a new manifest; ``contact_sheets`` (``sheets``) draws the findings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from precompute.quality.findings import FINDING_COLUMNS, duplicates, drift, outliers, table
from precompute.quality.labels import LabelCheckRefused, label_issues
from precompute.quality.vectors import normalise, pooled_vectors, rows_frame

__all__ = ["FINDING_COLUMNS", "QualityOptions", "QualityReport", "data_quality_tables"]


@dataclass(frozen=True)
class QualityOptions:
    k: int = 10                    # neighbours for duplicates, outliers and drift
    duplicate_z: float = 4.0       # a pair's margin over its neighbourhood, in robust sigmas
    exact_cosine: float = 0.985    # raw cosine at or above which a pair is a duplicate whatever its margin
    outlier_z: float = 4.0         # k-NN distance in robust sigmas above the median image's
    folds: int = 5                 # label heads (K-fold)
    seed: int = 0
    drift_percentile: float = 95.0 # new images at or above this percentile of the reference's k-NN distances


@dataclass
class QualityReport:
    findings: pd.DataFrame                      # FINDING_COLUMNS: one row per finding (pairs: one row)
    summary: dict = field(default_factory=dict)
    seen_ids: list = field(default_factory=list)  # the image ids checked: the next run's drift reference

    def of(self, kind: str) -> pd.DataFrame:
        return self.findings[self.findings["finding"] == kind].reset_index(drop=True)


def data_quality_tables(entry, manifest: pd.DataFrame, previous_ids=None, options: QualityOptions | None = None,
                        reference: str = "seen by the last data_quality run", log=None) -> QualityReport:
    """Every finding for the manifest's ok rows, from the cache ``entry`` (rows of the images that
    failed at precompute must be marked ``failed`` first: ``precompute.rows.without_failed``).
    ``previous_ids``: the image ids the last check saw (None: no drift reference yet)."""
    from precompute.labels import is_multilabel

    o = options or QualityOptions()
    rows = rows_frame(manifest)
    x = pooled_vectors(entry, list(rows["image_id"]))
    zc, zraw = normalise(x), normalise(x, center=False)
    dup, s_dup = duplicates(rows, zc, zraw, o.k, o.duplicate_z, o.exact_cosine)
    out, s_out = outliers(rows, zraw, o.k, o.outlier_z)  # raw: centring makes weak images alike
    drf, s_drf = drift(rows, zraw, previous_ids, reference, o.k, o.drift_percentile)
    try:
        lab, s_lab = label_issues(rows, x, is_multilabel(manifest), o.folds, o.seed)
    except LabelCheckRefused as exc:
        lab, s_lab = table([]), {"label_issues": 0, "label_issue_rate": 0.0, "labels_refused": str(exc)}
        if log is not None:
            log.warning(str(exc))
    frames = [f for f in (dup, lab, out, drf) if len(f)]
    findings = pd.concat(frames, ignore_index=True) if frames else table([])
    summary = {"images": len(rows), "knn": "faiss IndexFlatIP (exact cosine)", **s_dup, **s_lab, **s_out, **s_drf}
    return QualityReport(findings, summary, sorted(set(rows["image_id"])))
