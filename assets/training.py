"""Training stages. head_on_cache reads the cache; the augmented stages never do (non-cacheable).

lr_find runs as its own assets (on the cache for the head; on images for the unfrozen network);
a stage uses the suggested rate when its config says ``lr_from_finder: true``.
"""

import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import dagster as dg

from assets._util import LazyModule, as_metadata, png_markdown
from assets.partitions import arch_and_cut, arch_cut
from precompute.archs import get_arch
from precompute.errors import ConfigError
from resources import ActivationStoreResource, ComputeDevice, MlflowTracking

# torch, matplotlib and mlflow load when a step runs, not with the definitions (issue 20)
evaluate = LazyModule("precompute.evaluate")
records = LazyModule("precompute.records")
common = LazyModule("precompute.stages.common")
head_stage = LazyModule("precompute.stages.head_stage")
image_stage = LazyModule("precompute.stages.image_stage")
train = LazyModule("precompute.train")
validate = LazyModule("precompute.validate")

NOT_CACHEABLE = {"precompute/cacheable": "false"}


class ScheduleConfig(dg.Config):
    schedule: str = "one_cycle"          # one_cycle | sgdr | constant
    epochs: int = 1                      # one_cycle / constant
    cycles: int = 1                      # sgdr: number of cosine cycles ...
    cycle_len: int = 1                   # ... the first this many epochs long ...
    cycle_mult: int = 1                  # ... each next one this many times longer
    lr_from_finder: bool = False         # use the lr_find asset's suggestion instead of lr
    seed: int = 0
    optimizer: str = "adamw"             # adamw | sgd (with momentum, as fastai 0.7)
    momentum: float = 0.9                # sgd's momentum
    weight_decay: float = 1e-2
    label_smoothing: float = 0.0         # one class per image: softened targets in the training loss
    early_stopping_patience: Optional[int] = None  # stop after this many epochs without a lower valid loss;
                                                   # the best epoch's weights are kept

    def to_schedule(self) -> "train.Schedule":
        return train.Schedule(self.schedule, self.epochs, self.cycles, self.cycle_len, self.cycle_mult)

    def fit_options(self) -> "train.FitOptions":
        return train.FitOptions(self.optimizer, self.momentum, self.weight_decay, self.label_smoothing,
                          self.early_stopping_patience)


class HeadOnCacheConfig(ScheduleConfig):
    epochs: int = 5
    lr: float = 3e-3
    batch_size: int = 64
    ps: Optional[list[float]] = None     # dropout per linear block; None: fastai's 0.25 ... 0.5
    xtra_fc: list[int] = [512]           # hidden layer sizes
    custom_head: Optional[str] = None    # a head registered in precompute.heads, or "package.module:factory"
                                         # listed in PRECOMPUTE_ALLOWED_HEADS -> nn.Module(in_features, n_classes)
    precompute: bool = True
    augment: bool = False
    reuse: bool = True                   # return the earlier head when rows, config and seed are unchanged
    from_sweep: bool = False             # train the best head of this partition's latest head_sweep instead

    def head_config(self) -> dict:
        return {"ps": self.ps, "xtra_fc": self.xtra_fc, "custom": self.custom_head}

    def stage(self, finder=None) -> "head_stage.HeadStage":
        lr = finder.suggestion if self.lr_from_finder and finder and finder.suggestion is not None else self.lr
        return head_stage.HeadStage(self.head_config(), self.to_schedule(), lr, self.batch_size, self.seed,
                                    self.precompute, self.augment, self.fit_options())


class ImageStageConfig(ScheduleConfig):
    lr: float = 1e-3                     # the last group's rate; each earlier trainable group lr_spread x lower
    lr_spread: float = 3.0               # fastai: earlier groups 3-10x lower
    lrs: Optional[list[float]] = None    # or one rate per layer group, earliest first
    lr_range: Optional[str] = None       # or "lo:hi", spread geometrically over the trainable groups
    batch_size: int = 32
    augment: bool = True
    precompute: bool = False
    augmentation: str = "side_on"        # side_on | top_down | basic (fastai's transforms_* presets)
    max_zoom: float = 1.1
    freeze_bn_stats: bool = True         # keep BatchNorm running statistics (see precompute.train.fit)
    train_bn: bool = False               # BatchNorm scale/shift trainable in frozen groups (fastai v1)
    size: Optional[int] = None           # a new image size: progressive resizing from the previous stage

    def augmentation_args(self) -> dict:
        return {"preset": self.augmentation, "max_zoom": self.max_zoom}

    def learning_rates(self, finder=None):
        if self.lr_from_finder and finder and finder.suggestion is not None:
            return finder.suggestion
        return self.lrs or self.lr_range or self.lr

    def stage(self, name: str, freeze_to: int, finder=None) -> "image_stage.ImageStage":
        """The stage this config describes; ``freeze_to`` as fastai's (-1: the head trains, 0: every group)."""
        return image_stage.ImageStage(name, freeze_to, self.to_schedule(), self.learning_rates(finder), self.lr_spread,
                                      self.batch_size, self.augment, self.precompute, self.augmentation_args(),
                                      self.freeze_bn_stats, self.train_bn, self.size, self.seed, self.fit_options())


