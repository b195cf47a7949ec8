"""Shared fixtures (issue 20: no test module imports another one's fixtures) and the test tiers.

Tiers: ``make test`` runs every test (CI). ``make test-fast`` deselects ``@pytest.mark.slow``: the
files in ``SLOW_FILES`` and the tests marked one by one; README.md ("Tests") says what each holds.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import sys
import unicodedata
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))

# --------------------------------------------------------------------------- the slow tier

# Whole files: minutes each on 2 CPU cores, or services started for them.
SLOW_FILES = {
    "test_accuracy.py",            # the dogscats recipe, trained for minutes
    "test_production.py",          # PostgreSQL, moto's S3 and an MLflow server on 127.0.0.1
    "test_production_faults.py",   # the same stack, killed and restarted mid-run
    "test_ui_browser.py",          # dagster dev and the MLflow UI driven by headless Chromium
    "test_dask_shards.py",         # Dask LocalCluster drills (a worker killed mid-shard)
    "test_notebook.py",            # examples/lesson1.ipynb executed on the dogscats photos
    "test_quiet.py",               # make demo from a path with a space
}
# Single tests of otherwise fast files: the whole recipe, or training on real photos.
SLOW_TESTS = {
    "test_pipeline.py::test_whole_recipe_materializes",
    "test_leaderboard.py::test_leaderboard_over_two_partitions",
    "test_rerun.py::test_run_logs_what_reruns_it_and_rerun_reproduces_metrics",
    "test_multilabel.py::test_multilabel_recipe_end_to_end",
    "test_serving.py::test_registered_pyfunc_predicts_as_precompute_predict",
    "test_readme_demo.py::test_readme_demo_table_matches_make_demo",  # make demo on the digits
    # the slowest of the rest (8-36 s each on the shared machine): a sharded run in subprocesses, the
    # sweep asset with its MLflow children, Dagster repairing a damaged cache, gc racing a writer, a
    # full disk, two writers of one partition
    "test_sharding.py::test_two_shards_equal_one",
    "test_sweep.py::test_head_sweep_asset_tracks_children_and_reuses",
    "test_cache_faults.py::test_dagster_rerun_repairs_deleted_blocks_and_the_head_sees_the_same_rows",
    "test_cache_faults.py::test_gc_during_a_write_loses_nothing",
    "test_cache_faults.py::test_full_disk_leaves_no_temp_files_and_reads_go_on",
    "test_store_durability.py::test_two_concurrent_writers_of_one_partition",
}

# test_archs.py builds every arch of the cut table: the fast tier keeps one of each family that
# builds in seconds (the default, resnets, mobilenet, efficientnet); the big ones (densenets,
# resnet50 and up, resnexts, VGG, inception, convnext: up to 2 minutes each on a busy machine) are slow.
FAST_ARCHS = {"tf_efficientnet_lite0", "resnet18", "resnet34", "mobilenet_v3_large", "efficientnet_b0"}


def _slow(item) -> bool:
    if item.path.name in SLOW_FILES or f"{item.path.name}::{item.originalname}" in SLOW_TESTS:
        return True
    arch = getattr(item, "callspec", None) and item.callspec.params.get("name")
    return item.path.name == "test_archs.py" and isinstance(arch, str) and arch not in FAST_ARCHS


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.slow`` on the tests above (a test may carry the marker itself too):
    ``make test-fast`` runs ``-m "not slow"``, ``make test`` runs everything."""
    for item in items:
        if _slow(item):
            item.add_marker(pytest.mark.slow)

PROJECT = Path(__file__).resolve().parents[1]
DOGSCATS = PROJECT.parent / "shared" / "data" / "dogscats"


@pytest.fixture(scope="session")
def dogscats() -> Path:
    if not (DOGSCATS / "train").is_dir():
        pytest.skip(f"real photos not found at {DOGSCATS} (the shared data folder beside the project)")
    return DOGSCATS


def copy_tree(src: Path, dst: Path, per_class: dict[str, int]) -> Path:
    """A small ImageNet-style tree with the first n photos of each split/class of ``src``."""
    for split, n in per_class.items():
        for cls_dir in sorted((src / split).iterdir()):
            out = dst / split / cls_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                shutil.copy(f, out / f.name)
    return dst


@pytest.fixture
def tiny_tree(tmp_path, dogscats) -> Path:
    """8 train and 4 valid photos per class, copied into a temporary folder."""
    return copy_tree(dogscats, tmp_path / "images", {"train": 8, "valid": 4})


