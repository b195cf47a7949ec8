"""The cut table on real (randomly initialised) models: cutting, layer groups, freezing."""
from functools import cache

import pytest
import torch
from torch import nn

from precompute.archs import (ARCHS, DEFAULT_ARCH, body_output_shape, cut_body, describe_groups, freeze_to,
                              get_arch, layer_groups, max_xtra_cut, set_frozen_bn_eval, unfreeze)


SIZE = 64  # small inputs keep 19 backbones fast on 2 CPU cores; every arch reaches >= 2x2 at stride 32
MIN_SIZE = {"inception_v3": 107}  # its unpadded stem needs >= 75 px; 107 reaches 2x2 at Mixed_7c


def size(name: str) -> int:
    return max(SIZE, MIN_SIZE.get(name, 0))


@cache
def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHS[name].build().eval()


@cache
def out_shape(name: str, xtra_cut: int = 0) -> tuple[int, int, int]:
    return body_output_shape(cut_body(model(name), ARCHS[name], xtra_cut), size(name))


def head_for(name: str, xtra_cut: int = 0) -> nn.Module:
    c = out_shape(name, xtra_cut)[0]
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 2))


def bns(m: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", ARCHS)
def test_cut_body_children_and_shapes(name):
    spec, m = ARCHS[name], model(name)
    post = spec.post is not None
    body0, body1 = cut_body(m, spec), cut_body(m, spec, xtra_cut=1)
    assert len(body0) == spec.cut + post
    assert len(body1) == spec.cut - 1
    assert all(a is b for a, b in zip(body1, spec.children(m)))  # shares the model's modules, in order
    x = torch.randn(1, 3, size(name), size(name))
    with torch.no_grad():
        y0, y1 = body0(x), body1(x)
    s0, s1 = out_shape(name), out_shape(name, 1)
    assert (s0, s1) == (y0.shape[1:], y1.shape[1:]) and min(s0) >= 1
    # xtra_cut=1 ends one child earlier: a different shape, or (densenet norm5, lite0 bn2,
    # convnext's last downsample) the same shape with different numbers.
    assert s0 != s1 or not torch.allclose(y0, y1)


def test_resnet34_matches_fastai_model_meta():
    spec, m = get_arch("resnet34"), model("resnet34")
    assert (spec.cut, spec.lr_cut) == (8, 6)  # fastai model_meta[resnet34] = [8, 6]
    body = cut_body(m, spec)
    assert [n for n, _ in body.named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert body_output_shape(body, 224) == (512, 7, 7)
    groups = layer_groups(body, head_for("resnet34"), spec)
    assert groups[1][0] is m.layer3


@pytest.mark.parametrize("name", ["resnext101_32x8d", "densenet161", "densenet201", "inception_v3"])
def test_fastai_model_meta_additions(name):
    spec, m = get_arch(name), model(name)
    body = cut_body(m, spec)
    names = [n for n, _ in body.named_children()]
    groups = layer_groups(body, nn.Identity(), spec)
    if name.startswith("resnext"):  # fastai model_meta[resnext101] = [8, 6]
        assert (spec.cut, spec.lr_cut) == (8, 6) and names[-1] == "layer4" and groups[1][0] is m.layer3
    elif name.startswith("densenet"):  # fastai model_meta[dn161/dn201] = [0, 7] on .features
        assert (spec.cut, spec.lr_cut) == (12, 7) and names[-2:] == ["features_norm5", "post"]
        assert groups[1][0] is m.features.transition2
    else:  # no fastai row: cut before avgpool/dropout/fc, group 1 from the 17x17 stage
        assert (spec.cut, spec.lr_cut, spec.input_size) == (18, 10, 299)
        assert spec.mean == spec.std == (0.5, 0.5, 0.5) and not m.transform_input
        assert names[0] == "Conv2d_1a_3x3" and names[-1] == "Mixed_7c" and "AuxLogits" not in names
        assert groups[1][0] is m.Mixed_6a
        assert body_output_shape(body, 299) == (2048, 8, 8)
        assert hasattr(m, "AuxLogits")  # kept in the model so the torchvision checkpoint loads strictly


def test_default_arch_is_lite0_split_inside_blocks():
    spec = get_arch(DEFAULT_ARCH)
    assert spec.name == "tf_efficientnet_lite0" and spec.mean == spec.std == (0.5, 0.5, 0.5)
    body = cut_body(model(DEFAULT_ARCH), spec)
    g = describe_groups(layer_groups(body, nn.Identity(), spec))
    assert g[0]["layers"][-1].startswith("blocks_3") and g[1]["layers"][0].startswith("blocks_4")


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("xtra_cut", [0, 1, "max"])
def test_layer_groups_partition_body(name, xtra_cut):
    spec, m = ARCHS[name], model(name)
    xtra_cut = max_xtra_cut(spec) if xtra_cut == "max" else xtra_cut
    body = cut_body(m, spec, xtra_cut)
    head = nn.Linear(1, 2)  # stands in for any head: only identity and parameters matter here
    groups = layer_groups(body, head, spec, xtra_cut)
    assert len(groups) == 3 and groups[2] is head
    assert len(groups[0]) >= 1 and len(groups[1]) >= 1
    owner = {}
    for i, g in enumerate(groups[:2]):
        for p in g.parameters():
            assert id(p) not in owner, "a parameter is in two groups"
            owner[id(p)] = i
    assert set(owner) == {id(p) for p in body.parameters()}
    info = describe_groups(groups, lrs=[1e-4, 1e-3, 1e-2])
    assert [d["index"] for d in info] == [0, 1, 2] and [d["lr"] for d in info] == [1e-4, 1e-3, 1e-2]
    assert sum(d["n_params"] for d in info[:2]) == sum(p.numel() for p in body.parameters())


@pytest.mark.parametrize("name", ARCHS)
def test_freeze_unfreeze_and_frozen_bn_stays_eval(name):
    spec, m = ARCHS[name], model(name)
    body = cut_body(m, spec)
    head = head_for(name)
    groups = layer_groups(body, head, spec)
    try:
        freeze_to(groups, 2)
        assert [d["trainable"] for d in describe_groups(groups)] == [False, False, True]
        assert not any(p.requires_grad for p in body.parameters())
        unfreeze(groups)
        assert all(p.requires_grad for g in groups for p in g.parameters())

        net = nn.Sequential(body, head)
        for n in (2, -2):  # -2 == 1: group 0 frozen, group 1 and the head train
            freeze_to(groups, n)
            assert [d["trainable"] for d in describe_groups(groups)] == [False, n == -2, True]
            net.train()
            set_frozen_bn_eval(groups)
            frozen = [b for g in groups if not describe_groups([g])[0]["trainable"] for b in bns(g)]
            live = bns(groups[1]) if n == -2 else []
            before = [b.running_mean.clone() for b in frozen + live]
            with torch.no_grad():  # BatchNorm statistics update without autograd; much faster on CPU
                net(torch.randn(2, 3, size(name), size(name)))
            assert all(not b.training for b in frozen) and all(b.training for b in live)
            after = [b.running_mean for b in frozen + live]
            assert all(torch.equal(a, b) for a, b in zip(before[:len(frozen)], after[:len(frozen)]))
            if live:  # the check can fail: trainable BatchNorm does update its statistics
                assert not all(torch.equal(a, b) for a, b in zip(before[len(frozen):], after[len(frozen):]))
    finally:
        unfreeze(groups)
        m.eval()


def test_freeze_to_out_of_range():
    groups = [nn.Linear(1, 1) for _ in range(3)]
    freeze_to(groups, 3)  # everything frozen is allowed
    assert not any(p.requires_grad for g in groups for p in g.parameters())
    for n in (4, -4):
        with pytest.raises(ValueError, match=r"-3\.\.3"):
            freeze_to(groups, n)


def test_unknown_arch_lists_known_names():
    with pytest.raises(ValueError, match="unknown arch 'resnet35'.*resnet34"):
        get_arch("resnet35")


@pytest.mark.parametrize("bad", [-1, "max+1"])
def test_out_of_range_xtra_cut_says_valid_range(bad):
    spec = get_arch("resnet18")
    bad = max_xtra_cut(spec) + 1 if bad == "max+1" else bad
    assert max_xtra_cut(spec) == 6
    with pytest.raises(ValueError, match=r"valid is 0\.\.6"):
        cut_body(model("resnet18"), spec, bad)


def test_torchvision_weights_are_named_as_torchvision_names_them():
    """The cut table names each torchvision arch's weights (so it reads without torchvision, issue 20);
    the name is part of the cache key, so it must be torchvision's own."""
    import torchvision

    from precompute.archs import ARCHS

    for spec in ARCHS.values():
        if spec.source == "torchvision":
            assert spec.weights == str(torchvision.models.get_model_weights(spec.name).IMAGENET1K_V1), spec.name
