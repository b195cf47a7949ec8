"""Every stage setting, typed once: pydantic models with the choices (``Literal``), the bounds and
the rules that tie two settings together (precompute x augmentation, learning rates per layer group).

Both faces validate through these models, so one place decides what is valid:
- the Dagster ``Config`` classes (assets/, pipelines/) subclass them, so the launchpad shows each
  choice as an enum (a value outside it is refused when the run is launched), and the bounds and
  rules are checked when the step builds its config, before the asset's body runs;
- the library's runtime types (``train.Schedule``, ``train.FitOptions``, ``transforms.Augmentation``,
  ``heads.HeadConfig``, the stage records) check their values here when they are made.

A bad value is a ``ConfigError`` that names the setting, its value and what to give instead, every
problem at once. Pure pydantic: no torch, no Dagster, so the definitions load light.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Literal, Optional, Sequence, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from precompute.errors import ConfigError

N_LAYER_GROUPS = 3  # archs.layer_groups: body below lr_cut, body above, head

ScheduleName = Literal["one_cycle", "sgdr", "constant"]
Optimizer = Literal["adamw", "sgd"]  # sgd: with momentum, as fastai 0.7
AugmentationPreset = Literal["basic", "side_on", "top_down"]  # fastai 0.7's transforms_* presets
StorageDtype = Literal["float32", "float16", "bfloat16"]  # bfloat16 is stored as its bits
Decoder = Literal["pil", "nvjpeg"]  # pil on the CPU; nvjpeg: JPEGs decoded on the CUDA device
Weights = Literal["pretrained", "random"]
Search = Literal["grid", "random"]
Severity = Literal["WARN", "ERROR"]

# what each bound protects, said after "use N or more" (the message says what to do and why)
_WHY = {
    "batch_size": "BatchNorm cannot train on a batch of one",
    "max_zoom": "1 = no zoom, e.g. 1.1",
    "momentum": "e.g. 0.9",
    "weight_decay": "e.g. 1e-2",
    "label_smoothing": "e.g. 0.1",
    "early_stopping_patience": "epochs; or leave it unset to run every epoch",
    "chunk_rows": "rows per committed chunk",
    "size": "pixels; or leave it unset for the arch's own size",
}
_BOUNDS = {"greater_than_equal": ("ge", "use {} or more"), "greater_than": ("gt", "use a value above {}"),
           "less_than": ("lt", "use a value below {}"), "less_than_equal": ("le", "use {} or less")}


def _describe(error: dict) -> str:
    """One pydantic error as 'setting value: what to do'."""
    loc = [str(p) for p in error["loc"]]
    name = next((p for p in reversed(loc) if not p.isdigit()), "")
    where = ".".join(loc)
    ctx = error.get("ctx") or {}
    if error["type"] == "value_error":  # a rule below: its message already names the settings
        return str(ctx.get("error", error["msg"]))
    if error["type"] == "literal_error":
        choices = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        return f"{where} {error['input']!r}: choose one of {choices}"
    if error["type"] in _BOUNDS:
        key, text = _BOUNDS[error["type"]]
        why = f" ({_WHY[name]})" if name in _WHY else ""
        bound = ctx.get(key)
        return f"{where} {error['input']!r}: {text.format(f'{bound:g}' if isinstance(bound, float) else bound)}{why}"
    if error["type"] == "extra_forbidden":
        return f"{where}: no such setting; remove it (or check its spelling)"
    return f"{where} {error.get('input')!r}: {error['msg']}"


def problems(exc: ValidationError) -> list[str]:
    """Each problem pydantic found, as 'setting value: what to do' (a rule's own list flattened)."""
    found: list[str] = []
    for error in exc.errors():
        raised = (error.get("ctx") or {}).get("error")
        found += getattr(raised, "problems", None) or [_describe(error)]
    return found


def config_error(messages: Sequence[str]) -> ConfigError:
    """Every problem found, as one ConfigError (one line each when there are several); ``.problems``
    keeps the list, so errors from several checks merge into one (``all_checks``)."""
    found = list(dict.fromkeys(messages))
    if len(found) == 1:
        error = ConfigError(found[0])
    else:
        error = ConfigError(f"{len(found)} configuration errors, nothing was run:\n" + "\n".join(f"- {e}" for e in found))
    error.problems = found
    return error


def all_checks(*checks: Callable[[], object]) -> None:
    """Run every check; one ConfigError lists every problem they found (none: returns)."""
    found: list[str] = []
    for check in checks:
        try:
            check()
        except ConfigError as e:
            found += getattr(e, "problems", [str(e)])
    if found:
        raise config_error(found)


class Settings(BaseModel):
    """A stage's settings; ``checked`` builds one and raises ConfigError on a bad value."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def checked(cls, context: dict | None = None, **values: Any):
        try:
            return cls.model_validate(values, context=context)
        except ValidationError as exc:
            raise config_error(problems(exc)) from None


# --------------------------------------------------------------------------- rules shared by models


def check_precompute_augment(precompute: bool, augment: bool) -> None:
    if precompute and augment:
        raise ConfigError(
            "precompute=True with augment=True: cached activations are computed once from "
            "un-augmented images, so augmentation cannot apply to them. Set augment=False to "
            "train on the cache, or precompute=False to train on freshly augmented images.")


def lr_spec(lr, n_groups: int) -> float | tuple[float, float] | list[float]:
    """A learning-rate setting parsed: a number, a range (lo, hi) from ``"lo:hi"`` or a slice, or
    exactly ``n_groups`` numbers (one per layer group, earliest first)."""
    if isinstance(lr, str):
        try:
            lo, hi = (float(v) for v in lr.split(":"))
        except ValueError:
            raise ConfigError(f"learning-rate range {lr!r} must look like '1e-4:1e-2'") from None
        lr = slice(lo, hi)
    if isinstance(lr, slice):
        lo, hi = float(lr.start), float(lr.stop)
        if not 0 < lo <= hi:
            raise ConfigError(f"learning-rate range {lo}:{hi} needs 0 < lo <= hi")
        return lo, hi
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    try:
        lrs = [float(v) for v in lr]
    except (TypeError, ValueError):
        raise ConfigError(f"learning rate {lr!r}: give a number, a range 'lo:hi' or {n_groups} numbers") from None
    if len(lrs) != n_groups:
        raise ConfigError(f"{len(lrs)} learning rates given for {n_groups} layer groups; give one value, "
                          f"a range 'lo:hi', or exactly {n_groups} (one per group, earliest first)")
    return lrs


def check_lrs(lr, n_groups: int = N_LAYER_GROUPS, frozen: int = 0) -> None:
    """A usable learning-rate setting: each rate finite and >= 0, and some trainable group's above 0."""
    spec = lr_spec(lr, n_groups)
    if isinstance(spec, tuple):
        return  # a range: 0 < lo <= hi, every trainable group learns
    rates = [spec] if isinstance(spec, float) else spec
    if any(not math.isfinite(v) or v < 0 for v in rates):
        raise ConfigError(f"learning rates must be finite and >= 0, got {lr!r}")
    if not any(rates if isinstance(spec, float) else spec[frozen:]):
        raise ConfigError(f"every trainable layer group has learning rate 0 ({lr!r}): nothing would train; "
                          "give a rate > 0")


def check_head_shape(ps, xtra_fc: Sequence[int] | None) -> None:
    """fastai's head: hidden sizes >= 1, and one dropout in [0, 1) per linear block (len(xtra_fc) + 1)."""
    sizes = list(xtra_fc if xtra_fc is not None else [512])
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ConfigError(f"xtra_fc {sizes}: hidden layer sizes must be integers >= 1 (or [] for none)")
    if ps is None:
        return
    drops = [ps] if isinstance(ps, (int, float)) else list(ps)
    if not isinstance(ps, (int, float)) and len(drops) != len(sizes) + 1:
        raise ConfigError(f"ps has {len(drops)} dropout values for {len(sizes) + 1} linear blocks (xtra_fc={sizes} "
                          f"plus the output): give {len(sizes) + 1} values, one number, or none for fastai's defaults")
    if any(p is None or not 0 <= p < 1 for p in drops):
        raise ConfigError(f"ps {ps}: dropout probabilities must be in [0, 1)")


class BatchSettings(Settings):
    batch_size: int = Field(32, ge=2)


def check_batch_size(batch_size: int) -> None:
    BatchSettings.checked(batch_size=batch_size)


# --------------------------------------------------------------------------- training


class ScheduleSettings(Settings):
    """How the learning rate moves (train.Schedule): one_cycle and constant run ``epochs``; sgdr runs
    ``cycles`` cosine cycles, the first ``cycle_len`` epochs long, each next ``cycle_mult`` x longer."""
    schedule: ScheduleName = "one_cycle"
    epochs: int = Field(1, ge=1)
    cycles: int = Field(1, ge=1)
    cycle_len: int = Field(1, ge=1)
    cycle_mult: int = Field(1, ge=1)
    lr_from_finder: bool = False  # use the lr_find asset's suggestion instead of lr
    seed: int = 0


class FitSettings(Settings):
    """How a stage optimizes beyond rates and schedule (train.FitOptions)."""
    optimizer: Optimizer = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd's momentum
    weight_decay: float = Field(1e-2, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # one class per image: softened targets in the training loss
    early_stopping_patience: Optional[int] = Field(None, ge=1)  # stop after this many epochs without a lower
    #                                                             valid loss; the best epoch's weights are kept


class TrainingSettings(ScheduleSettings, FitSettings):
    """A training stage's schedule and optimizer."""


class HeadSettings(Settings):
    """The new head (heads.HeadConfig): fastai's, or a custom one by name."""
    ps: Optional[list[float]] = None  # dropout per linear block; None: fastai's 0.25 ... 0.5
    xtra_fc: list[int] = [512]  # hidden layer sizes
    custom_head: Optional[str] = None  # a head registered in precompute.heads, or "package.module:factory"
    #                                    listed in PRECOMPUTE_ALLOWED_HEADS -> nn.Module(in_features, n_classes)

    @model_validator(mode="after")
    def _head_shape(self):
        if self.custom_head is None:  # a custom head's factory is checked (registered? allowed?) when built
            check_head_shape(self.ps, self.xtra_fc)
        return self


class AugmentationSettings(Settings):
    """A stage's augmentation (transforms.Augmentation): a preset and the largest zoom."""
    augmentation: AugmentationPreset = "side_on"
    max_zoom: float = Field(1.1, ge=1)


class HeadStageSettings(TrainingSettings, HeadSettings):
    """head_on_cache: a new head on the cached activations (fastai's precompute=True)."""
    epochs: int = Field(5, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, ge=2)
    precompute: bool = True
    augment: bool = False
    reuse: bool = True  # return the earlier head when rows, config and seed are unchanged
    from_sweep: bool = False  # train the best head of this partition's latest head_sweep instead

    @model_validator(mode="after")
    def _on_the_cache(self):
        check_precompute_augment(self.precompute, self.augment)
        if not self.precompute:
            raise ConfigError("head_on_cache trains on the cache: set precompute=True, or use head_augmented "
                              "to train the head on images")
        return self


class ImageStageSettings(TrainingSettings, AugmentationSettings):
    """A stage on freshly augmented images (never the cache). ``FROZEN_GROUPS``: the layer groups the
    stage keeps frozen (head_augmented: all but the head; a validation context ``frozen`` overrides)."""
    FROZEN_GROUPS: ClassVar[int] = N_LAYER_GROUPS - 1
    lr: float = Field(1e-3, ge=0)  # the last group's rate; each earlier trainable group lr_spread x lower
    lr_spread: float = Field(3.0, gt=0)  # fastai: earlier groups 3-10x lower
    lrs: Optional[list[float]] = None  # or one rate per layer group, earliest first
    lr_range: Optional[str] = None  # or "lo:hi", spread geometrically over the trainable groups
    batch_size: int = Field(32, ge=2)
    augment: bool = True
    precompute: bool = False
    freeze_bn_stats: bool = True  # keep BatchNorm running statistics (see precompute.train.fit)
    train_bn: bool = False  # BatchNorm scale/shift trainable in frozen groups (fastai v1)
    size: Optional[int] = Field(None, ge=1)  # a new image size: progressive resizing from the previous stage

    def learning_rates(self):
        """The configured rates: ``lrs``, else ``lr_range``, else ``lr``."""
        return self.lrs or self.lr_range or self.lr

    @model_validator(mode="after")
    def _trainable(self, info):
        context = info.context or {}

        def one_rate_setting():
            if self.lrs is not None and self.lr_range is not None:
                raise ConfigError(f"lrs {self.lrs} and lr_range {self.lr_range!r} both set: give one of them "
                                  "(or neither, for lr with lr_spread)")
            if context.get("check_lr", True):
                check_lrs(self.learning_rates(), N_LAYER_GROUPS, context.get("frozen", self.FROZEN_GROUPS))

        all_checks(lambda: check_precompute_augment(self.precompute, self.augment), one_rate_setting)
        return self


def rate_fields(lr) -> dict:
    """A stage's learning rates (a number, a list per group, a slice or 'lo:hi') as ImageStageSettings' fields."""
    if isinstance(lr, slice):
        return {"lr_range": f"{lr.start}:{lr.stop}"}
    if isinstance(lr, str):
        return {"lr_range": lr}
    if isinstance(lr, (int, float)):
        return {"lr": lr}
    return {"lrs": list(lr)}


class LrFindSettings(Settings):
    num_it: int = Field(100, ge=2)
    batch_size: int = Field(64, ge=2)
    seed: int = 0


class LrFindImagesSettings(LrFindSettings):
    num_it: int = Field(50, ge=2)
    batch_size: int = Field(32, ge=2)
    lr_spread: float = Field(3.0, gt=0)
    augmentation: AugmentationPreset = "side_on"


class EvaluationSettings(Settings):
    tta: int = Field(4, ge=0)  # augmented views averaged with the center crop; 0 turns TTA off
    top_losses: int = Field(8, ge=0)  # images in the gallery of the model's worst mistakes


# --------------------------------------------------------------------------- the cache, the sweep, housekeeping


class ActivationSettings(Settings):
    """How the activations are computed and stored (the activations stage)."""
    size: Optional[int] = Field(None, ge=1)  # image size; None: the arch's input size
    pooled: bool = True  # concat max+avg pool vector (fastai); False: spatial maps
    dtype: StorageDtype = "float32"
    decoder: Decoder = "pil"  # part of the entry's key: nvjpeg gets its own cache entry
    batch_size: int = Field(32, ge=2)
    chunk_rows: int = Field(256, ge=1)  # rows per committed chunk: the most a crash can lose
    weights: Weights = "pretrained"
    weights_path: Optional[str] = None

    @model_validator(mode="after")
    def _one_source_of_weights(self):
        if self.weights == "random" and self.weights_path is not None:
            raise ConfigError("weights='random' and a weights_path contradict each other: drop one")
        return self


class SweepSettings(Settings):
    """Many heads on one cache: a grid, or ``n_random`` draws with lr log-uniform in [lo, hi]."""
    search: Search = "grid"
    lr: list[float] = Field([1e-3, 3e-3, 1e-2], min_length=1)  # grid values; random: [lo, hi], log-uniform
    ps: list[Optional[float]] = Field([None, 0.5], min_length=1)  # dropout per block; None: fastai's 0.25 ... 0.5
    xtra_fc: list[list[int]] = Field([[512]], min_length=1)  # hidden layer sizes
    epochs: list[int] = Field([3], min_length=1)
    wd: list[float] = Field([1e-2], min_length=1)
    label_smoothing: list[float] = Field([0.0], min_length=1)
    n_random: int = Field(20, ge=1)  # configurations drawn when search = random
    batch_size: int = Field(64, ge=2)
    seed: int = 0
    reuse: bool = True  # same cache, grid and seed: the earlier sweep

    @model_validator(mode="after")
    def _space(self):
        if self.search == "random" and len(self.lr) != 2:
            raise ConfigError(f"search: random takes lr as a range [lo, hi], got {self.lr}")
        check_sweep_values(lr=self.lr, epochs=self.epochs, wd=self.wd, label_smoothing=self.label_smoothing,
                           ps=self.ps)
        for sizes in self.xtra_fc:
            check_head_shape(None, sizes)
        return self


_SWEEP_RULES = {"lr": lambda v: v > 0, "epochs": lambda v: v >= 1, "wd": lambda v: v >= 0,
                "label_smoothing": lambda v: 0 <= v < 1, "ps": lambda v: v is None or 0 <= v < 1}


def check_sweep_values(**values: Sequence) -> None:
    """The values a head sweep tries (each a list; sweep.SweepConfig checks its one value here too)."""
    bad = {name: list(given) for name, given in values.items() if not all(_SWEEP_RULES[name](v) for v in given)}
    if bad:
        raise ConfigError(f"sweep values out of range {bad}: lr > 0, epochs >= 1, wd >= 0, "
                          "0 <= label_smoothing < 1, ps in [0, 1) or null")


class QualitySettings(Settings):
    k: int = Field(10, ge=1)  # neighbours for duplicates, outliers and drift
    duplicate_z: float = Field(4.0, gt=0)  # a pair's similarity margin over its neighbourhood, robust sigmas
    exact_cosine: float = Field(0.985, gt=0, le=1)  # raw cosine at or above which a pair is a duplicate anyway
    outlier_z: float = Field(4.0, gt=0)  # k-NN distance, robust sigmas above the median image
    folds: int = Field(5, ge=2)  # label heads (K-fold, stratified, seeded)
    seed: int = 0
    drift_percentile: float = Field(95.0, gt=0, le=100)  # new images at/above this percentile of the reference's
    top: int = Field(12, ge=1)  # findings per kind on a contact sheet
    leak_severity: Severity = "WARN"  # no_train_valid_leaks: WARN or ERROR
    max_label_issue_rate: float = Field(0.05, ge=0, le=1)  # label_issue_rate warns above this share of labels


class HousekeepingSettings(Settings):
    unused_days: float = Field(30.0, ge=0)  # entries neither read nor written for this long may go
    dry_run: bool = False


def choices(literal) -> tuple[str, ...]:
    """The values of a ``Literal`` choice, e.g. ``choices(AugmentationPreset)``."""
    return get_args(literal)
