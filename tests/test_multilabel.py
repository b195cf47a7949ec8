"""Multi-label targets: a CSV with several tags per image, sigmoid head, a threshold per label.

The images are real dogscats photos; every other one is turned grey and tagged ``grey`` besides
its species, so one label is easy to learn and one needs the photo's content.
"""

import csv
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from assets import RECIPE_ASSETS
from precompute import evaluate
from precompute.inference import evaluate_on_images
from precompute.labels import class_names, is_multilabel, multi_hot
from precompute.manifest import ManifestError, build_manifest, ok_rows
from precompute.predict import predict_folder
from precompute.rows import labelled_split
from resources import ActivationStoreResource, ComputeDevice, ImageSource, MlflowTracking

PARTITION = "tf_efficientnet_lite0|0"


def tagged_csv(src: Path, dst: Path, per_split: dict[str, int], delim: str = " ") -> Path:
    """``per_split`` photos per class and split; even ones grey and tagged ``grey``."""
    rows = []
    for split, n in per_split.items():
        for cls_dir in sorted((src / split).iterdir()):
            for i, f in enumerate(sorted(cls_dir.iterdir())[:n]):
                out = dst / split / f"{cls_dir.name}-{i}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                img = Image.open(f).convert("RGB")
                tags = [cls_dir.name[:-1]]  # cats -> cat
                if i % 2 == 0:
                    img = img.convert("L").convert("RGB")
                    tags.append("grey")
                img.save(out, quality=90)
                rows.append((out.relative_to(dst).as_posix(), delim.join(tags[::-1]), split))  # unsorted on purpose
    path = dst / "labels.csv"
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "split"), *rows])
    return path


@pytest.fixture
def tagged(tmp_path, dogscats) -> Path:
    return tagged_csv(dogscats, tmp_path / "tagged", {"train": 10, "valid": 6})


def test_manifest_splits_tags_and_keeps_one_spelling(tagged):
    m = build_manifest(tagged, label_delim=" ")
    assert is_multilabel(m) and is_multilabel(ok_rows(m, "valid"))  # the delimiter travels with the rows
    assert class_names(m) == ["cat", "dog", "grey"]
    assert set(m["label"]) == {"cat", "dog", "cat grey", "dog grey"}  # "grey cat" in the CSV, sorted here
    y = multi_hot(ok_rows(m, "train")["label"], class_names(m), " ")
    assert y.shape == (20, 3) and y[:, :2].sum(1).tolist() == [1.0] * 20 and y[:, 2].sum() == 10
    single = build_manifest(tagged)  # without a delimiter a tag set is one class, as before
    assert not is_multilabel(single) and "grey cat" in class_names(single)


def test_bad_multilabel_input_is_reported(tagged, tmp_path):
    m = build_manifest(tagged, label_delim=" ", classes=["cat", "dog"])  # "grey" is not a known class
    bad = m[m["status"] == "unknown_label"]
    assert len(bad) == 16 and bad["reason"].str.contains(r"tag\(s\) \['grey'\]").all()
    # a tag only validation images carry: those images are left out, with the tag named
    Image.open(tagged.parent / "valid" / "cats-1.jpg").save(tagged.parent / "valid" / "zebra.jpg", quality=70)
    text = tagged.read_text().splitlines() + ["valid/zebra.jpg,cat zebra,valid"]
    (tmp_path / "tagged" / "extra.csv").write_text("\n".join(text) + "\n")
    m = build_manifest(tmp_path / "tagged" / "extra.csv", label_delim=" ")
    unseen = m[m["status"] == "unseen_class"]
    assert len(unseen) == 1 and "'zebra'" in unseen["reason"].iloc[0]
    assert "zebra" not in class_names(m)
    with pytest.raises(ManifestError, match="need a CSV"):
        build_manifest(tagged.parent / "train", label_delim=" ")
    with pytest.raises(ManifestError, match="label_delim"):
        build_manifest(tagged, label_delim="a")


