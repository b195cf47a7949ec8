"""The per-asset metadata types (assets/metadata.py): what a producer writes, a reader gets back as
fields, and the UI gets the kinds of values it renders (Markdown, paths, JSON, floats)."""

import math

import dagster as dg

from assets.metadata import (ActivationsMetadata, DataQualityMetadata, EvaluationMetadata, HeadSweepMetadata,
                             StageMetadata)


def _stored(metadata: dict) -> dict:
    """As a materialization holds it: every value a Dagster MetadataValue."""
    return {k: v if isinstance(v, dg.MetadataValue) else dg.MetadataValue.text(v) if isinstance(v, str)
            else dg.MetadataValue.int(v) if isinstance(v, int) and not isinstance(v, bool)
            else dg.MetadataValue.bool(v) if isinstance(v, bool)
            else dg.MetadataValue.float(v) if isinstance(v, float) else dg.MetadataValue.null()
            for k, v in metadata.items()}


def test_sweep_metadata_round_trips_and_shows_markdown_and_json():
    sweep = HeadSweepMetadata(False, "abc123", 6, {"lr": 0.01}, 0.9, 0.3, 1.5, "run1", "sqlite:///x", "|t|", "![p](d)")
    meta = sweep.to_metadata()
    assert list(meta)[:3] == ["reused", "fingerprint", "n_configs"]  # the keys the UI and README show
    assert isinstance(meta["table"], dg.MarkdownMetadataValue) and isinstance(meta["best_config"], dg.JsonMetadataValue)
    assert isinstance(meta["best_valid_accuracy"], dg.FloatMetadataValue)
    assert HeadSweepMetadata.from_metadata(_stored(meta)) == sweep


def test_evaluation_accuracies_are_flat_keys_and_come_back_per_stage():
    stages = {"head_on_cache": {"accuracy": 0.8, "tta_accuracy": 0.85}, "finetuned": {"accuracy": 0.9}}
    meta = EvaluationMetadata.of(stages, "# report", "/r/report.md", "run9").to_metadata()
    assert meta["head_on_cache_accuracy"] == 0.8 and meta["head_on_cache_tta_accuracy"] == 0.85
    assert "finetuned_tta_accuracy" not in meta and isinstance(meta["report_path"], dg.PathMetadataValue)
    back = EvaluationMetadata.from_metadata(_stored(meta))
    assert back.accuracy == {"head_on_cache": 0.8, "finetuned": 0.9} and back.tta_accuracy == {"head_on_cache": 0.85}
    assert (back.report_path, back.mlflow_run_id) == ("/r/report.md", "run9")


def test_optional_fields_are_left_out_and_older_materializations_read_as_defaults():
    meta = StageMetadata("run2", 0.5, 0.7, [{"group": 0}], mlflow_tracking_uri="uri", reused=True,
                         fingerprint="f").to_metadata()
    assert "thresholds" not in meta and "streamed" not in meta and "augmented_samples" not in meta
    assert meta["reused"] is True and isinstance(meta["layer_groups"], dg.JsonMetadataValue)
    old = ActivationsMetadata.from_metadata({"computed": dg.MetadataValue.int(24)})  # fields added since: defaults
    assert old.computed == 24 and old.entry_key == "" and old.bytes_on_disk is None
    assert math.isnan(StageMetadata.from_metadata({}).valid_accuracy)


def test_data_quality_sheets_are_one_key_per_kind():
    dq = DataQualityMetadata(leaks=1, seen_ids_path="/q/seen_ids.txt", sheets={"leak": "![leak](x)"})
    meta = dq.to_metadata()
    assert "sheets" not in meta and isinstance(meta["sheet_leak"], dg.MarkdownMetadataValue)
    back = DataQualityMetadata.from_metadata(_stored(meta))
    assert back.sheets == {"leak": "![leak](x)"} and back.seen_ids_path == "/q/seen_ids.txt" and back.leaks == 1
