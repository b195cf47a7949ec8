"""Inputs that used to take a run down or run code, each a real file (issue 10, items 5-7).

- a 1.2 KB PNG of 200000x2 pixels: a manifest row ``bad_shape``, never resized into gigabytes;
- an image that breaks after the scan: the other rows finish, the failed one has no row (never
  zeros), the checks name it, and the stages after the cache leave it out;
- a crafted model file / cached head result / run config naming ``this:s``: refused, nothing imported;
- a CSV listing one path twice: one ``ok`` row and one ``duplicate`` row naming the first line;
- a ``weights_path`` that is not a state dict: an error saying what the file is and what to pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests._precompute_worker import SlowBody, TRANSFORM, make_key, manifest_of, write_images
from precompute.rows import DEFAULT_MEMORY_BUDGET, cached_rows, failed_images, without_failed
from precompute.stages.cache_fill import verify_entry
from precompute.stages.head_stage import load_head_result, save_head_result
from precompute.archs import get_arch
from precompute.images import MAX_ASPECT_RATIO, ImageLoadError
from precompute.manifest import STATUSES, build_manifest, ok_rows
from precompute.transforms import ImageDataset, TransformSpec, eval_transform
from precompute.features import compute_activations
from precompute.heads import ALLOWED_HEADS_ENV, HEADS, HeadConfig, UnknownHead, build_head, register_head
from precompute.store import ActivationStore
from precompute.train import ConfigError
from precompute.validate import validate_run
from precompute.weights import WeightsFileError, load_weights

PROJECT = Path(__file__).resolve().parents[1]


def thin_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (200_000, 2)).save(path)  # compresses to about 1.2 KB
    return path


# --------------------------------------------------------------------------- one thin image


def test_thin_png_is_bad_shape_in_the_manifest(tmp_path):
    write_images(tmp_path / "images", 4)
    thin = thin_png(tmp_path / "images" / "train" / "a" / "thin.png")
    assert thin.stat().st_size < 2048
    df = build_manifest(tmp_path / "images", splits=("train",))
    row = df[df.relpath == "train/a/thin.png"].iloc[0]
    assert row.status == "bad_shape" and "bad_shape" in STATUSES
    assert "200000x2" in row.reason and f"{MAX_ASPECT_RATIO}:1" in row.reason
    assert (df.status == "ok").sum() == 4
    # a sane panorama stays usable
    Image.new("RGB", (40 * 10, 10)).save(tmp_path / "images" / "train" / "a" / "pano.png")
    again = build_manifest(tmp_path / "images", splits=("train",))
    assert again.set_index("relpath").loc["train/a/pano.png", "status"] == "ok"


def test_thin_png_fails_by_name_before_the_resize(tmp_path):
    thin = thin_png(tmp_path / "thin.png")
    ds = ImageDataset([thin], None, eval_transform(TransformSpec(size=224)))  # would be 25.6M x 256 pixels
    with pytest.raises(ImageLoadError) as err:
        ds[0]
    assert err.value.path == str(thin) and str(thin) in str(err.value) and "aspect ratio" in str(err.value)


# --------------------------------------------------------------------------- an image that breaks after the scan


@pytest.mark.parametrize("num_workers", [0, 1])
def test_precompute_goes_on_when_an_image_breaks_after_the_scan(tmp_path, num_workers):
    paths = write_images(tmp_path / "images", 8, seed=5)
    manifest = manifest_of(tmp_path / "images")
    assert len(manifest) == 8
    paths[2].write_bytes(b"this is not a PNG any more")  # replaced after the manifest was built
    thin_png(paths[5])  # and one that fails only at the resize, listed under its own hash (read, then refused)
    manifest.loc[manifest.path == str(paths[5]), "image_id"] = hashlib.sha256(paths[5].read_bytes()).hexdigest()
    broken = {str(paths[2]), str(paths[5])}
    entry = ActivationStore(str(tmp_path / "store")).entry(make_key())

    stats = compute_activations(SlowBody(), manifest, eval_transform(TRANSFORM), entry, batch_size=2,
                                chunk_rows=3, num_workers=num_workers)

    assert stats.computed == 6 and stats.reused == 0
    assert {path for _, path, _ in stats.failed} == broken
    reasons = {path: reason for _, path, reason in stats.failed}
    assert reasons[str(paths[2])].startswith("changed_since_scan") and "aspect ratio" in reasons[str(paths[5])]
    failed_ids = {image_id for image_id, _, _ in stats.failed}
    assert set(entry.missing(manifest["image_id"])) == failed_ids  # no row, so never zeros
    good = [i for i in manifest["image_id"] if i not in failed_ids]
    assert np.abs(entry.read(good)).sum(axis=1).min() > 0
    assert json.loads(json.dumps(stats.as_dict()))["failed"] == 2

    checks = verify_entry(entry, manifest, stats.failed)
    assert checks["finite_values"] == (True, {"rows_checked": 6})  # the rows there are checked all the same
    for name in ("rows_match_manifest", "every_image_accounted_for"):
        passed, details = checks[name]
        assert not passed
        named = " ".join(details["missing_images"])
        assert all(p in named for p in broken) and "changed_since_scan" in named

    # the stages after the cache leave the failed images out instead of missing their rows
    marked = without_failed(manifest, stats.failed)
    assert sorted(marked.loc[marked.status == "failed", "path"]) == sorted(broken)
    classes = sorted(set(marked["label"]))
    rows = cached_rows(entry, marked, classes, "train", DEFAULT_MEMORY_BUDGET)
    assert len(rows) == 6
    assert sorted(path for _, path, _ in failed_images(marked)) == sorted(broken)

    # a rerun tries the failed images again and computes nothing else
    again = compute_activations(SlowBody(), manifest, eval_transform(TRANSFORM), entry, batch_size=2, chunk_rows=3)
    assert again.computed == 0 and again.reused == 6 and len(again.failed) == 2


# --------------------------------------------------------------------------- nothing executable from data


def crafted_record(custom: str = "this:s") -> dict:
    return {"stage": "finetuned", "arch": "resnet18", "xtra_cut": 0, "classes": ["a", "b"], "multilabel": False,
            "label_delim": None, "thresholds": None, "head_config": {"ps": None, "xtra_fc": [8], "custom": custom},
            "transform": TransformSpec(size=32).key(), "weights_id": "random", "state_dict": {}, "history": []}


def test_crafted_model_file_imports_nothing(tmp_path):
    model = tmp_path / "crafted.pt"
    torch.save(crafted_record(), model)
    images = tmp_path / "new"
    images.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images / "one.png")
    script = f"""