def test_thresholds_and_metrics():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 2)) < 0.3).astype(np.float32)
    # label 0 separable at 0.3 (positives 0.35-0.45, negatives 0.05-0.25); label 1 separable at 0.5
    p0 = np.where(y[:, 0] > 0, rng.uniform(0.35, 0.45, 200), rng.uniform(0.05, 0.25, 200))
    p1 = np.where(y[:, 1] > 0, rng.uniform(0.6, 0.9, 200), rng.uniform(0.1, 0.4, 200))
    probs = np.stack([p0, p1], 1)
    from precompute.metrics import choose_thresholds, multilabel_metrics

    th = choose_thresholds(probs, y)
    assert 0.25 < th[0] <= 0.35 and th[1] == 0.5  # a tie across 0.45-0.6 goes to the one nearest 0.5
    m = multilabel_metrics(probs, y, th)
    assert m.accuracy == 1.0 and m.exact_match == 1.0 and m.f1_macro == 1.0
    at_half = multilabel_metrics(probs, y)  # 0.5 for both: every positive of label 0 missed
    assert at_half.f1_macro == pytest.approx(0.5) and at_half.exact_match == pytest.approx(1 - y[:, 0].mean())
    rows = evaluate.per_class(probs, y, ["a", "b"], th)
    assert [r["support"] for r in rows] == y.sum(0).astype(int).tolist() and rows[0]["threshold"] == th[0]
    assert evaluate.predicted_tags(probs[:1], ["a", "b"], th) == [[c for c, t in zip("ab", y[0]) if t]]
    assert evaluate.top_losses(np.array([[0.9, 0.1], [0.1, 0.9]]), np.array([[0.0, 1.0], [0.0, 1.0]]), 1).tolist() == [0]


def test_multilabel_recipe_end_to_end(tmp_path, tagged, monkeypatch):
    """Dagster recipe on the tagged CSV: sigmoid heads, tuned thresholds, a per-label report, and
    predict giving the tags evaluation counted."""
    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resources = {"images": ImageSource(source=str(tagged), label_delim=" "),
                 "store": ActivationStoreResource(root=str(tmp_path / "store")),
                 "tracking": MlflowTracking(tracking_uri=uri, artifact_root=str(tmp_path / "artifacts")),
                 "compute": ComputeDevice(device="auto")}
    config = {"ops": {
        "activations": {"config": {"size": 128, "chunk_rows": 16}},  # at 64 px 20 photos teach too little
        "lr_find_head": {"config": {"num_it": 10, "batch_size": 8}},
        "head_on_cache": {"config": {"epochs": 8, "batch_size": 8, "lr": 3e-3}},
        "head_augmented": {"config": {"epochs": 1, "batch_size": 8, "lr": 1e-4}},
        "lr_find_unfrozen": {"config": {"num_it": 4, "batch_size": 8}},
        "finetuned": {"config": {"epochs": 1, "batch_size": 8, "lr": 1e-5}},
        "evaluation_report": {"config": {"tta": 1, "top_losses": 4}},
    }}
    (tmp_path / "dh").mkdir()
    with dg.DagsterInstance.local_temp(str(tmp_path / "dh")) as instance:
        result = dg.materialize(RECIPE_ASSETS, partition_key=PARTITION, resources=resources, instance=instance,
                                run_config=config)
    assert result.success
    head, final = result.output_for_node("head_on_cache"), result.output_for_node("finetuned")
    for record in (head, final):
        assert record.task.multilabel and record.task.label_delim == " " and record.classes == ["cat", "dog", "grey"]
        assert len(record.thresholds) == 3 and all(0 < t < 1 for t in record.thresholds)

    stages = result.output_for_node("evaluation_report")["stages"]
    assert {"exact_match", "f1_macro", "f2_samples"} <= set(stages["finetuned"])
    # the cache and the images agree (sigmoid outputs, binary cross-entropy)
    assert stages["head_on_cache (on cache)"]["loss"] == pytest.approx(stages["head_on_cache"]["loss"], rel=1e-3)
    manifest = build_manifest(tagged, label_delim=" ")
    probs, y, _ = evaluate_on_images(final, manifest)
    per_label = {r["class"]: r for r in evaluate.per_class(probs, y, final.classes, final.thresholds)}
    # learned, not guessed (chance F1 ~0.5; measured 1.0, 1.0, 0.92 on 12 validation photos)
    assert per_label["cat"]["f1"] >= 0.9 and per_label["dog"]["f1"] >= 0.9 and per_label["grey"]["f1"] >= 0.8
    md = Path(result.output_for_node("evaluation_report")["report"]).read_text()
    assert "## Per label" in md and "| grey |" in md and "Most confused" not in md

    # predict on the validation photos: the tags at the record's thresholds, as evaluation counted them
    table = predict_folder(final, tagged.parent / "valid")
    valid = labelled_split(manifest, final.classes, "valid").set_index("path")
    got = table.set_index("path").loc[list(valid.index)]
    want = [" ".join(t) for t in evaluate.predicted_tags(probs, final.classes, final.thresholds)]
    assert got["predicted"].tolist() == want
    assert np.allclose(got[[f"prob_{c}" for c in final.classes]].to_numpy(), probs, atol=1e-5)
    assert not np.allclose(got[[f"prob_{c}" for c in final.classes]].sum(1), 1)  # sigmoids, not a softmax
