"""data_quality on real photos with planted faults: found from the cache, never from the body.

Real parts: photos from the shared dogscats copy, a real Zarr cache filled by the body once per
module, the real faiss index and cleanlab; the asset on a real Dagster instance and MLflow sqlite.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from precompute.backbone import load_backbone, transform_for
from precompute.manifest import build_manifest
from precompute.quality import QualityOptions, data_quality_tables
from precompute.quality.labels import LabelCheckRefused, label_issues
from precompute.quality.planting import copy_tree, plant_faults
from precompute.stages.cache_fill import precompute
from precompute.store import ActivationStore

ARCH, SIZE = "tf_efficientnet_lite0", 128
PER_SPLIT = {"train": 20, "valid": 6}


def outlier_image(path):
    """Not a dog nor a cat: a flat-coloured canvas with stripes."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (200, 160), (30, 140, 220))
    draw = ImageDraw.Draw(img)
    for x in range(0, 200, 20):
        draw.rectangle([x, 0, x + 8, 160], fill=(250, 240, 20))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, dogscats):
    """(clean manifest, faulty manifest, entry, planted): both sets' rows in one cache entry."""
    root = tmp_path_factory.mktemp("quality")
    clean = copy_tree(dogscats, root / "clean", PER_SPLIT)
    faulty = copy_tree(clean, root / "faulty")
    planted = plant_faults(faulty, n_dup=2, n_flip=2, seed=1, kinds=(0, 2))  # resized, jittered
    outlier_image(faulty / "train" / "cats" / "planted_outlier.jpg")
    m_clean, m_faulty = build_manifest(clean), build_manifest(faulty)
    bb = load_backbone(ARCH)
    ts = transform_for(bb.spec, SIZE)
    store = ActivationStore(str(root / "store"))
    entry, _, _ = precompute(pd.concat([m_clean, m_faulty], ignore_index=True), store, bb, ts)
    return m_clean, m_faulty, entry, planted


def pairs_of(report) -> set[frozenset]:
    f = report.findings[report.findings["finding"].isin(["leak", "duplicate"])]
    return {frozenset(p) for p in zip(f["relpath"], f["other_relpath"])}


def test_planted_faults_are_found(cached):
    _, manifest, entry, planted = cached
    report = data_quality_tables(entry, manifest)
    leaks = report.of("leak")
    assert {frozenset(p) for p in planted["pairs"]} <= pairs_of(report)
    assert set(leaks["split"]) == {"valid"} and set(leaks["other_split"]) == {"train"}  # the copy first
    issues = report.of("label_issue").set_index("relpath")
    for moved in planted["flips"]:
        assert moved in issues.index, f"flipped label of {moved} not found"
        assert issues.loc[moved, "suggested_label"] == planted["flipped_from"][moved]
    assert report.summary["label_issue_rate"] < 0.2  # a few rows, not every row
    top_outlier = report.of("outlier")["relpath"].iloc[0]
    assert top_outlier == "train/cats/planted_outlier.jpg"
    assert report.summary["drift"].startswith("no earlier data_quality run")
    assert list(report.findings.columns)[:3] == ["finding", "score", "similarity"]


def test_clean_set_has_no_leak(cached):
    manifest, _, entry, _ = cached
    report = data_quality_tables(entry, manifest)
    assert report.summary["leaks"] == 0 and len(report.of("leak")) == 0
    assert report.summary["images"] == 2 * sum(PER_SPLIT.values())


def test_new_images_get_a_drift_score_against_the_last_run(cached):
    clean, faulty, entry, _ = cached
    before = data_quality_tables(entry, clean)
    report = data_quality_tables(entry, faulty, previous_ids=before.seen_ids,
                                 options=QualityOptions(drift_percentile=99))
    s = report.summary
    assert s["new_images"] == 3  # two planted copies and the outlier; a flipped label is the same image
    assert "images seen by the last data_quality run" in s["drift_reference"]
    assert 0 <= s["drift_median_percentile"] <= 100
    assert "planted_outlier" in " ".join(report.of("drift")["relpath"])
    again = data_quality_tables(entry, faulty, previous_ids=report.seen_ids)
    assert again.summary["drift"] == "no new images"


def test_multilabel_label_check_is_refused_with_a_reason(cached):
    manifest, _, entry, _ = cached
    rows = manifest[manifest["status"] == "ok"].reset_index(drop=True)
    with pytest.raises(LabelCheckRefused, match="multi-label"):
        label_issues(rows, np.zeros((len(rows), 4)), multilabel=True)
    tagged = manifest.copy()
    tagged.attrs["label_delim"] = " "
    report = data_quality_tables(entry, tagged)
    assert "not checked for multi-label" in report.summary["labels_refused"] and report.summary["leaks"] == 0




