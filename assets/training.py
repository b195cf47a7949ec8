"""Training stages. head_on_cache reads the cache; the augmented stages never do (non-cacheable).

lr_find runs as its own assets (on the cache for the head; on images for the unfrozen network);
a stage uses the suggested rate when its config says ``lr_from_finder: true``.
"""

import tempfile
import uuid
from pathlib import Path
from typing import ClassVar, Optional

import dagster as dg
from pydantic import Field

from assets._config import SettingsConfig
from assets._util import LazyModule, png_markdown
from assets.metadata import LrFindMetadata, StageMetadata
from assets.partitions import arch_and_cut, arch_cut
from precompute.errors import ConfigError
from precompute.settings import (HeadStageSettings, ImageStageSettings, LrFindImagesSettings, LrFindSettings,
                                 TrainingSettings, all_checks)
from resources import ActivationStoreResource, ComputeDevice, MlflowTracking

# torch, matplotlib and mlflow load when a step runs, not with the definitions (issue 20)
body_spec = LazyModule("precompute.body_spec")
evaluate = LazyModule("precompute.evaluate")
heads = LazyModule("precompute.heads")
records = LazyModule("precompute.records")
head_stage = LazyModule("precompute.stages.head_stage")
image_stage = LazyModule("precompute.stages.image_stage")
train = LazyModule("precompute.train")
validate = LazyModule("precompute.validate")

NOT_CACHEABLE = {"precompute/cacheable": "false"}


class ScheduleConfig(SettingsConfig, TrainingSettings):
    """A training stage's schedule and optimizer (precompute.settings.TrainingSettings)."""

    def to_schedule(self) -> "train.Schedule":
        return train.Schedule(self.schedule, self.epochs, self.cycles, self.cycle_len, self.cycle_mult)

    def fit_options(self) -> "train.FitOptions":
        return train.FitOptions(self.optimizer, self.momentum, self.weight_decay, self.label_smoothing,
                          self.early_stopping_patience)


class HeadOnCacheConfig(HeadStageSettings, ScheduleConfig):  # the model first: its defaults win
    """head_on_cache's settings (precompute.settings.HeadStageSettings)."""

    def head_config(self) -> "heads.HeadConfig":
        return heads.HeadConfig(self.ps, self.xtra_fc, self.custom_head)

    def stage(self, finder=None) -> "head_stage.HeadStage":
        if self.lr_from_finder and finder and finder.head is not None and finder.head != self.head_config():
            raise ConfigError(f"lr_from_finder: lr_find_head swept the head {finder.head}, but head_on_cache trains "
                              f"{self.head_config()}: give lr_find_head the same ps, xtra_fc and custom_head")
        lr = finder.suggestion if self.lr_from_finder and finder and finder.suggestion is not None else self.lr
        return head_stage.HeadStage(self.head_config(), self.to_schedule(), lr, self.batch_size, self.seed,
                                    self.precompute, self.augment, self.fit_options())


class ImageStageConfig(ImageStageSettings, ScheduleConfig):
    """head_augmented's settings (precompute.settings.ImageStageSettings): only the head trains."""

    def augmentation_args(self) -> dict:
        return {"preset": self.augmentation, "max_zoom": self.max_zoom}

    def learning_rates(self, finder=None):
        if self.lr_from_finder and finder and finder.suggestion is not None:
            return finder.suggestion
        return super().learning_rates()

    def stage(self, name: str, freeze_to: int, finder=None) -> "image_stage.ImageStage":
        """The stage this config describes; ``freeze_to`` as fastai's (-1: the head trains, 0: every group)."""
        return image_stage.ImageStage(name, freeze_to, self.to_schedule(), self.learning_rates(finder), self.lr_spread,
                                      self.batch_size, self.augment, self.precompute, self.augmentation_args(),
                                      self.freeze_bn_stats, self.train_bn, self.size, self.seed, self.fit_options())


class FinetuneConfig(ImageStageConfig):
    """finetuned's settings: every layer group trains (fastai's unfreeze())."""
    FROZEN_GROUPS: ClassVar[int] = 0
    lr: float = Field(3e-4, ge=0)        # the head's rate; the body groups get lr/3 and lr/9