@pytest.fixture(scope="session")
def endpoint():
    """moto's S3 server on 127.0.0.1 (a free port), with test credentials; stopped at the end."""
    moto_server = pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE",
                     "AWS_SHARED_CREDENTIALS_FILE", "PRECOMPUTE_DATA_OPTIONS"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def bucket(endpoint):
    """A fresh bucket per test: (name, boto3 client, fsspec storage_options)."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=name)
    return name, client, {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}


# --------------------------------------------------------------------------- awkward inputs (test_bad_inputs, test_scan_index)

needs_photos = pytest.mark.skipif(not (DOGSCATS / "train").is_dir(), reason=f"real photos not found at {DOGSCATS}")
BAD_NAME = b"caf\xe9.jpg"  # latin-1 bytes: not UTF-8
BAD_CLASS = b"chi\xe9ns"


def photos(split: str, cls: str, n: int) -> list[Path]:
    return sorted((DOGSCATS / split / cls).glob("*.jpg"))[:n]


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims width x height: what a decompression bomb looks like to a reader."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over chunk type + data
    path.write_bytes(bytes(data))
    return path


def bytes_path(folder: Path, *names: bytes) -> bytes:
    return os.path.join(os.fsencode(folder), *names)


def can_use_bytes_names(folder: Path) -> bool:
    try:
        probe = bytes_path(folder, b"probe\xe9")
        open(probe, "wb").close()
        os.remove(probe)
        return True
    except OSError:
        return False


# Files opened while recording: proves that a path outside the root is never read.
_opened: list[str] | None = None


def _audit(event: str, args) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # process-wide and permanent; it only records inside `opened_files`


@contextmanager
def opened_files():
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """~10 real photos and every kind of awkward input together; (root, outside, expected status per relpath)."""
    base = tmp_path_factory.mktemp("bad_inputs")
    root, outside = base / "data", base / "outside"
    outside.mkdir()
    expected: dict[str, str] = {}

    def put(rel: str, status: str) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        expected[rel] = status
        return p

    cats, dogs = photos("train", "cats", 4), photos("train", "dogs", 6)
    for src in cats[:2]:
        shutil.copy(src, put(f"train/cats/{src.name}", "ok"))
    for src in dogs[:2]:
        shutil.copy(src, put(f"train/dogs/{src.name}", "ok"))
    for cls in ("cats", "dogs"):
        src = photos("valid", cls, 1)[0]
        shutil.copy(src, put(f"valid/{cls}/{src.name}", "ok"))
    # unicode names (NFC and NFD), spaces, emoji, a unicode sub-folder
    shutil.copy(cats[2], put(unicodedata.normalize("NFC", "train/cats/chat é 猫 🐱.jpg"), "ok"))
    shutil.copy(dogs[3], put(unicodedata.normalize("NFD", "train/dogs/Ünïcödé/chien.JPG"), "ok"))
    # a folder symlink that stays inside the root is followed (and its loop is not)
    extra = root / "extra_cats"
    extra.mkdir(parents=True)
    shutil.copy(cats[3], extra / cats[3].name)
    os.symlink("../../extra_cats", root / "train/cats/more")
    expected[f"train/cats/more/{cats[3].name}"] = "ok"
    os.symlink("..", root / "train/cats/more_loop")
    # odd but valid formats
    rgba = np.zeros((30, 50, 4), np.uint8)
    rgba[:, :25] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(put("train/dogs/alpha.png", "ok"))
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(put("train/cats/gray16.png", "ok"))
    Image.new("CMYK", (33, 22), (0, 255, 255, 0)).save(put("valid/cats/cmyk.jpg", "ok"))
    pal = Image.new("P", (24, 12), 0)
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.save(put("valid/dogs/palette.gif", "ok"), transparency=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.open(dogs[2]).save(put("train/dogs/rotated.jpg", "ok"), exif=exif)

    # unusable files: each a row with a reason
    put("train/cats/empty.jpg", "empty").write_bytes(b"")
    whole = cats[0].read_bytes()
    put("train/cats/truncated.jpg", "unreadable").write_bytes(whole[: len(whole) // 3])
    put("train/dogs/notes.jpg", "not_image").write_text("not a JPEG\n")
    put("train/dogs/IMG_0001.HEIC", "not_image").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))  # no HEIC codec
    png_declaring(put("train/dogs/bomb.png", "too_large"), 100_000, 100_000)
    side = int(Image.MAX_IMAGE_PIXELS ** 0.5) + 1  # just above the limit: PIL itself only warns
    png_declaring(put("train/cats/just_over.png", "too_large"), side, side)
    shutil.copy(cats[0], outside / "secret.jpg")
    (outside / "folder").mkdir()
    shutil.copy(cats[1], outside / "folder" / "secret2.jpg")
    put("train/cats/link_out.jpg", "outside_root").symlink_to(outside / "secret.jpg")
    (root / "train/dogs/linked_out").symlink_to(outside / "folder")
    expected["train/dogs/linked_out/"] = "outside_root"
    put("train/cats/broken.jpg", "missing").symlink_to(root / "train/cats/gone.jpg")
    os.mkfifo(put("train/cats/pipe.jpg", "unreadable"))
    shutil.copy(cats[0], put("train/stray.jpg", "unknown_label"))
    (root / "train/birds").mkdir()
    (root / "train/birds/readme.txt").write_text("to do: add birds")
    expected["train/birds/"] = "empty_class"
    shutil.copy(photos("valid", "cats", 2)[1], put("valid/foxes/fox.jpg", "unseen_class"))
    shutil.copy(dogs[5], put("train/cats/confused.jpg", "conflicting_label"))
    shutil.copy(dogs[5], put("train/dogs/confused.jpg", "conflicting_label"))
    if can_use_bytes_names(root):
        with open(bytes_path(root, b"train/cats", BAD_NAME), "wb") as f:
            f.write(cats[0].read_bytes())
        os.makedirs(bytes_path(root, b"train", BAD_CLASS))
        shutil.copy(dogs[0], bytes_path(root, b"train", BAD_CLASS, b"dog.jpg"))
        expected["train/cats/caf\\xe9.jpg"] = expected["train/chi\\xe9ns/dog.jpg"] = "bad_name"
    # not images: skipped without a row (counted in the log)
    (root / "train/cats/readme.txt").write_text("notes")
    (root / "train/cats/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root, outside, expected


# --------------------------------------------------------------------------- the embedded Dagster + MLflow

@pytest.fixture
def env(tmp_path, tiny_tree, monkeypatch):
    """(resources, a Dagster instance in a temp folder, an MLflow sqlite URI, tmp_path) over ``tiny_tree``."""
    import dagster as dg

    from resources import ActivationStoreResource, ComputeDevice, ImageSource, MlflowTracking

    monkeypatch.setenv("PRECOMPUTE_HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resources = {"images": ImageSource(source=str(tiny_tree)),
                 "store": ActivationStoreResource(root=str(tmp_path / "store")),
                 "tracking": MlflowTracking(tracking_uri=uri, artifact_root=str(tmp_path / "artifacts")),
                 "compute": ComputeDevice(device="auto")}
    (tmp_path / "dagster_home").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster_home"))
    yield resources, instance, uri, tmp_path
    instance.dispose()


# --------------------------------------------------------------------------- the production stack (test_production*)

@pytest.fixture(scope="session")
def stack():
    """PostgreSQL, moto S3 and the MLflow server on 127.0.0.1, once for the session."""
    from tests.services import shared_stack

    started = shared_stack()
    yield started
    started.__exit__(None, None, None)


@pytest.fixture
def prod(stack, tmp_path, tiny_tree, monkeypatch):
    """A Dagster instance on the stack's PostgreSQL, this test's photos in the bucket, resources on S3
    and the MLflow server (a ``tests.services.Prod``)."""
    import json

    import dagster as dg

    from resources import ActivationStoreResource, ComputeDevice, ImageSource, MlflowTracking
    from tests.services import Prod, Stack, aws_env, upload_folder

    tag = uuid.uuid4().hex[:10]
    options = json.dumps(stack.s3.storage_options())
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**aws_env(stack.s3.endpoint), "DAGSTER_PG_PASSWORD": stack.postgres.password,
                        "PRECOMPUTE_HOME": str(tmp_path / "home"), "PRECOMPUTE_DATA_OPTIONS": options}.items():
        monkeypatch.setenv(name, value)
    upload_folder(stack.s3.client(), Stack.BUCKET, f"{tag}/images", tiny_tree)
    resources = {"images": ImageSource(source=f"s3://{Stack.BUCKET}/{tag}/images/", storage_options_json=options),
                 "store": ActivationStoreResource(root=f"s3://{Stack.BUCKET}/{tag}/activations",
                                                  storage_options_json=options),
                 "tracking": MlflowTracking(tracking_uri=stack.mlflow.url, experiment=f"production-{tag}"),
                 "compute": ComputeDevice(device="cpu")}
    home = stack.write_dagster_home(tmp_path / "dagster_home")
    instance = dg.DagsterInstance.from_config(str(home))
    yield Prod(stack, instance, resources, home, tag, f"production-{tag}", tiny_tree)
    instance.dispose()


# --------------------------------------------------------------------------- make demo in a copy (test_quiet, test_readme_demo)

PROJECT_SOURCES = ("Makefile", "pyproject.toml", "workspace.yaml", "precompute.yaml", "precompute", "assets",
                   "resources", "pipelines", "scripts")


def project_copy(parent: Path) -> Path:
    """The project's sources in ``parent/my project``, sharing this checkout's installed .venv."""
    stamp = PROJECT / ".venv" / ".installed"
    if not stamp.exists():
        pytest.skip("no installed .venv (make creates it): nothing to share with the copy")
    folder = parent / "my project"
    folder.mkdir()
    for name in PROJECT_SOURCES:
        src = PROJECT / name
        if src.is_dir():
            shutil.copytree(src, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, folder / name)
    (folder / ".venv").symlink_to(PROJECT / ".venv")
    t = stamp.stat().st_mtime - 1  # older than the install stamp: make does not reinstall
    os.utime(folder / "pyproject.toml", (t, t))
    return folder