def test_asset_checks_contact_sheets_mlflow_and_overrides(cached, tmp_path, monkeypatch):
    import dagster as dg
    from mlflow.tracking import MlflowClient

    from assets import activations, data_quality, image_manifest
    from resources import ActivationStoreResource, ComputeDevice, ImageSource, MlflowTracking

    _, manifest, entry, planted = cached
    folder = manifest["path"].iloc[0][: -len(manifest["relpath"].iloc[0])]
    home = tmp_path / "home"
    monkeypatch.setenv("PRECOMPUTE_HOME", str(home))
    monkeypatch.delenv("PRECOMPUTE_OVERRIDES", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resources = {"images": ImageSource(source=folder),
                 "store": ActivationStoreResource(root=entry.store.root),  # the module's rows: nothing computed
                 "tracking": MlflowTracking(tracking_uri=uri, artifact_root=str(tmp_path / "artifacts")),
                 "compute": ComputeDevice(device="cpu")}
    (tmp_path / "dg").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dg"))
    graph = [image_manifest, activations, data_quality]

    def run(quality: dict | None = None, selection=None):
        config = {"ops": {"data_quality": {"config": quality or {}},
                          **({} if selection else {"activations": {"config": {"size": SIZE}}})}}
        result = dg.materialize(graph, partition_key=f"{ARCH}|0", resources=resources, instance=instance,
                                run_config=config, selection=selection)
        assert result.success
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        meta = instance.get_latest_materialization_event(data_quality.key).asset_materialization.metadata
        return checks, meta

    checks, meta = run({"max_label_issue_rate": 0.01})
    assert meta["leaks"].value >= 2 and meta["label_issues"].value >= 2
    assert not checks["no_train_valid_leaks"].passed
    assert checks["no_train_valid_leaks"].severity == dg.AssetCheckSeverity.WARN  # the default
    assert not checks["label_issue_rate"].passed and checks["label_issue_rate"].severity == dg.AssetCheckSeverity.WARN
    assert "data:image/png;base64," in meta["sheet_leak"].value and "sheet_label_issue" in meta
    assert "planted_dup_00" in meta["top_findings"].value
    csv = pd.read_csv(meta["csv"].value, keep_default_na=False)
    run_id = meta["mlflow_run_id"].value
    logged = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "data_quality")}
    assert {"data_quality/data_quality.csv", "data_quality/leak.png", "data_quality/label_issue.png"} <= logged
    assert MlflowClient(uri).get_run(run_id).data.metrics["leaks"] == meta["leaks"].value

    checks, meta = run({"leak_severity": "ERROR"}, selection=[data_quality])  # configurable to ERROR
    assert checks["no_train_valid_leaks"].severity == dg.AssetCheckSeverity.ERROR
    assert meta["summary"].value["drift"] == "no new images"  # the last run saw every image

    # the user's path: copy rows of data_quality.csv, mark them, rerun; nothing leaves the disk
    marked = csv[csv["finding"].isin(["leak", "label_issue"])].copy()
    marked["action"] = marked["finding"].map({"leak": "drop", "label_issue": "relabel"})
    marked = marked[(marked["finding"] == "leak") | marked["relpath"].isin(planted["flips"])]
    home.mkdir(parents=True, exist_ok=True)
    marked.to_csv(home / "overrides.csv", index=False)
    before = instance.get_latest_materialization_event(image_manifest.key).asset_materialization
    checks, meta = run()
    after = instance.get_latest_materialization_event(image_manifest.key).asset_materialization
    assert after.tags["dagster/data_version"] != before.tags["dagster/data_version"]  # downstream goes stale
    assert "yes" in after.metadata["overrides"].value and "no:" not in after.metadata["overrides"].value
    assert meta["overrides_applied"].value == len(marked) and meta["leaks"].value == 0
    assert checks["no_train_valid_leaks"].passed
    assert all((Path(folder) / r).is_file() for r in marked["relpath"])
    issues = pd.read_csv(meta["csv"].value, keep_default_na=False)
    assert not set(planted["flips"]) & set(issues.loc[issues["finding"] == "label_issue", "relpath"])
    logged = {a.path for a in MlflowClient(uri).list_artifacts(meta["mlflow_run_id"].value, "data_quality")}
    assert "data_quality/overrides_applied.csv" in logged
    instance.dispose()


def test_bad_override_csv_says_what_to_do(tmp_path, cached):
    from precompute.quality.overrides import OverrideError, apply_overrides

    _, manifest, _, _ = cached
    bad = tmp_path / "o.csv"
    bad.write_text("image_id,action\nabc,delete\n")
    with pytest.raises(OverrideError, match="line 2: action 'delete'; use one of"):
        apply_overrides(manifest, bad)
    bad.write_text(f"image_id,action,suggested_label\n{manifest['image_id'].iloc[0]},relabel,\n")
    with pytest.raises(OverrideError, match="relabel without a suggested_label"):
        apply_overrides(manifest, bad)
    bad.write_text("image_id,action\nnot-there,drop\n")
    same, applied = apply_overrides(manifest, bad)
    assert same.equals(manifest) and applied["applied"].iloc[0].startswith("no: no such image")


def test_learner_data_quality_returns_the_asset_tables(cached):
    """Learner.data_quality() (the lead wires the one-line method) gives data_quality_tables' report."""
    from precompute import Learner

    if not hasattr(Learner, "data_quality"):
        pytest.skip("Learner.data_quality() not wired yet: it is data_quality_tables(self._cache(), self.manifest)")
    _, manifest, entry, planted = cached
    learn = Learner.pretrained(ARCH, manifest, size=SIZE, store=entry.store, verbose=False)
    report = learn.data_quality()
    assert learn.precompute_stats.computed == 0  # the cache answered: no body ran
    assert {frozenset(p) for p in planted["pairs"]} <= pairs_of(report)
    assert set(planted["flips"]) <= set(report.of("label_issue")["relpath"])
