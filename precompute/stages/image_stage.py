"""Stages that train on images, never the cache: the head on augmented images, then the unfrozen
network with lower rates for earlier layer groups; and lr_find for them."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from precompute.backbone import with_size
from precompute.callbacks import Callback, OnEpoch, TrackEpochs
from precompute.learner import Learner
from precompute.lr_find import LRFindResult
from precompute.records import StageRecord, save_model
from precompute.stages.common import LOG, OpenRun, log_stage, schedule_params
from precompute.settings import ImageStageSettings, rate_fields
from precompute.train import N_LAYER_GROUPS, EpochCallback, FitOptions, LearningRates, Schedule, differential_lrs, group_lrs
from precompute.transforms import TransformSpec


def stage_lrs(lr: LearningRates, n_groups: int, freeze: int, spread: float = 3.0) -> list[float]:
    """A single rate is the last group's, each earlier trainable group ``spread`` times lower
    (fastai: 3-10x); a list or a 'lo:hi' range is taken as given (see train.group_lrs)."""
    if isinstance(lr, (int, float)):
        return [0.0] * freeze + differential_lrs(float(lr), n_groups - freeze, spread)
    return group_lrs(lr, n_groups, frozen=freeze)


@dataclass(frozen=True)
class ImageStage:
    """A stage that trains on images (never the cache), continuing from the previous stage's record.

    ``freeze_to`` is fastai's ``freeze_to(n)``: groups ``[:n]`` stay frozen, a negative n counts
    from the end (-1: only the head trains; 0: every group). ``size`` different from the previous
    stage's continues at a new image size (progressive resizing); ``train_bn`` keeps BatchNorm
    scale/shift trainable in frozen groups (fastai v1). The values are checked here, before any work.
    """

    name: str
    freeze_to: int
    schedule: Schedule = Schedule()
    lr: LearningRates = 1e-3
    lr_spread: float = 3.0
    batch_size: int = 32
    augment: bool = True
    precompute: bool = False
    augmentation: dict | None = None       # train_transform's arguments (preset, max_zoom)
    freeze_bn_stats: bool = True
    train_bn: bool = False
    size: int | None = None
    seed: int = 0
    options: FitOptions = FitOptions()     # optimizer, weight decay, label smoothing, early stopping

    def __post_init__(self):
        aug = {k: v for k, v in (("augmentation", (self.augmentation or {}).get("preset")),
                                 ("max_zoom", (self.augmentation or {}).get("max_zoom"))) if v is not None}
        measure_only = isinstance(self.lr, (int, float)) and self.lr == 0  # a rate of 0 only measures (tests do)
        ImageStageSettings.checked({"frozen": self.frozen(N_LAYER_GROUPS), "check_lr": not measure_only},
                                   precompute=self.precompute, augment=self.augment, batch_size=self.batch_size,
                                   lr_spread=self.lr_spread, size=self.size, **aug, **rate_fields(self.lr))

    def frozen(self, n_groups: int) -> int:
        """How many layer groups, from the first, stay frozen."""
        return self.freeze_to + n_groups if self.freeze_to < 0 else self.freeze_to

    def logged_params(self, previous: StageRecord, params: dict) -> dict:
        """``params`` with what the stage really runs: the rate, the image size and the epoch count
        (an SGDR schedule of 1+2 epochs runs 3, whatever ``epochs`` says)."""
        return {**params, "lr_used": self.lr, "size": self.transform(previous).size,
                "epochs": self.schedule.total_epochs, **schedule_params(self.schedule), **self.options.as_dict()}

    def transform(self, previous: StageRecord) -> TransformSpec:
        """The previous stage's transform, at this stage's size when it sets one."""
        return with_size(previous.transform, self.size)  # progressive resizing: same weights, new input size


def stage_learner(previous: StageRecord, manifest: pd.DataFrame, stage: ImageStage, num_workers: int = 0,
                  device="cpu") -> Learner:
    """A Learner continuing from ``previous`` as ``stage`` says: its size, frozen groups, augmentation,
    BatchNorm policy and fit options (the task, classes or labels, is the previous one's)."""
    learn = Learner.from_record(previous, manifest, bs=stage.batch_size, seed=stage.seed,
                                device=device, num_workers=num_workers)
    learn.set_size(stage.size)
    learn.freeze_to(stage.frozen(learn.n_groups))
    learn.aug_tfms = (stage.augmentation or {}) if stage.augment else None
    learn.freeze_bn_stats, learn.train_bn, learn.fit_options = stage.freeze_bn_stats, stage.train_bn, stage.options
    return learn


def train_image_stage(previous: StageRecord, manifest: pd.DataFrame, stage: ImageStage, num_workers: int = 0,
                      device="cpu", on_epoch: EpochCallback | None = None, cbs: Sequence[Callback] = ()) -> StageRecord:
    """Continue from ``previous`` on images as ``stage`` says (a Learner's fit)."""
    learn = stage_learner(previous, manifest, stage, num_workers, device)
    lrs = stage_lrs(stage.lr, learn.n_groups, learn.frozen, stage.lr_spread)
    return learn.fit_schedule(lrs, stage.schedule, stage.name, [*cbs, *([OnEpoch(on_epoch)] if on_epoch else [])])


def train_on_images(previous: StageRecord, manifest: pd.DataFrame, stage: str, schedule: Schedule,
                    lr: LearningRates, freeze: int, augment: bool = True, precompute: bool = False,
                    batch_size: int = 32, seed: int = 0, num_workers: int = 0, device="cpu",
                    on_epoch: EpochCallback | None = None, freeze_bn_stats: bool = True,
                    augmentation: dict | None = None, lr_spread: float = 3.0, size: int | None = None,
                    train_bn: bool = False) -> StageRecord:
    """``train_image_stage`` with the stage's values as arguments: groups[:freeze] stay frozen."""
    return train_image_stage(previous, manifest, ImageStage(
        stage, freeze, schedule, lr, lr_spread, batch_size, augment, precompute, augmentation, freeze_bn_stats,
        train_bn, size, seed), num_workers, device, on_epoch)


def lr_find_on_images(previous: StageRecord, manifest: pd.DataFrame, freeze: int = 0, lr_spread: float = 3.0,
                      batch_size: int = 32, seed: int = 0, num_it: int = 50, augmentation: dict | None = None,
                      num_workers: int = 0, device="cpu", freeze_bn_stats: bool = True) -> LRFindResult:
    """lr_find for the (partly) unfrozen network on augmented images; rates keep the groups' ratios."""
    stage = ImageStage("lr_find", freeze, lr=0, lr_spread=lr_spread, batch_size=batch_size, augmentation=augmentation,
                       freeze_bn_stats=freeze_bn_stats, seed=seed)
    learn = stage_learner(previous, manifest, stage, num_workers, device)
    return learn.lr_find(num_it=num_it, lr=stage_lrs(1.0, learn.n_groups, learn.frozen, lr_spread))


def run_image_stage(previous: StageRecord, manifest: pd.DataFrame, stage: ImageStage, open_run: OpenRun,
                    params: dict, export: bool = False, num_workers: int = 0, device="cpu",
                    log=LOG) -> StageRecord:
    """An image stage as the pipeline runs it, in one tracked run whose params carry the real image
    size and epoch count; with ``export`` the record also goes to the run as the model file and
    as a servable network."""
    with open_run(stage.logged_params(previous, params)) as run:
        record = train_image_stage(previous, manifest, stage, num_workers, device, cbs=[TrackEpochs(run, stage.name, log)])
        record.view_key = previous.view_key  # the data it descends from, for the next stage's tracked run
        if export:
            run.artifact(save_model(record, run.run_id, tempfile.mkdtemp(prefix="model-")), "model")
            run.pytorch_model(record, "network")
        return log_stage(run, record)


def augmented_samples(previous: StageRecord | dict, manifest: pd.DataFrame, stage: ImageStage, path,
                      n: int = 8) -> Path:
    """What the model sees in ``stage``: ``n`` augmented training images (``Learner.show_batch``) in ``path``."""
    stage_learner(previous, manifest, stage).show_batch(n).savefig(path, dpi=80)
    return Path(path)