class LrFindConfig(SettingsConfig, LrFindSettings):
    """lr_find_head's settings."""


class LrFindHeadConfig(LrFindConfig):
    """lr_find on the cache sweeps a new head: the one head_on_cache trains (its defaults here; set the
    same values in both, which head_on_cache checks when it takes the rate with ``lr_from_finder``)."""
    ps: Optional[list[float]] = None
    xtra_fc: list[int] = [512]
    custom_head: Optional[str] = None

    def head_config(self) -> "heads.HeadConfig":
        return heads.HeadConfig(self.ps, self.xtra_fc, self.custom_head)


def _checked(build, body: Optional[tuple] = None, **probes):
    """Reject a bad configuration before any work: the partition's cut ``body`` (arch, cut, size), the
    probes of precompute.validate, then the stage's own constructor ``build``; no retry: it cannot pass.
    (The config's own values were checked when the step built it: precompute.settings.)"""
    try:
        all_checks(*([lambda: body_spec.BodySpec(*body)] if body else []), lambda: validate.validate_run(**probes))
        return build()
    except ConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc


def open_run(context, tracking: MlflowTracking, stage: str, manifest, view_key: Optional[str]):
    """``params -> the stage's MLflow run`` (the tracking resource's ``open_run``), as the library's
    stages take it: the data it names comes with the stage's inputs (the manifest, the view key)."""
    arch, xtra_cut = arch_and_cut(context)
    return lambda params: tracking.open_run(context, stage, params, arch, xtra_cut, manifest, view_key)


def _stage_output(record: "records.StageRecord", tracking: MlflowTracking, data_version: Optional[str] = None,
                  thresholds: bool = True, **extra):
    metadata = StageMetadata.of(record, tracking.tracking_uri, thresholds, **extra)
    return dg.Output(record, metadata=metadata.to_metadata(),
                     data_version=dg.DataVersion(data_version) if data_version else None)


def _lr_find_output(context, tracking: MlflowTracking, stage: str, result, params: dict, manifest,
                    view_key: Optional[str]):
    """``result``: a precompute.lr_find.LRFindResult (its suggestion: fastai's valley)."""
    plot = Path(tempfile.mkdtemp(prefix="lr_find-")) / f"{stage}.png"
    result.plot().savefig(plot, dpi=100)
    with open_run(context, tracking, stage, manifest, view_key)(params) as run:
        if result.suggestion is not None:
            run.metrics({"suggested_lr": result.suggestion})
        run.series("lr_find_loss", result.losses)
        run.artifact(plot)
    said = (f"{result.suggestion:.2e}" if result.suggestion is not None
            else "none: the loss never fell; stages keep their configured lr")
    context.log.info(f"{stage}: suggested learning rate {said}")
    metadata = LrFindMetadata(said, run.run_id, png_markdown(plot, "loss vs learning rate"))
    return dg.Output(result, metadata=metadata.to_metadata())


@dg.asset(group_name="recipe", partitions_def=arch_cut, code_version="1")
def lr_find_head(context: dg.AssetExecutionContext, config: LrFindHeadConfig, image_manifest, activations,
                 store: ActivationStoreResource, tracking: MlflowTracking, compute: ComputeDevice):
    """lr_find for a new head on the cached activations: loss vs learning rate, and a suggestion."""
    compute.setup()
    head_config = config.head_config()
    result = head_stage.lr_find_on_ref(activations, image_manifest, store.get(), head_config, config.batch_size,
                                       config.seed, config.num_it)
    return _lr_find_output(context, tracking, "lr_find_head", result,
                           {**config.model_dump(exclude={"ps", "xtra_fc", "custom_head"}),
                            **{f"head.{k}": v for k, v in head_config.as_dict().items()}}, image_manifest,
                           activations.view_key)


