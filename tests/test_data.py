import json
import shutil
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from precompute.demo_data import write_digits_folder
from precompute.images import load_rgb
from precompute.labels import class_names
from precompute.manifest import MANIFEST_COLUMNS, ManifestError, build_manifest, ok_rows
from precompute.transforms import ImageDataset, TransformSpec, eval_transform, train_transform

DOGSCATS = Path(__file__).resolve().parents[1].parent / "shared/data/dogscats"
needs_photos = pytest.mark.skipif(not DOGSCATS.is_dir(), reason=f"real photos not found at {DOGSCATS}")


def photos(split="train", cls="cats", n=2) -> list[Path]:
    return sorted((DOGSCATS / split / cls).glob("*.jpg"))[:n]


# --------------------------------------------------------------------------- folder manifest


@pytest.fixture(scope="module")
def messy_tree(tmp_path_factory):
    """A real-photo tree plus every kind of awkward file; returns (root, expected status per relpath)."""
    base = tmp_path_factory.mktemp("messy")
    root = base / "data"
    expected = {}

    def put(rel: str, status: str) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        expected[rel] = status
        return p

    for split in ("train", "valid"):
        for cls in ("cats", "dogs"):
            for src in photos(split, cls, 2 if split == "train" else 1):
                shutil.copy(src, put(f"{split}/{cls}/{src.name}", "ok"))

    put("train/cats/empty.jpg", "empty").write_bytes(b"")
    whole = photos()[0].read_bytes()
    put("train/cats/truncated.jpg", "unreadable").write_bytes(whole[: len(whole) // 2])
    put("train/dogs/notes.jpg", "not_image").write_text("this is not a JPEG\n")

    rgba = np.zeros((30, 50, 4), np.uint8)
    rgba[:, :25] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    Image.fromarray(rgba, "RGBA").save(put("train/dogs/rgba.png", "ok"))
    gray16 = np.full((20, 30), 65535, np.uint16)
    gray16[:, 15:] = 32896  # 32896 / 257 = 128
    Image.fromarray(gray16).save(put("train/dogs/gray16.png", "ok"))
    Image.new("CMYK", (33, 22), (0, 255, 255, 0)).save(put("valid/cats/cmyk.jpg", "ok"))
    pal = Image.new("P", (24, 12), 0)
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.paste(1, (12, 0, 24, 12))
    pal.save(put("valid/dogs/palette.gif", "ok"), transparency=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored 40x20, shown 20x40
    Image.new("RGB", (40, 20), "blue").save(put("valid/dogs/rotated.jpg", "ok"), exif=exif)

    outside = base / "outside" / "secret.jpg"
    outside.parent.mkdir()
    shutil.copy(photos()[0], outside)
    put("train/cats/link.jpg", "outside_root").symlink_to(outside)
    shutil.copy(photos()[0], put("train/stray.jpg", "unknown_label"))

    # Not images: skipped, not rows.
    (root / "train/cats/readme.txt").write_text("notes")
    (root / "train/cats/.hidden.jpg").write_bytes(whole)
    (root / "train/labels.csv").write_text("path,label\n")
    return root, expected


@needs_photos
def test_folder_manifest_statuses_and_nothing_dropped(messy_tree):
    root, expected = messy_tree
    df = build_manifest(root)
    assert list(df.columns) == MANIFEST_COLUMNS
    assert len(df) == len(expected)  # every image file is a row, nothing else is
    assert dict(zip(df.relpath, df.status)) == expected
    assert (df.reason == "").equals(df.status == "ok")
    assert df[["split", "label", "relpath"]].equals(
        df.sort_values(["split", "label", "relpath"])[["split", "label", "relpath"]].reset_index(drop=True)
    )
    by = df.set_index("relpath")
    assert by.loc["train/cats/link.jpg", "image_id"] == ""  # outside the root: never read
    assert by.loc["train/cats/truncated.jpg", "reason"].startswith("OSError")
    assert by.loc["valid/dogs/rotated.jpg", ["width", "height"]].tolist() == [20, 40]  # EXIF-oriented
    ok = ok_rows(df)
    assert ok.image_id.str.fullmatch(r"[0-9a-f]{64}").all()
    for row in ok.itertuples():
        img = load_rgb(row.path)
        assert img.mode == "RGB" and len(img.getbands()) == 3
        assert img.size == (row.width, row.height)
    assert class_names(df) == ["cats", "dogs"]
    assert set(ok_rows(df, "valid").relpath) == {r for r, s in expected.items() if s == "ok" and r.startswith("valid")}


@needs_photos
def test_manifest_is_deterministic_and_content_addressed(messy_tree):
    root, _ = messy_tree
    a, b = build_manifest(root), build_manifest(str(root))
    pd.testing.assert_frame_equal(a, b)
    by = a.set_index("relpath")
    # the stray copy has the same bytes as the first cat photo, so the same id
    assert by.loc["train/stray.jpg", "image_id"] == by.loc[f"train/cats/{photos()[0].name}", "image_id"]


@needs_photos
def test_load_rgb_converts_modes(messy_tree):
    root, _ = messy_tree
    rgba = np.asarray(load_rgb(root / "train/dogs/rgba.png"))
    assert rgba[0, 0].tolist() == [255, 0, 0] and rgba[0, -1].tolist() == [255, 255, 255]  # alpha on white
    g16 = np.asarray(load_rgb(root / "train/dogs/gray16.png"))
    assert g16[0, 0].tolist() == [255] * 3 and g16[0, -1].tolist() == [128] * 3  # scaled, not clipped
    pal = np.asarray(load_rgb(root / "valid/dogs/palette.gif"))
    assert pal[0, 0].tolist() == [0, 0, 255] and pal[0, -1].tolist() == [255, 255, 255]  # transparent index
    cmyk = np.asarray(load_rgb(root / "valid/cats/cmyk.jpg")).astype(int)
    assert cmyk.shape == (22, 33, 3) and abs(cmyk[5, 5] - [255, 0, 0]).max() < 10  # C=M=0,Y=K: red-ish
    assert load_rgb(root / "valid/dogs/rotated.jpg").size == (20, 40)


def test_decompression_bomb_is_a_row(tmp_path, monkeypatch):
    for name, side in [("warn.png", 40), ("error.png", 60)]:  # limit 1000 px: warning band, then error
        p = tmp_path / "train/x" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (side, side)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(Image.DecompressionBombWarning):
        df = build_manifest(tmp_path)
    assert df.status.tolist() == ["too_large", "too_large"]


# --------------------------------------------------------------------------- errors


def test_missing_source_names_the_path(tmp_path):
    with pytest.raises(ManifestError, match=str(tmp_path / "nope")):
        build_manifest(tmp_path / "nope")


def test_empty_folder_names_the_path(tmp_path):
    with pytest.raises(ManifestError, match=f"no split folders.*{tmp_path}"):
        build_manifest(tmp_path)
    (tmp_path / "train/cats").mkdir(parents=True)
    (tmp_path / "train/cats/readme.txt").write_text("x")
    with pytest.raises(ManifestError, match=f"no image files under {tmp_path}"):
        build_manifest(tmp_path)


# --------------------------------------------------------------------------- CSV manifest


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return write_digits_folder(tmp_path_factory.mktemp("digits"), size=16, limit_per_class=5)


def test_csv_with_split_column(digits_root):
    f = [next((digits_root / "train" / str(d)).glob("*.png")).relative_to(digits_root).as_posix() for d in range(5)]
    csv = digits_root / "labels.csv"
    csv.write_text(
        "Path,label,split,notes\n"  # header case and unknown columns are tolerated
        f"{f[0]},zero,valid,x\n"
        f"{digits_root / f[1]},one,train,\n"  # absolute, inside the root
        f"{f[2]},two,test,\n"
        f"train/3/nothere.png,three,train,\n"
        f"{f[4]},,train,\n"
        f"train/5/5.txt,five,train,\n"  # not an image: a row that says so, never read
    )
    df = build_manifest(csv).set_index("relpath")
    assert len(df) == 6
    assert df.loc["train/5/5.txt", ["label", "split", "status"]].tolist() == ["five", "train", "not_image"]
    assert "line 7: extension '.txt' is not an image type" in df.loc["train/5/5.txt", "reason"]
    # "zero" has no training image: left out as unseen_class (see tests/test_bad_inputs.py)
    assert df.loc[f[0], ["label", "split", "status"]].tolist() == ["zero", "valid", "unseen_class"]
    assert df.loc[f[1], ["label", "status", "width"]].tolist() == ["one", "ok", 16]
    assert df.loc[f[2], ["split", "status"]].tolist() == ["test", "unknown_split"]
    assert df.loc["train/3/nothere.png", "status"] == "missing"
    assert df.loc[f[4], "status"] == "unknown_label"
    assert class_names(df.reset_index()) == ["one"]


def test_csv_without_split_is_hash_split(digits_root):
    files = sorted((digits_root / "train").rglob("*.png"))
    csv = digits_root / "nosplit.csv"
    csv.write_text("path,label\n" + "".join(f"{f.relative_to(digits_root)},{f.parent.name}\n" for f in files))
    df = build_manifest(csv)
    assert (df.status == "ok").all() and len(df) == len(files)
    expected = np.where(df.image_id.map(lambda h: int(h[:8], 16) / 2**32 < 0.2), "valid", "train")
    assert (df.split == expected).all()
    assert 0 < (df.split == "valid").sum() < len(df)
    assert build_manifest(csv).equals(df)
    assert (build_manifest(csv, valid_fraction=0.5).split == "valid").sum() > (df.split == "valid").sum()
    with csv.open("a") as f:
        f.write("train/0/gone.png,0\n")  # never read: split by its path, no crash
    gone = build_manifest(csv).set_index("relpath").loc["train/0/gone.png"]
    assert gone.status == "missing" and gone.split in ("train", "valid")


@pytest.mark.parametrize("bad", ["../escape.png", "train/../../escape.png", "/etc/passwd.png"])
def test_csv_path_escaping_root_raises(digits_root, bad):
    csv = digits_root / "bad.csv"
    csv.write_text(f"path,label\ntrain/0/0.png,0\n{bad},0\n")
    with pytest.raises(ManifestError, match=r"line 3.*outside the root"):
        build_manifest(csv)


def test_csv_missing_columns_raises(digits_root):
    csv = digits_root / "nolabel.csv"
    csv.write_text("file,split\ntrain/0/0.png,train\n")
    with pytest.raises(ManifestError, match=r"\['label', 'path'\]"):
        build_manifest(csv)


# --------------------------------------------------------------------------- transforms

ARCH = SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(3, 32, 32))


def test_for_arch_takes_normalization_and_size():
    ts = TransformSpec.for_arch(ARCH)
    assert (ts.size, ts.resize_to, ts.mean, ts.std) == (32, 36, (0.5,) * 3, (0.5,) * 3)
    assert TransformSpec.for_arch(ARCH, size=64, crop="none").size == 64
    assert TransformSpec().resize_to == 256


def test_eval_transform_is_deterministic_and_normalized():
    ts = TransformSpec.for_arch(ARCH)
    t = eval_transform(ts)
    solid = Image.new("RGB", (50, 40), (255, 0, 51))
    x = t(solid)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 16, 16], torch.tensor([1.0, -1.0, -0.6]))  # (c/255 - 0.5) / 0.5
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 80, 3), np.uint8))
    assert torch.equal(t(img), t(img))
    squished = eval_transform(replace(ts, crop="none"))(img)
    assert squished.shape == (3, 32, 32) and not torch.equal(squished, t(img))


