"""Real folders as they come: every awkward input is a manifest row with a status and a reason (or a
ManifestError that says what to do), and a run over all of them at once computes a cache row for
every usable image and trains a head without crashing. Single-file cases that tests/test_data.py
already covers (empty, truncated, text as .jpg, alpha, 16-bit, CMYK, palette, EXIF, file symlink
out of the root, CSV paths escaping the root) appear here only in the end-to-end folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from precompute.backbone import load_backbone, transform_for
from precompute.heads import HeadConfig
from precompute.images import load_rgb
from precompute.labels import class_names
from precompute.manifest import IMAGE_EXTENSIONS, STATUSES, ManifestError, build_manifest, manifest_summary, ok_rows
from precompute.rows import labelled_split
from precompute.stages.cache_fill import precompute, verify_entry
from precompute.stages.head_stage import train_head_on_cache
from precompute.store import ActivationStore
from precompute.validate import check_manifest
from tests.conftest import (BAD_CLASS, BAD_NAME, bytes_path, can_use_bytes_names, needs_photos, opened_files, photos,
                            png_declaring)

# --------------------------------------------------------------------------- the messy folder (tests/conftest.py)


def image_files_on_disk(root: Path) -> list[str]:
    """Every image-named file under the split folders, seen as bytes and without following links."""
    found = []
    for split in (b"train", b"valid"):
        for dirpath, _, filenames in os.walk(os.path.join(os.fsencode(root), split)):
            for name in filenames:
                if not name.startswith(b".") and os.path.splitext(name)[1].lower().decode() in IMAGE_EXTENSIONS:
                    rel = os.path.relpath(os.path.join(dirpath, name), os.fsencode(root))
                    found.append(rel.decode("utf-8", "backslashreplace"))
    return found


@needs_photos
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_end_to_end_every_bad_input_together(messy, tmp_path, caplog):
    root, outside, expected = messy
    with opened_files() as opened, caplog.at_level(logging.WARNING, "precompute.manifest"):
        df = build_manifest(root)

    # the report: every file a row, every row a status, every skipped row a reason
    assert dict(zip(df.relpath, df.status)) == expected
    assert set(df.status) <= set(STATUSES)
    ok, skipped = df[df.status == "ok"], df[df.status != "ok"]
    assert (skipped.reason.str.len() > 10).all() and (ok.reason == "").all()
    assert set(image_files_on_disk(root)) <= set(df.relpath)  # nothing on disk is missing from the report
    folder_rows = df.relpath.str.endswith("/")
    followed = df.relpath.str.startswith("train/cats/more/")
    assert len(ok) + len(skipped) == len(image_files_on_disk(root)) + folder_rows.sum() + followed.sum()
    assert not [p for p in opened if p.startswith(str(outside))]  # links out of the root: never read
    assert "no usable 'train' image" in df.set_index("relpath").loc["valid/foxes/fox.jpg", "reason"]
    assert "convert it to JPEG or PNG" in df.set_index("relpath").loc["train/dogs/IMG_0001.HEIC", "reason"]
    assert any("foxes" in r.message for r in caplog.records)  # the valid-only class is a warning too
    by = df.set_index("relpath")
    stored = Image.open(root / "train/dogs/rotated.jpg").size
    assert by.loc["train/dogs/rotated.jpg", ["width", "height"]].tolist() == [stored[1], stored[0]]
    summary = manifest_summary(df)
    assert summary["usable"] == len(ok) == 14 and summary["skipped"] == len(skipped)
    assert summary["classes"] == ["cats", "dogs"] and summary["classes_without_images_in"] == {"valid": []}
    check_manifest(df)  # enough to train and to measure
    # what the image_manifest asset shows (Dagster metadata, MLflow, JSON) takes every row as UTF-8 text
    table = skipped[["relpath", "status", "reason"]].to_markdown(index=False)
    assert "train/birds/" in table and ("caf\\xe9.jpg" in table or "bad_name" not in expected.values())
    json.dumps(df.astype(object).where(df.notna(), None).to_dict("records"), ensure_ascii=False).encode("utf-8")

    # every usable image decodes as RGB exactly as the manifest said
    for row in ok.itertuples():
        assert load_rgb(row.path).size == (row.width, row.height)

    # precompute: a row for every usable image, none for anything else
    bb = load_backbone("resnet18", weights="random")
    ts = transform_for(bb.spec, 32)
    entry, stats, _ = precompute(df, ActivationStore(str(tmp_path / "store")), bb, ts, batch_size=4,
                                 chunk_rows=4)
    assert stats.images == stats.computed == ok.image_id.nunique() == 14
    assert entry.missing(ok.image_id) == []
    assert not entry.missing(ok.image_id) and len(entry) == 14
    assert all(passed for passed, _ in verify_entry(entry, df).values())

    # the head trains on the usable rows; the unseen class is neither a class nor in the accuracy
    record = train_head_on_cache(entry, df, bb, ts, HeadConfig(xtra_fc=[8]),
                                 epochs=1, batch_size=4)
    assert record.classes == ["cats", "dogs"]
    assert np.isfinite(record.history[-1]["valid_loss"])
    valid = labelled_split(df, record.classes, "valid")
    assert len(valid) == len(ok_rows(df, "valid")) == 4 and "foxes" not in set(valid.label)


# --------------------------------------------------------------------------- one kind at a time


def test_png_header_bomb_is_refused_before_decoding(tmp_path):
    (tmp_path / "train/x").mkdir(parents=True)
    png_declaring(tmp_path / "train/x/huge.png", 100_000, 100_000)  # PIL raises at open
    side = int(Image.MAX_IMAGE_PIXELS ** 0.5) + 1
    png_declaring(tmp_path / "train/x/over.png", side, side)  # PIL only warns: refused by the manifest
    with pytest.warns(Image.DecompressionBombWarning):
        df = build_manifest(tmp_path).set_index("relpath")
    assert df.status.tolist() == ["too_large", "too_large"]
    assert "decompression bomb" in df.loc["train/x/huge.png", "reason"]
    assert f"{side}x{side} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS" in df.loc["train/x/over.png", "reason"]
    assert df.image_id.str.len().eq(64).all()  # hashed (cheap), never decoded


@needs_photos
def test_non_utf8_names_are_rows_to_rename(tmp_path):
    if not can_use_bytes_names(tmp_path):
        pytest.skip("this filesystem refuses names that are not UTF-8")
    photo = photos("train", "cats", 1)[0]
    for cls in (b"cats", b"dogs"):
        os.makedirs(bytes_path(tmp_path, b"train", cls))
        shutil.copy(photo if cls == b"cats" else photos("train", "dogs", 1)[0], bytes_path(tmp_path, b"train", cls, b"ok.jpg"))
    shutil.copy(photo, bytes_path(tmp_path, b"train/cats", BAD_NAME))
    os.makedirs(bytes_path(tmp_path, b"train", BAD_CLASS))
    shutil.copy(photo, bytes_path(tmp_path, b"train", BAD_CLASS, b"dog.jpg"))

    df = build_manifest(tmp_path).set_index("relpath")  # pandas' string columns need UTF-8: no crash
    assert df.loc["train/cats/caf\\xe9.jpg", "status"] == "bad_name"
    assert "caf\\xe9.jpg' is not valid UTF-8: rename it" in df.loc["train/cats/caf\\xe9.jpg", "reason"]
    assert df.loc["train/chi\\xe9ns/dog.jpg", ["status", "label"]].tolist() == ["bad_name", "chi\\xe9ns"]
    assert "chi\\xe9ns" in df.loc["train/chi\\xe9ns/dog.jpg", "reason"]
    assert (df.loc[["train/cats/ok.jpg", "train/dogs/ok.jpg"], "status"] == "ok").all()
    for value in df.reset_index()[["relpath", "path", "label", "reason"]].to_numpy().ravel():
        value.encode("utf-8")  # every text is valid UTF-8 for JSON, MLflow and Dagster


def test_non_utf8_root_is_an_error(tmp_path):
    if not can_use_bytes_names(tmp_path):
        pytest.skip("this filesystem refuses names that are not UTF-8")
    os.makedirs(bytes_path(tmp_path, BAD_CLASS, b"train/a"))
    with pytest.raises(ManifestError, match="not valid UTF-8: rename it"):
        build_manifest(os.fsdecode(bytes_path(tmp_path, BAD_CLASS)))


def _tiny_images(root: Path, rels: list[str]) -> None:
    for i, rel in enumerate(rels):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 20 % 256, 0, 0)).save(root / rel)


def test_empty_class_folder_is_a_row_and_not_a_class(tmp_path):
    _tiny_images(tmp_path, ["train/a/1.png", "train/b/2.png", "valid/a/3.png", "valid/b/4.png"])
    (tmp_path / "train/birds").mkdir()
    (tmp_path / "valid/birds/notes").mkdir(parents=True)
    (tmp_path / "valid/birds/notes/readme.txt").write_text("nothing here")
    df = build_manifest(tmp_path).set_index("relpath")
    assert df.loc["train/birds/", ["status", "label", "split"]].tolist() == ["empty_class", "birds", "train"]
    assert df.loc["valid/birds/", "status"] == "empty_class"
    assert "add images or remove the folder" in df.loc["train/birds/", "reason"]
    assert class_names(df.reset_index()) == ["a", "b"]


def test_class_only_in_validation_is_left_out_with_a_warning(tmp_path, caplog):
    _tiny_images(tmp_path, ["train/a/1.png", "train/b/2.png", "valid/a/3.png", "valid/c/4.png", "valid/c/5.png"])
    with caplog.at_level(logging.WARNING, "precompute.manifest"):
        df = build_manifest(tmp_path)
    assert df.set_index("relpath").loc[["valid/c/4.png", "valid/c/5.png"], "status"].eq("unseen_class").all()
    assert "{'c': 2}" in caplog.text
    assert class_names(df) == ["a", "b"]
    assert manifest_summary(df)["classes_without_images_in"] == {"valid": ["b"]}
    # a class whose training images are all unusable counts as unseen too
    (tmp_path / "train/c").mkdir()
    (tmp_path / "train/c/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    df = build_manifest(tmp_path).set_index("relpath")
    assert df.loc["train/c/broken.png", "status"] != "ok" and df.loc["valid/c/4.png", "status"] == "unseen_class"


def test_identical_bytes_under_two_labels_are_left_out(tmp_path, caplog):
    _tiny_images(tmp_path, ["train/a/1.png", "train/b/2.png", "valid/a/3.png", "valid/b/4.png"])
    shutil.copy(tmp_path / "train/a/1.png", tmp_path / "train/b/copy.png")
    shutil.copy(tmp_path / "train/b/2.png", tmp_path / "valid/b/leak.png")  # same label, two splits: a warning
    with caplog.at_level(logging.WARNING, "precompute.manifest"):
        df = build_manifest(tmp_path).set_index("relpath")
    assert df.loc[["train/a/1.png", "train/b/copy.png"], "status"].eq("conflicting_label").all()
    assert "train/b/copy.png (b)" in df.loc["train/a/1.png", "reason"]
    assert df.loc["valid/b/leak.png", "status"] == "ok" and "more than one split" in caplog.text
    assert manifest_summary(df.reset_index())["in_several_splits"] == 1


def test_symlinked_folders(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    _tiny_images(root, ["train/a/1.png", "train/b/2.png", "shared/3.png"])
    _tiny_images(outside, ["4.png"])
    (root / "train/a/in").symlink_to(root / "shared")  # inside the root: followed
    (root / "train/b/again").symlink_to(root / "shared")  # the same folder again: walked once
    (root / "train/b/loop").symlink_to(root / "train")  # a loop: not walked
    (root / "train/c").symlink_to(outside)  # a class folder that leaves the root
    with opened_files() as opened:
        df = build_manifest(root).set_index("relpath")
    assert df.status.to_dict() == {"train/a/1.png": "ok", "train/a/in/3.png": "ok", "train/b/2.png": "ok",
                                   "train/c/": "outside_root"}
    assert str(outside) in df.loc["train/c/", "reason"]
    assert not [p for p in opened if p.startswith(str(outside))]


def test_broken_symlink_fifo_and_unlistable_folder(tmp_path, monkeypatch):
    _tiny_images(tmp_path, ["train/a/1.png", "train/b/2.png", "train/locked/3.png"])
    (tmp_path / "train/a/gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(tmp_path / "train/a/pipe.png")
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission does (tests run as root here)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    df = build_manifest(tmp_path).set_index("relpath")
    assert df.loc["train/a/gone.png", "status"] == "missing" and "broken symlink" in df.loc["train/a/gone.png", "reason"]
    assert df.loc["train/a/pipe.png", "status"] == "unreadable" and "not a regular file" in df.loc["train/a/pipe.png", "reason"]
    assert df.loc["train/locked/", "status"] == "unreadable" and "Permission denied" in df.loc["train/locked/", "reason"]


# --------------------------------------------------------------------------- CSV sources


@pytest.fixture
def csv_root(tmp_path):
    _tiny_images(tmp_path, ["img/1.png", "img/2.png", "img/3.png", "img/4.png", "img/5.png"])
    return tmp_path


def test_csv_unknown_and_missing_labels(csv_root):
    csv = csv_root / "labels.csv"
    csv.write_text("path,label,split\n"
                   "img/1.png,cat,train\nimg/2.png,dog,train\nimg/3.png,cat,valid\n"
                   "img/4.png,dgo,train\n"  # a typo: not one of the declared classes
                   "img/5.png,,train\n"  # no label
                   "img/6.png\n")  # a short row: no label, and no file either
    df = build_manifest(csv, classes=["cat", "dog"]).set_index("relpath")
    assert df.status.to_dict() == {"img/1.png": "ok", "img/2.png": "ok", "img/3.png": "ok",
                                   "img/4.png": "unknown_label", "img/5.png": "unknown_label", "img/6.png": "missing"}
    assert "label 'dgo' is not one of the classes ['cat', 'dog']" in df.loc["img/4.png", "reason"]
    assert "fill the CSV's label" in df.loc["img/5.png", "reason"]
    # without declared classes the typo is a class of its own, and a valid-only label is unseen
    csv.write_text("path,label,split\nimg/1.png,cat,train\nimg/2.png,dog,train\nimg/3.png,cow,valid\n")
    assert build_manifest(csv).set_index("relpath").loc["img/3.png", "status"] == "unseen_class"


@pytest.mark.parametrize("content, message", [
    (b"path,label\nimg/1.png,chat\nimg/2.png,chat\xe9\n", r"labels.csv line 3 is not UTF-8 \(byte 0xe9\): save the CSV as UTF-8"),
    (b"path,label\nimg/1.png,cat\nimg/2.png,a,b\n", r"labels.csv line 3 has 3 fields but the header has 2: quote paths"),
    (b"", r"labels.csv is empty: it needs a header row"),
    (b"\xef\xbb\xbfpath;label\nimg/1.png;cat\n", r"lacks column\(s\) \['label', 'path'\] \(has \['path;label'\]\)"),
])
def test_broken_csv_files_say_what_to_fix(csv_root, content, message):
    csv = csv_root / "labels.csv"
    csv.write_bytes(content)
    with pytest.raises(ManifestError, match=message):
        build_manifest(csv)


def test_csv_with_bom_and_unicode_paths(csv_root):
    shutil.copy(csv_root / "img/1.png", csv_root / "img/chat é.png")
    (csv_root / "labels.csv").write_bytes(
        "\ufeffpath,label,split\nimg/chat é.png,chat,train\nimg/2.png,chien,train\n\n".encode())  # BOM, blank line
    df = build_manifest(csv_root / "labels.csv")
    assert dict(zip(df.relpath, df.status)) == {"img/chat é.png": "ok", "img/2.png": "ok"}


@pytest.mark.parametrize("bad", ["../outside/secret.png", "img/../../outside/secret.png", "{outside}/secret.png",
                                 "img/link.png"])
def test_no_path_from_a_csv_is_read_outside_the_root(tmp_path, bad):
    root, outside = tmp_path / "root", tmp_path / "outside"
    _tiny_images(root, ["img/1.png", "img/2.png"])
    _tiny_images(outside, ["secret.png"])
    (root / "img/link.png").symlink_to(outside / "secret.png")
    csv = root / "labels.csv"
    csv.write_text(f"path,label\nimg/1.png,a\nimg/2.png,b\n{bad.format(outside=outside)},a\n")
    with opened_files() as opened:
        try:
            df = build_manifest(csv)
        except ManifestError as e:
            assert "line 4" in str(e) and "outside the root" in str(e)
        else:
            assert df.set_index("relpath").loc["img/link.png", "status"] == "outside_root"
    assert str(csv) in opened  # the recorder works ...
    assert not [p for p in opened if p.startswith(str(outside))]  # ... and saw nothing outside opened