import sys
from precompute.cli import main
assert "this" not in sys.modules
rc = main(["predict", "--model", {str(model)!r}, "--images", {str(images)!r}, "--out", {str(tmp_path / "p.csv")!r}])
print("RC", rc, "IMPORTED", "this" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != ALLOWED_HEADS_ENV}
    out = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert "RC 2 IMPORTED False" in out.stdout, out.stdout + out.stderr
    assert "Beautiful is better than ugly" not in out.stdout  # what importing `this` prints
    error = out.stderr  # the message alone, no traceback
    assert error.startswith("precompute predict: ") and "Traceback" not in error
    assert "'this:s'" in error and str(model) in error
    assert ALLOWED_HEADS_ENV in error and "register_head" in error
    assert not (tmp_path / "p.csv").exists()


def test_cached_head_result_naming_a_module_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOWED_HEADS_ENV, raising=False)
    sys.modules.pop("this", None)
    entry = ActivationStore(str(tmp_path / "store")).entry(make_key())
    save_head_result(entry, "f" * 24, crafted_record())
    with pytest.raises(UnknownHead, match=r"cached head result head-f+\.pt .*'this:s'.*PRECOMPUTE_ALLOWED_HEADS"):
        load_head_result(entry, "f" * 24)
    assert "this" not in sys.modules


