"""One metadata type per asset: what its materialization shows in the Dagster UI, typed.

The producing asset builds one and returns ``to_metadata()``; whoever reads a materialization back
(``head_on_cache``'s ``from_sweep``, ``arch_leaderboard``, ``data_quality``'s drift reference) calls
``from_metadata()`` and reads fields, never keys by name. The keys are the field names (the README
and the UI show them); a field's ``kind`` says how the UI renders it (Markdown, a path, JSON). A
field missing from an older materialization reads as its default.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import dagster as dg

MD, PATH, JSON = "md", "path", "json"


def shown(kind: str, default: Any = None):
    """A field the UI renders as ``kind`` (MD, PATH or JSON)."""
    return field(default=default, metadata={"kind": kind})


def omitted_when_none(default: Any = None):
    """A field left out of the metadata while it is None (e.g. only a trained head has ``streamed``)."""
    return field(default=default, metadata={"omit_none": True})


def metadata_value(value: Any, kind: Optional[str] = None):
    """A plain value as Dagster metadata: dicts and lists as JSON, floats as floats, the rest as is."""
    if value is None:
        return None
    if kind == MD:
        return dg.MetadataValue.md(value)
    if kind == PATH:
        return dg.MetadataValue.path(str(value))
    if kind == JSON or isinstance(value, (dict, list, tuple)):
        return dg.MetadataValue.json(list(value) if isinstance(value, tuple) else value)
    if isinstance(value, float):
        return dg.MetadataValue.float(value)
    return value


def plain(metadata: dict) -> dict:
    """A materialization's metadata as plain values."""
    return {k: getattr(v, "value", v) for k, v in metadata.items()}


