"""The GPU path's CPU-side logic: the decoder in the cache key, the per-image fallbacks of the device
decoder (run here with torchvision's CPU decoder, the same calls), bfloat16 storage, the precompute
loop's batching, and benchmarks/gpu_check.py saying it skips without CUDA."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from precompute.features import DeviceDecoder, DeviceFeed, _collate, _Isolated, check_decoder, compute_activations
from precompute.images import device_decodable
from precompute.store import ActivationStore, CacheKey
from precompute.store import dtypes
from precompute.train import ConfigError
from precompute.transforms import EncodedImageDataset, ImageDataset, TransformSpec, eval_transform

ROOT = Path(__file__).resolve().parents[1]
TS = TransformSpec(size=32)


def key(**kw) -> CacheKey:
    return CacheKey(**{"arch": "tiny", "weights_id": "w", "xtra_cut": 0, "cut_index": 2, "transform": TS,
                       "versions": {"torch": "x"}, **kw})


@pytest.fixture
def odd_images(tmp_path, dogscats) -> dict[str, Path]:
    """One photo of each kind the device decoder takes or leaves to the CPU, and a broken JPEG."""
    src = sorted(dogscats.glob("train/cats/*.jpg"))[0]
    img = Image.open(src).convert("RGB")
    out = {"jpeg": tmp_path / "rgb.jpg", "png": tmp_path / "rgb.png", "grey": tmp_path / "grey.jpg",
           "cmyk": tmp_path / "cmyk.jpg", "rotated": tmp_path / "rotated.jpg", "broken": tmp_path / "broken.jpg"}
    shutil.copy(src, out["jpeg"])
    img.save(out["png"])
    img.convert("L").save(out["grey"], quality=90)
    img.convert("CMYK").save(out["cmyk"], quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: torchvision applies EXIF orientation on the CPU only
    img.save(out["rotated"], quality=90, exif=exif)
    data = src.read_bytes()
    out["broken"].write_bytes(data[:len(data) // 2])  # the header parses, the scan data ends early
    return out


def test_decoder_is_part_of_the_key_and_the_default_key_is_unchanged():
    pil, nvjpeg = key(), key(decoder="nvjpeg")
    assert pil.digest() != nvjpeg.digest() and pil.rel() != nvjpeg.rel()
    # entries made before the decoder existed have no "decoder" part: the default leaves it out, so they keep
    # their digest, and their key.json reads back as decoder pil
    assert "decoder" not in pil.parts() and nvjpeg.parts()["decoder"] == "nvjpeg"
    assert set(pil.parts()) == {"arch", "weights_id", "xtra_cut", "cut_index", "transform", "pooled", "dtype", "versions"}
    assert CacheKey.from_parts(pil.parts()) == pil and CacheKey.from_parts(nvjpeg.parts()).decoder == "nvjpeg"
    assert key(dtype="bfloat16").digest() not in (pil.digest(), key(dtype="float16").digest())


def test_nvjpeg_without_cuda_is_a_config_error_before_any_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nvjpeg is allowed here")
    with pytest.raises(ConfigError, match="nvjpeg.*no CUDA device.*decoder: pil"):
        check_decoder("nvjpeg", "cpu")
    with pytest.raises(ConfigError, match="choose one of pil, nvjpeg"):
        check_decoder("turbo", "cpu")
    check_decoder("pil", "cpu")
    store = ActivationStore(str(tmp_path / "store"))
    entry = store.entry(key(decoder="nvjpeg"))
    with pytest.raises(ConfigError, match="nvjpeg"):
        compute_activations(nn.Identity(), pd.DataFrame({"image_id": ["ab"], "path": ["nowhere.jpg"]}),
                            eval_transform(TS), entry)
    assert len(entry) == 0 and not list((tmp_path / "store").rglob("leases/*.json"))


def test_activations_asset_with_nvjpeg_and_no_cuda_fails_before_any_work(tmp_path, dogscats):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nvjpeg is allowed here")
    import dagster as dg

    from assets import activations, image_manifest
    from resources import ActivationStoreResource, ComputeDevice, ImageSource
    from tests.conftest import copy_tree

    images = copy_tree(dogscats, tmp_path / "images", {"train": 2, "valid": 1})
    store = tmp_path / "store"
    result = dg.materialize(
        [image_manifest, activations], partition_key="tf_efficientnet_lite0|0", raise_on_error=False,
        resources={"images": ImageSource(source=str(images)), "store": ActivationStoreResource(root=str(store)),
                   "compute": ComputeDevice(device="auto")},
        run_config={"ops": {"activations": {"config": {"size": 64, "decoder": "nvjpeg"}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    assert "decoder 'nvjpeg'" in failure.error.message and "set decoder: pil" in failure.error.message
    assert not list(store.glob("*/cut=*"))  # no entry: nothing was computed or written


def test_device_decoder_takes_plain_jpegs_and_falls_back_per_image(odd_images):
    kinds = {k: device_decodable(p.read_bytes()) for k, p in odd_images.items()}
    assert kinds["jpeg"] is None and kinds["broken"] is None  # the broken one's header is fine
    assert "not a JPEG" in kinds["png"] and "L JPEG" in kinds["grey"] and "CMYK JPEG" in kinds["cmyk"]
    assert "EXIF orientation" in kinds["rotated"]

    names = list(odd_images)
    paths = [str(odd_images[k]) for k in names]
    tf = eval_transform(TS)
    batch = _collate([_Isolated(EncodedImageDataset(paths, tf))[i] for i in range(len(paths))])
    # plain JPEGs travel as bytes; the rest were decoded on the CPU already
    assert [names[i] for i in batch.jpeg_index] == ["jpeg", "broken"]
    assert [names[i] for i in batch.pixel_index] == ["png", "grey", "cmyk", "rotated"] and not batch.bad
    assert batch.pixels.shape == (4, 3, 32, 32) and batch.jpegs[0].dtype == torch.uint8

    decoder = DeviceDecoder(tf, "cpu")  # torchvision's CPU decoder: the calls and fallbacks of the CUDA one
    decoded = decoder.decode(batch.jpegs)  # the batch fails as a whole, then image by image
    assert isinstance(decoded[0], torch.Tensor) and isinstance(decoded[1], RuntimeError)
    good, x, bad = decoder(batch.jpeg_index, batch.jpegs, paths)
    assert [names[i] for i in good] == ["jpeg"] and x.shape == (1, 3, 32, 32) and type(x) is torch.Tensor
    assert [names[i] for i, _ in bad] == ["broken"] and "truncated" in bad[0][1]  # PIL tried it too
    assert decoder.fallbacks == 1
    # the same photo through PIL: the same pixels up to the resize's rounding (a tensor resize, not PIL's)
    ref = ImageDataset([paths[0]], None, tf)[0][0]
    assert (x[0] - ref).abs().mean() < 2e-3


def test_bfloat16_bits_round_like_torch_and_decode_to_float32():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(scale=10, size=4000).astype(np.float32),
                        np.array([0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 3.3895e38, 1 + 2**-8, 1 + 3 * 2**-8],
                                 np.float32)])
    bits = dtypes.encode(x, "bfloat16")
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits[~np.isnan(x)], want[~np.isnan(x)])  # round to nearest even, as torch
    back = dtypes.decode(bits, "bfloat16")
    assert back.dtype == np.float32 and np.isnan(back[np.isnan(x)]).all()
    finite = np.isfinite(x) & (np.abs(x) > 1e-30)
    assert np.max(np.abs(back[finite] - x[finite]) / np.abs(x[finite])) <= 2**-8
    assert dtypes.encode(bits, "bfloat16") is not None and np.array_equal(dtypes.encode(bits, "bfloat16"), bits)
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        dtypes.storage_dtype("int8")


def test_precompute_loop_mixed_images_and_bfloat16_storage(tmp_path, odd_images):
    """The CPU path end to end over every kind of file, several batches and chunks; a bfloat16 entry
    holds the float32 entry's rows to bfloat16's precision and reads back as float32."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
    names = list(odd_images)
    manifest = pd.DataFrame({"image_id": [hashlib.sha256(odd_images[k].read_bytes()).hexdigest() for k in names],
                             "path": [str(odd_images[k]) for k in names]})
    store = ActivationStore(str(tmp_path / "store"))
    entries = {}
    for dtype in ("float32", "bfloat16"):
        entry = entries[dtype] = store.entry(key(dtype=dtype))
        stats = compute_activations(body, manifest, eval_transform(TS), entry, batch_size=2, chunk_rows=3)
        assert stats.computed == 5 and [Path(p).name for _, p, _ in stats.failed] == ["broken.jpg"]
        assert stats.chunks == 2  # 5 rows in chunks of 3: the loop's one-batch-late hand-off loses none
    ids = [i for i, n in zip(manifest["image_id"], names) if n != "broken"]
    f32, b16 = entries["float32"].read(ids), entries["bfloat16"].read(ids)
    assert f32.shape == (5, 16) and b16.dtype == np.float32
    np.testing.assert_allclose(b16, f32, rtol=2**-8, atol=1e-6)
    blocks = [b for _, b in entries["bfloat16"].iter_blocks(ids)]
    assert all(b.dtype == np.float32 for b in blocks)
    folder = tmp_path / "store" / entries["bfloat16"].rel  # bfloat16's bits as uint16; the key says how to read them
    assert json.loads(next((folder / "chunks").rglob("zarr.json")).read_text())["data_type"] == "uint16"
    assert json.loads((folder / "key.json").read_text())["dtype"] == "bfloat16"
    feed = DeviceFeed("cpu")  # on the CPU the feed is a pass-through
    x = torch.ones(2)
    assert feed.to_device(x) is x and feed.to_host(x).result() is x


def test_gpu_check_says_it_skips_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA here: gpu_check would run for minutes")
    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "no CUDA device" in run.stdout and "skipped" in run.stdout
