"""Storage dtypes of the activation cache: float32, float16, and bfloat16 kept as its bit pattern.

Zarr (and numpy) have no bfloat16, so a bfloat16 entry stores each value's upper 16 bits (the bits
bfloat16 keeps of a float32) as ``uint16``; the key says ``bfloat16``, so the entry's folder and every
chunk's ``key`` attribute tell a reader how to decode: ``(bits.astype(uint32) << 16).view(float32)``.
``encode`` rounds float32 to nearest even, as torch does, and ``decode`` gives float32 back; the
store's reads decode, so callers see float32 for bfloat16 entries and the stored dtype otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the store works without torch (housekeeping, the CLI): only the writers need it
    import torch

STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype the files hold for a key's ``dtype``; ValueError names the supported ones."""
    try:
        return np.dtype(STORAGE[dtype])
    except KeyError:
        raise ValueError(f"storage dtype {dtype!r}: the activation store keeps {', '.join(STORAGE)}") from None


def itemsize(dtype: str) -> int:
    return storage_dtype(dtype).itemsize


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` as the C-contiguous array the store writes for ``dtype``. For bfloat16, float input is
    rounded to nearest even (NaN stays NaN) and uint16 input is taken as bfloat16 bits already."""
    want = storage_dtype(dtype)
    if dtype != "bfloat16" or np.asarray(x).dtype == np.uint16:
        return np.ascontiguousarray(x, dtype=want)
    f = np.ascontiguousarray(x, dtype=np.float32)
    u = f.view(np.uint32)
    bits = ((u + (((u >> 16) & 1) + 0x7FFF).astype(np.uint32)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():  # the rounding carry would turn some NaN patterns into infinities
        bits[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return bits


def decode(x: np.ndarray, dtype: str) -> np.ndarray:
    """What a reader gets: float32 for a bfloat16 entry's bits, the stored array otherwise."""
    if dtype != "bfloat16":
        return x
    return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def from_torch(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """An output tensor converted for storage on its own device (a GPU halves the copy to the host for
    16-bit dtypes); bfloat16 comes out as int16 holding the bits (``numpy().view(uint16)`` on the host)."""
    import torch

    out = t.to(getattr(torch, dtype))
    return out.view(torch.int16) if dtype == "bfloat16" else out


def to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A host tensor from ``from_torch`` as the array the store writes."""
    arr = t.numpy()
    return arr.view(np.uint16) if dtype == "bfloat16" else arr