@dataclass
class AssetMetadata:
    """Base of the per-asset types: fields in, Dagster metadata out, and back."""

    def to_metadata(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = metadata_value(value, f.metadata.get("kind"))
        return out

    @classmethod
    def from_metadata(cls, metadata: dict):
        values = plain(metadata)
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass
class ManifestMetadata(AssetMetadata):
    source: str = ""
    images: int = 0
    ok: int = 0
    manifest_digest: str = ""
    not_usable: str = shown(MD, "none")
    counts: str = shown(MD, "")
    overrides: str = shown(MD, "none")
    scan: dict = shown(JSON)
    summary: dict = shown(JSON)


@dataclass
class ActivationsMetadata(AssetMetadata):
    """``precompute.stages.cache_fill.CacheFill.metadata()``, field for field."""
    entry: str = ""
    entry_key: str = ""
    view_key: str = ""
    key_parts: dict = shown(JSON)
    images: int = 0
    computed: int = 0
    reused: int = 0
    chunks: int = 0
    seconds: float = 0.0
    failed: int = 0
    failed_images: list = shown(JSON)
    images_per_s: float = 0.0
    bytes_on_disk: Optional[int] = None
    compression_ratio: float = 0.0
    codec: Any = None
    chunks_verified: int = 0
    chunks_unverified: int = 0
    chunks_repaired: Any = None


@dataclass
class LrFindMetadata(AssetMetadata):
    suggested_lr: str = ""          # the rate as text, or why there is none
    mlflow_run_id: str = ""
    plot: str = shown(MD, "")


@dataclass
class StageMetadata(AssetMetadata):
    """A trained stage (head_on_cache, head_augmented, finetuned): its run, last epoch and groups."""
    mlflow_run_id: Optional[str] = None
    valid_accuracy: float = float("nan")
    valid_loss: float = float("nan")
    layer_groups: Optional[list] = None
    thresholds: Optional[dict] = omitted_when_none()   # multi-label: each label's decision threshold
    mlflow_tracking_uri: str = ""
    reused: Optional[bool] = omitted_when_none()       # head_on_cache: the earlier head returned
    fingerprint: Optional[str] = omitted_when_none()   # head_on_cache: what decides reuse
    streamed: Optional[bool] = omitted_when_none()     # head_on_cache, trained: rows streamed from the store
    augmented_samples: Optional[str] = field(default=None, metadata={"kind": MD, "omit_none": True})

    @classmethod
    def of(cls, record, tracking_uri: str, thresholds: bool = True, **extra) -> "StageMetadata":
        """From a ``StageRecord`` (``thresholds=False``: a reused head shows none)."""
        from precompute.stages.common import stage_metadata

        return cls(**stage_metadata(record, thresholds), mlflow_tracking_uri=tracking_uri, **extra)


@dataclass
class HeadSweepMetadata(AssetMetadata):
    reused: bool = False
    fingerprint: str = ""           # where the sweep's result lies beside the cache entry
    n_configs: int = 0
    best_config: dict = shown(JSON)
    best_valid_accuracy: float = float("nan")
    best_valid_loss: float = float("nan")
    sweep_seconds: float = 0.0
    mlflow_run_id: str = ""
    mlflow_tracking_uri: str = ""
    table: str = shown(MD, "")
    plot: str = shown(MD, "")


@dataclass
class EvaluationMetadata(AssetMetadata):
    """The report, and each evaluated stage's accuracy under a flat key (``<stage>_accuracy``,
    ``<stage>_tta_accuracy``): the UI plots a flat float over time."""
    report: str = shown(MD, "")
    report_path: str = shown(PATH, "")
    mlflow_run_id: str = ""
    accuracy: dict = field(default_factory=dict)
    tta_accuracy: dict = field(default_factory=dict)

    def to_metadata(self) -> dict:
        return {"report": dg.MetadataValue.md(self.report), "report_path": dg.MetadataValue.path(self.report_path),
                "mlflow_run_id": self.mlflow_run_id,
                **{f"{n}_accuracy": v for n, v in self.accuracy.items()},
                **{f"{n}_tta_accuracy": v for n, v in self.tta_accuracy.items()}}

    @classmethod
    def from_metadata(cls, metadata: dict) -> "EvaluationMetadata":
        v = plain(metadata)
        return cls(v.get("report", ""), v.get("report_path", ""), v.get("mlflow_run_id", ""),
                   {k.removesuffix("_accuracy"): x for k, x in v.items()
                    if k.endswith("_accuracy") and not k.endswith("_tta_accuracy")},
                   {k.removesuffix("_tta_accuracy"): x for k, x in v.items() if k.endswith("_tta_accuracy")})

    @classmethod
    def of(cls, stages: dict[str, dict], report_md: str, report_path: str, run_id: str) -> "EvaluationMetadata":
        return cls(report_md, report_path, run_id, {n: m["accuracy"] for n, m in stages.items()},
                   {n: m["tta_accuracy"] for n, m in stages.items() if "tta_accuracy" in m})


@dataclass
class DataQualityMetadata(AssetMetadata):
    leaks: int = 0
    duplicates: int = 0
    label_issues: int = 0
    outliers: int = 0
    drifted: int = 0
    overrides_applied: int = 0
    images: int = 0
    label_issue_rate: float = 0.0
    summary: dict = shown(JSON)
    csv: str = shown(PATH, "")
    seen_ids_path: str = shown(PATH, "")   # the next run's drift reference
    top_findings: str = shown(MD, "none")
    overrides: str = shown(MD, "none")
    mlflow_run_id: str = ""
    sheets: dict = field(default_factory=dict)  # finding kind -> contact sheet (Markdown), as sheet_<kind>

    def to_metadata(self) -> dict:
        out = AssetMetadata.to_metadata(self)
        del out["sheets"]
        return {**out, **{f"sheet_{kind}": dg.MetadataValue.md(md) for kind, md in self.sheets.items()}}

    @classmethod
    def from_metadata(cls, metadata: dict) -> "DataQualityMetadata":
        sheets = {k.removeprefix("sheet_"): v for k, v in plain(metadata).items() if k.startswith("sheet_")}
        typed = AssetMetadata.from_metadata.__func__(cls, {k: v for k, v in metadata.items() if k != "sheets"})
        typed.sheets = sheets
        return typed


@dataclass
class LeaderboardMetadata(AssetMetadata):
    partitions: int = 0
    mlflow_run_id: str = ""
    mlflow_tracking_uri: str = ""
    best: dict = shown(JSON)        # arch and cut of the best partition; {} when none
    table: str = shown(MD, "")
    plot: str = shown(MD, "")