class FinetuneConfig(ImageStageConfig):
    lr: float = 3e-4                     # the head's rate; the body groups get lr/3 and lr/9


class LrFindConfig(dg.Config):
    num_it: int = 100
    batch_size: int = 64
    seed: int = 0


def _checked(build, **values):
    """Reject a bad configuration before any work (precompute.validate, then the stage's own
    constructor ``build``); no retry: it cannot pass."""
    try:
        validate.validate_run(**values)
        return build()
    except ConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc


@contextmanager
def _mlflow_run(context, tracking: MlflowTracking, stage: str, params: dict, manifest):
    """The stage's MLflow run, with what re-executes it (``precompute rerun <run id>``): the Dagster
    run config, job, asset selection and partition, the git commit, and the image manifest as a
    dataset input (source: the image source; digest: the activations' view key for this partition)."""
    from precompute.tracking import JOB_TAG, PARTITION_TAG, SELECTION_TAG, git_commit

    arch, xtra_cut = arch_and_cut(context)
    spec = get_arch(arch)
    tracker = tracking.tracker()
    dagster_run, instance = context.run, context.instance
    keys = dagster_run.asset_selection or context.job_def.asset_layer.selected_asset_keys  # None: the whole job
    selection = ",".join(sorted(k.to_user_string() for k in keys))
    tags = tracker.stage_tags(dagster_run.run_id, context.partition_key, stage,
                              {PARTITION_TAG: context.partition_key, JOB_TAG: dagster_run.job_name,
                               SELECTION_TAG: selection, "arch": arch})
    scan = instance.get_latest_materialization_event(dg.AssetKey("image_manifest"))
    source = scan.asset_materialization.metadata.get("source") if scan else None
    acts = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey("activations"), asset_partitions=[context.partition_key]), limit=1).records
    view = acts[0].asset_materialization.metadata.get("view_key") if acts else None
    with tracker.run(f"{stage} {arch} cut={xtra_cut}",
                     {"arch": arch, "cut": xtra_cut, "lr_cut": spec.lr_cut, **params}, tags) as run:
        run.provenance(dagster_run.run_config, manifest, source and str(source.value), view and str(view.value),
                       git_commit())
        yield run


def _stage_output(record: "records.StageRecord", tracking: MlflowTracking, data_version: Optional[str] = None,
                  extra: Optional[dict] = None, thresholds: bool = True):
    metadata = {**common.stage_metadata(record, thresholds), "mlflow_tracking_uri": tracking.tracking_uri,
                **(extra or {})}
    return dg.Output(record, metadata=as_metadata(metadata),
                     data_version=dg.DataVersion(data_version) if data_version else None)


def _lr_find_output(context, tracking: MlflowTracking, stage: str, result, params: dict, manifest):
    """``result``: a precompute.lr_find.LRFindResult (its suggestion: fastai's valley)."""
    plot = Path(tempfile.mkdtemp(prefix="lr_find-")) / f"{stage}.png"
    result.plot().savefig(plot, dpi=100)
    with _mlflow_run(context, tracking, stage, params, manifest) as run:
        if result.suggestion is not None:
            run.metrics({"suggested_lr": result.suggestion})
        run.series("lr_find_loss", result.losses)
        run.artifact(plot)
    said = (f"{result.suggestion:.2e}" if result.suggestion is not None
            else "none: the loss never fell; stages keep their configured lr")
    context.log.info(f"{stage}: suggested learning rate {said}")
    return dg.Output(result, metadata={"suggested_lr": said, "mlflow_run_id": run.run_id,
                                       "plot": dg.MetadataValue.md(png_markdown(plot, "loss vs learning rate"))})


def _configured_head(context) -> dict:
    """The head head_on_cache will train (ps, xtra_fc, custom_head): its config in this run's run
    config (``ops: head_on_cache: config:``), else head_on_cache's defaults."""
    ops = (context.run.run_config or {}).get("ops") or {}
    configured = (ops.get("head_on_cache") or {}).get("config") or {}
    return HeadOnCacheConfig(**configured).head_config()


@dg.asset(group_name="recipe", partitions_def=arch_cut, code_version="1")
def lr_find_head(context: dg.AssetExecutionContext, config: LrFindConfig, image_manifest, activations,
                 store: ActivationStoreResource, tracking: MlflowTracking, compute: ComputeDevice):
    """lr_find for a new head on the cached activations: loss vs learning rate, and a suggestion."""
    compute.setup()
    head_config = _configured_head(context)
    result = head_stage.lr_find_on_ref(activations, image_manifest, store.get(), head_config, config.batch_size,
                                       config.seed, config.num_it)
    return _lr_find_output(context, tracking, "lr_find_head", result,
                           {**config.model_dump(), **{f"head.{k}": v for k, v in head_config.items()}}, image_manifest)


