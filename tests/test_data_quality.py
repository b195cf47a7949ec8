"""data_quality on real photos with planted faults: found from the cache, never from the body.

Real parts: photos from the shared dogscats copy, a real Zarr cache filled by the body once per
module, the real faiss index and cleanlab; the asset on a real Dagster instance and MLflow sqlite.
"""

import numpy as np
import pandas as pd
import pytest

from precompute import recipe
from precompute.manifest import build_manifest
from precompute.quality import QualityOptions, data_quality_tables
from precompute.quality.labels import LabelCheckRefused, label_issues
from precompute.quality.planting import copy_tree, plant_faults
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
    bb = recipe.load_backbone(ARCH)
    ts = recipe.transform_for(bb.spec, SIZE)
    store = ActivationStore(str(root / "store"))
    entry, _, _ = recipe.precompute(pd.concat([m_clean, m_faulty], ignore_index=True), store, bb, ts)
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


