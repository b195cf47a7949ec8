"""``TransformSpec``: everything that determines the pixels fed to the network.

Part of the activation cache's key (``precompute.store.CacheKey``), so it lives in the core layer
and imports no torch: the store and its CLI read keys without loading torchvision. The transforms
that apply it are ``precompute.transforms``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

# torchvision's InterpolationMode values (tests/test_records_task.py checks the two agree)
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class TransformSpec:
    """Everything that determines the pixels fed to the network (part of the cache key)."""

    size: int = 224
    resize: int | None = None  # shorter side before the crop; None -> int(size * 256 / 224), 256 for 224
    crop: str = "center"  # "center" | "none" (squish the whole image to size x size)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self):
        # Lists from configs become tuples so the spec stays hashable and its key stable.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.crop not in ("center", "none"):
            raise ValueError(f"crop must be 'center' or 'none', got {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        if self.size <= 0 or (self.resize is not None and self.resize < self.size):
            raise ValueError(f"need 0 < size <= resize, got size={self.size} resize={self.resize}")

    @property
    def resize_to(self) -> int:
        # torchvision's 256/224 ratio; fastai's 1.14 gives int(224 * 1.14) == 255 in floating point
        return self.resize if self.resize is not None else int(self.size * 256 / 224)

    @property
    def interpolation_mode(self):
        """torchvision's ``InterpolationMode`` of ``interpolation`` (torchvision loaded here, not with the spec)."""
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)

    def resolved(self) -> "TransformSpec":
        """The same pixels with ``resize`` spelled out, as ``key()`` holds it: the form a cache key
        keeps, so a spec and the one read back from a key.json compare equal."""
        return self if self.resize is not None else replace(self, resize=self.resize_to)

    def key(self) -> dict:
        """JSON-able dict of every field; resize is resolved so equivalent specs share a key."""
        d = asdict(self)
        d.update(resize=self.resize_to, mean=list(self.mean), std=list(self.std))
        return d

    @classmethod
    def for_arch(cls, spec, size: int | None = None, **overrides) -> "TransformSpec":
        """Normalization and input size from an arch record (``mean``, ``std``, ``input_size``).

        ``input_size`` may be an int or a timm-style ``(C, H, W)`` tuple (square assumed).
        """
        default = spec.input_size if isinstance(spec.input_size, int) else spec.input_size[-1]
        fields = dict(size=size or default, mean=tuple(spec.mean), std=tuple(spec.std))
        return cls(**{**fields, **overrides})