def test_train_transform_is_random_but_seedable():
    ts = TransformSpec(size=32)
    t = train_transform(ts)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8))
    torch.manual_seed(0)
    a, b = t(img), t(img)
    assert a.shape == b.shape == (3, 32, 32)
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(t(img), a)


def test_transform_key_covers_every_field():
    base = TransformSpec()
    changed = dict(size=192, resize=300, crop="none", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    assert set(changed) == {f.name for f in fields(TransformSpec)}
    json.dumps(base.key())
    for name, value in changed.items():
        assert replace(base, **{name: value}).key() != base.key(), name
    assert TransformSpec(resize=256).key() == base.key()  # same pixels, same cache entry
    with pytest.raises(ValueError, match="crop"):
        TransformSpec(crop="random")


# --------------------------------------------------------------------------- dataset and demo data


def test_digits_folder_and_dataset(tmp_path):
    root = write_digits_folder(tmp_path, size=16, limit_per_class=3)
    pngs = sorted(root.rglob("*.png"))
    assert len(pngs) == 30
    assert {p.relative_to(root).parts[0] for p in pngs} == {"train", "valid"}
    df = build_manifest(root)
    assert (df.status == "ok").all() and class_names(df) == [str(d) for d in range(10)]
    for split, n in [("train", 2), ("valid", 1)]:
        assert ok_rows(df, split).label.value_counts().eq(n).all() and ok_rows(df, split).label.nunique() == 10
    assert (df.width == 16).all()

    stamp = [p.stat().st_mtime_ns for p in pngs]
    assert write_digits_folder(tmp_path, size=16, limit_per_class=3) == root
    assert [p.stat().st_mtime_ns for p in pngs] == stamp  # idempotent: nothing rewritten
    with pytest.raises(ValueError, match="another root"):
        write_digits_folder(tmp_path, size=32, limit_per_class=3)

    ds = ImageDataset.from_manifest(df, "valid", eval_transform(TransformSpec(size=16)))
    x, y = ds[0]
    assert len(ds) == 10 and x.shape == (3, 16, 16) and y == 0
    assert ImageDataset(ds.paths, None, ds.transform)[3][1] == -1