@dg.asset(group_name="recipe", partitions_def=arch_cut, code_version="1", tags={"precompute/cacheable": "true"})
def head_on_cache(context: dg.AssetExecutionContext, config: HeadOnCacheConfig, image_manifest, activations,
                  lr_find_head, store: ActivationStoreResource, tracking: MlflowTracking, compute: ComputeDevice):
    """A new head trained on the cached activations only (fastai precompute=True)."""
    if config.from_sweep:
        from assets.sweep import best_of_sweep

        config = config.model_copy(update=best_of_sweep(context, activations, store))
    stage = _checked(lambda: config.stage(lr_find_head), tracking_uri=tracking.tracking_uri, manifest=image_manifest)
    compute.setup()
    record, reused, fingerprint = head_stage.train_head_stage(
        activations, image_manifest, store.get(), stage,
        open_run(context, tracking, "head_on_cache", image_manifest, activations.view_key),
        config.model_dump(exclude={"reuse"}), config.reuse, context.log)
    return _stage_output(record, tracking, fingerprint, thresholds=not reused, reused=reused, fingerprint=fingerprint,
                         streamed=None if reused else record.streamed)


def _image_stage(context, config: ImageStageConfig, image_manifest, previous, stage: "image_stage.ImageStage",
                 tracking: MlflowTracking, compute: ComputeDevice, export: bool = False):
    device = compute.setup()
    record = image_stage.run_image_stage(previous, image_manifest, stage,
                                         open_run(context, tracking, stage.name, image_manifest, previous.view_key),
                                         config.model_dump(), export, compute.num_workers, device, context.log)
    samples = image_stage.augmented_samples(previous, image_manifest, stage,
                                            Path(tempfile.mkdtemp(prefix="augment-")) / "augmented.png")
    return _stage_output(record, tracking, uuid.uuid4().hex,
                         augmented_samples=png_markdown(samples, f"augmentation {config.augmentation}"))


def _checked_image_stage(context, config: ImageStageConfig, name: str, freeze_to: int, tracking: MlflowTracking,
                         finder=None) -> "image_stage.ImageStage":
    arch, xtra_cut = arch_and_cut(context)
    return _checked(lambda: config.stage(name, freeze_to, finder), (arch, xtra_cut, config.size),
                    tracking_uri=tracking.tracking_uri)


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags=NOT_CACHEABLE)
def head_augmented(context: dg.AssetExecutionContext, config: ImageStageConfig, image_manifest, head_on_cache,
                   tracking: MlflowTracking, compute: ComputeDevice):
    """The head trained further on freshly augmented images; the body stays frozen. Never cached."""
    stage = _checked_image_stage(context, config, "head_augmented", -1, tracking)  # fastai's freeze_to(-1)
    return _image_stage(context, config, image_manifest, head_on_cache, stage, tracking, compute)


class LrFindImagesConfig(LrFindImagesSettings, LrFindConfig):
    """lr_find_unfrozen's settings."""


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags=NOT_CACHEABLE)
def lr_find_unfrozen(context: dg.AssetExecutionContext, config: LrFindImagesConfig, image_manifest, head_augmented,
                     tracking: MlflowTracking, compute: ComputeDevice):
    """lr_find for the unfrozen network on augmented images (fastai: lr_find again after unfreeze)."""
    device = compute.setup()
    result = image_stage.lr_find_on_images(head_augmented, image_manifest, 0, config.lr_spread, config.batch_size,
                                           config.seed, config.num_it, {"preset": config.augmentation},
                                           compute.num_workers, device)
    return _lr_find_output(context, tracking, "lr_find_unfrozen", result, config.model_dump(), image_manifest,
                           head_augmented.view_key)


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags=NOT_CACHEABLE)
def finetuned(context: dg.AssetExecutionContext, config: FinetuneConfig, image_manifest, head_augmented,
              lr_find_unfrozen, tracking: MlflowTracking, compute: ComputeDevice):
    """Every layer group unfrozen, earlier groups at lower learning rates, on augmented images."""
    stage = _checked_image_stage(context, config, "finetuned", 0, tracking, finder=lr_find_unfrozen)  # unfreeze()
    return _image_stage(context, config, image_manifest, head_augmented, stage, tracking, compute, export=True)