def test_run_config_custom_head_must_be_registered_or_allowed(monkeypatch):
    monkeypatch.delenv(ALLOWED_HEADS_ENV, raising=False)
    sys.modules.pop("this", None)
    with pytest.raises(ConfigError) as err:
        HeadConfig(custom="this:s")
    assert "'this:s'" in str(err.value) and ALLOWED_HEADS_ENV in str(err.value)
    with pytest.raises(UnknownHead):
        build_head(8, 2, custom="this:s")
    assert "this" not in sys.modules

    HeadConfig(custom="linear")  # registered in code
    assert build_head(8, 2, custom="linear").classifier.in_features == 16
    monkeypatch.setenv(ALLOWED_HEADS_ENV, "torch.nn:Identity, torch.nn:Linear")  # allowed by the operator
    HeadConfig(custom="torch.nn:Linear")
    assert build_head(8, 2, custom="torch.nn:Linear").classifier.out_features == 2

    @register_head("test_fault_inputs.two_layer")
    def two_layer(n_in: int, n_out: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(n_in, 4), torch.nn.ReLU(), torch.nn.Linear(4, n_out))

    try:
        assert len(build_head(8, 2, custom="test_fault_inputs.two_layer").classifier) == 3
    finally:
        HEADS.pop("test_fault_inputs.two_layer")


# --------------------------------------------------------------------------- the same path twice in a CSV


def test_duplicate_csv_rows_count_once(tmp_path, caplog):
    write_images(tmp_path, 4, seed=1)  # train/a/img000.png, train/b/img001.png, ...
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,split\n"
                   "train/a/img000.png,a,train\n"
                   "train/b/img001.png,b,train\n"
                   "train/a/img002.png,a,valid\n"
                   "./train/a/img000.png,a,train\n"   # line 5: the same file as line 2
                   "train/b/img003.png,b,valid\n"
                   "train/b/img001.png,b,train\n")    # line 7: the same as line 3
    with caplog.at_level(logging.WARNING, logger="precompute.manifest"):
        df = build_manifest(csv)
    assert len(df) == 6 and (df.status == "ok").sum() == 4 and (df.status == "duplicate").sum() == 2
    assert "duplicate" in STATUSES
    dups = df[df.status == "duplicate"].set_index("relpath")["reason"]
    assert "line 5 repeats line 2" in dups["train/a/img000.png"]
    assert "line 7 repeats line 3" in dups["train/b/img001.png"]
    assert ok_rows(df)["relpath"].is_unique
    assert any("2 CSV rows" in r.getMessage() and "repeat" in r.getMessage() for r in caplog.records)


def test_same_path_under_two_labels_is_a_conflict_not_a_duplicate(tmp_path):
    write_images(tmp_path, 4, seed=2)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,split\ntrain/a/img000.png,a,train\ntrain/b/img001.png,b,train\n"
                   "train/a/img002.png,a,valid\ntrain/b/img003.png,b,valid\ntrain/a/img000.png,b,train\n")
    df = build_manifest(csv)
    assert (df.relpath == "train/a/img000.png").sum() == 2
    assert set(df.loc[df.relpath == "train/a/img000.png", "status"]) == {"conflicting_label"}


# --------------------------------------------------------------------------- weights_path that is not weights


@pytest.mark.parametrize("content, says", [
    ("text", "is not a file torch.save writes"),
    ("tensor", "holds a single tensor of shape (3,)"),
    ("checkpoint", "keys ['epoch', 'model']"),
    ("other_keys", "not one for resnet18: 122 of 122 tensors missing"),
])
def test_weights_path_that_is_not_a_state_dict(tmp_path, content, says):
    path = tmp_path / "weights.pt"
    if content == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "checkpoint":
        torch.save({"epoch": 3, "model": {"w": torch.zeros(3)}}, path)
    else:
        torch.save({"features.0.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsFileError) as err:
        load_weights(get_arch("resnet18"), weights_path=str(path))
    msg = str(err.value)
    assert says in msg and str(path) in msg
    assert "torch.save(model.state_dict(), path)" in msg and "resnet18" in msg
    if content == "text":  # caught before any work, too
        with pytest.raises(ConfigError, match="is not a file torch.save writes"):
            validate_run(arch="resnet18", weights_path=str(path))
    else:
        validate_run(arch="resnet18", weights_path=str(path))  # only loading can tell