@dg.asset(group_name="recipe", partitions_def=arch_cut, code_version="1", tags={"precompute/cacheable": "true"})
def head_on_cache(context: dg.AssetExecutionContext, config: HeadOnCacheConfig, image_manifest, activations,
                  lr_find_head, store: ActivationStoreResource, tracking: MlflowTracking, compute: ComputeDevice):
    """A new head trained on the cached activations only (fastai precompute=True)."""
    if config.from_sweep:
        from assets.sweep import best_of_sweep

        config = config.model_copy(update=best_of_sweep(context, activations, store))
    stage = _checked(lambda: config.stage(lr_find_head), precompute=config.precompute, augment=config.augment,
                     lr=config.lr, batch_size=config.batch_size, custom_head=config.custom_head, ps=config.ps,
                     xtra_fc=config.xtra_fc, tracking_uri=tracking.tracking_uri, manifest=image_manifest)
    compute.setup()
    record, reused, fingerprint = head_stage.train_head_stage(
        activations, image_manifest, store.get(), stage,
        lambda params: _mlflow_run(context, tracking, "head_on_cache", params, image_manifest),
        config.model_dump(exclude={"reuse"}), config.reuse, context.log)
    extra = {"reused": reused, "fingerprint": fingerprint, **({} if reused else {"streamed": record.streamed})}
    return _stage_output(record, tracking, fingerprint, extra, thresholds=not reused)


def _image_stage(context, config: ImageStageConfig, image_manifest, previous, stage: "image_stage.ImageStage",
                 tracking: MlflowTracking, compute: ComputeDevice, export: bool = False):
    device = compute.setup()
    record = image_stage.run_image_stage(
        previous, image_manifest, stage, lambda params: _mlflow_run(context, tracking, stage.name, params, image_manifest),
        config.model_dump(), export, compute.num_workers, device, context.log)
    samples = image_stage.augmented_samples(previous, image_manifest, stage,
                                            Path(tempfile.mkdtemp(prefix="augment-")) / "augmented.png")
    extra = {"augmented_samples": dg.MetadataValue.md(png_markdown(samples, f"augmentation {config.augmentation}"))}
    return _stage_output(record, tracking, uuid.uuid4().hex, extra)


def _checked_image_stage(context, config: ImageStageConfig, name: str, freeze_to: int, tracking: MlflowTracking,
                         finder=None) -> "image_stage.ImageStage":
    arch, xtra_cut = arch_and_cut(context)
    return _checked(lambda: config.stage(name, freeze_to, finder), arch=arch, xtra_cut=xtra_cut, size=config.size,
                    lr=config.learning_rates(finder), frozen=freeze_to % train.N_LAYER_GROUPS, precompute=config.precompute,
                    augment=config.augment, batch_size=config.batch_size, augmentation=config.augmentation,
                    max_zoom=config.max_zoom, tracking_uri=tracking.tracking_uri)


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags=NOT_CACHEABLE)
def head_augmented(context: dg.AssetExecutionContext, config: ImageStageConfig, image_manifest, head_on_cache,
                   tracking: MlflowTracking, compute: ComputeDevice):
    """The head trained further on freshly augmented images; the body stays frozen. Never cached."""
    stage = _checked_image_stage(context, config, "head_augmented", -1, tracking)  # fastai's freeze_to(-1)
    return _image_stage(context, config, image_manifest, head_on_cache, stage, tracking, compute)


class LrFindImagesConfig(LrFindConfig):
    num_it: int = 50
    batch_size: int = 32
    lr_spread: float = 3.0
    augmentation: str = "side_on"


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags=NOT_CACHEABLE)
def lr_find_unfrozen(context: dg.AssetExecutionContext, config: LrFindImagesConfig, image_manifest, head_augmented,
                     tracking: MlflowTracking, compute: ComputeDevice):
    """lr_find for the unfrozen network on augmented images (fastai: lr_find again after unfreeze)."""
    device = compute.setup()
    result = image_stage.lr_find_on_images(head_augmented, image_manifest, 0, config.lr_spread, config.batch_size,
                                           config.seed, config.num_it, {"preset": config.augmentation},
                                           compute.num_workers, device)
    return _lr_find_output(context, tracking, "lr_find_unfrozen", result, config.model_dump(), image_manifest)


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags=NOT_CACHEABLE)
def finetuned(context: dg.AssetExecutionContext, config: FinetuneConfig, image_manifest, head_augmented,
              lr_find_unfrozen, tracking: MlflowTracking, compute: ComputeDevice):
    """Every layer group unfrozen, earlier groups at lower learning rates, on augmented images."""
    stage = _checked_image_stage(context, config, "finetuned", 0, tracking, finder=lr_find_unfrozen)  # unfreeze()
    return _image_stage(context, config, image_manifest, head_augmented, stage, tracking, compute, export=True)
