"""Training stages. head_on_cache reads the cache; the augmented stages never do (non-cacheable).

lr_find runs as its own assets (on the cache for the head; on images for the unfrozen network);
a stage uses the suggested rate when its config says ``lr_from_finder: true``.
"""

import re
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import dagster as dg

from assets._util import png_markdown
from assets.partitions import arch_and_cut, arch_cut
from precompute import evaluate, recipe
from precompute.archs import get_arch
from precompute.train import ConfigError, Schedule
from precompute.transforms import TransformSpec, train_transform
from precompute.validate import validate_run
from resources import ActivationStoreResource, ComputeDevice, MlflowTracking

NOT_CACHEABLE = {"precompute/cacheable": "false"}


class ScheduleConfig(dg.Config):
    schedule: str = "one_cycle"          # one_cycle | sgdr | constant
    epochs: int = 1                      # one_cycle / constant
    cycles: int = 1                      # sgdr: number of cosine cycles ...
    cycle_len: int = 1                   # ... the first this many epochs long ...
    cycle_mult: int = 1                  # ... each next one this many times longer
    lr_from_finder: bool = False         # use the lr_find asset's suggestion instead of lr
    seed: int = 0

    def to_schedule(self) -> Schedule:
        return Schedule(self.schedule, self.epochs, self.cycles, self.cycle_len, self.cycle_mult)


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

    def head_config(self) -> dict:
        return {"ps": self.ps, "xtra_fc": self.xtra_fc, "custom": self.custom_head}


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

    def learning_rates(self, finder: Optional[dict] = None):
        if self.lr_from_finder and finder and finder.get("suggestion") is not None:
            return float(finder["suggestion"])
        return self.lrs or self.lr_range or self.lr


class FinetuneConfig(ImageStageConfig):
    lr: float = 3e-4                     # the head's rate; the body groups get lr/3 and lr/9


class LrFindConfig(dg.Config):
    num_it: int = 100
    batch_size: int = 64
    seed: int = 0


def _checked(config: ScheduleConfig, **values) -> Schedule:
    """Reject a bad configuration before any work (precompute.validate); no retry: it cannot pass."""
    try:
        validate_run(**values)
        return config.to_schedule()
    except ConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc


@contextmanager
def _mlflow_run(context, tracking: MlflowTracking, stage: str, params: dict):
    arch, xtra_cut = arch_and_cut(context)
    spec = get_arch(arch)
    tracker = tracking.tracker()
    tags = tracker.stage_tags(context.run.run_id, context.partition_key, stage,
                              {"dagster.partition": context.partition_key, "arch": arch})
    with tracker.run(f"{stage} {arch} cut={xtra_cut}",
                     {"arch": arch, "cut": xtra_cut, "lr_cut": spec.lr_cut, **params}, tags) as run:
        yield run


def _log_stage(run, record: dict) -> None:
    """Inside the stage's MLflow run: its layer groups, its run id on the record, and for a
    multi-label record each label's threshold."""
    run.layer_groups(record["groups"])
    record["mlflow_run_id"] = run.run_id
    if record.get("thresholds") is not None:  # multi-label: each label's threshold, as predict will use it
        thresholds = dict(zip(record["classes"], record["thresholds"]))
        run.metrics({"threshold." + re.sub(r"[^\w\-. /]", "_", c): t for c, t in thresholds.items()})


def _stage_output(record: dict, tracking: MlflowTracking, data_version: Optional[str] = None,
                  extra: Optional[dict] = None, thresholds: bool = True):
    last = record["history"][-1] if record["history"] else {}
    metadata = {"mlflow_run_id": record["mlflow_run_id"], "mlflow_tracking_uri": tracking.tracking_uri,
                "valid_accuracy": float(last.get("valid_accuracy", float("nan"))),
                "valid_loss": float(last.get("valid_loss", float("nan"))),
                "layer_groups": dg.MetadataValue.json(record["groups"]), **(extra or {})}
    if thresholds and record.get("thresholds") is not None:
        metadata["thresholds"] = dg.MetadataValue.json(dict(zip(record["classes"], record["thresholds"])))
    return dg.Output(record, metadata=metadata,
                     data_version=dg.DataVersion(data_version) if data_version else None)


def _finish(run, record: dict, tracking: MlflowTracking, data_version: Optional[str] = None,
            extra: Optional[dict] = None):
    _log_stage(run, record)
    return _stage_output(record, tracking, data_version, extra)


def _epoch_logger(context, run, stage: str):
    step = [0]

    def on_epoch(row: dict) -> None:
        run.metrics({k: v for k, v in row.items() if k not in ("epoch", "lr_steps")}, step=row["epoch"])
        run.series("lr_step", row["lr_steps"], start=step[0])  # the schedule as it ran, per batch
        step[0] += len(row["lr_steps"])
        context.log.info(f"{stage} epoch {row['epoch']}: train_loss {row['train_loss']:.4f} "
                         f"valid_loss {row['valid_loss']:.4f} valid_accuracy {row['valid_accuracy']:.4f} "
                         f"({row['seconds']:.1f}s)")
    return on_epoch


def _lr_find_output(context, tracking: MlflowTracking, stage: str, result: dict, params: dict):
    folder = Path(tempfile.mkdtemp(prefix="lr_find-"))
    plot = evaluate.plot_lr_find(result, folder / f"{stage}.png")
    with _mlflow_run(context, tracking, stage, params) as run:
        if result["suggestion"] is not None:
            run.metrics({"suggested_lr": result["suggestion"]})
        run.series("lr_find_loss", result["losses"])
        run.artifact(plot)
    said = (f"{result['suggestion']:.2e}" if result["suggestion"] is not None
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
    activations = recipe.ActivationsRef.coerce(activations)
    image_manifest = recipe.without_failed(image_manifest, activations.failed_images)  # no rows for them
    compute.setup()
    entry = recipe.open_entry(store.get(), activations)
    bb = activations.backbone()
    ts = activations.transform()
    head_config = _configured_head(context)
    result = recipe.lr_find_on_cache(entry, image_manifest, bb, ts, head_config,
                                     config.batch_size, config.seed, config.num_it)
    return _lr_find_output(context, tracking, "lr_find_head", result,
                           {**config.model_dump(), **{f"head.{k}": v for k, v in head_config.items()}})


@dg.asset(group_name="recipe", partitions_def=arch_cut, code_version="1", tags={"precompute/cacheable": "true"})
def head_on_cache(context: dg.AssetExecutionContext, config: HeadOnCacheConfig, image_manifest, activations,
                  lr_find_head, store: ActivationStoreResource, tracking: MlflowTracking, compute: ComputeDevice):
    """A new head trained on the cached activations only (fastai precompute=True)."""
    activations = recipe.ActivationsRef.coerce(activations)
    image_manifest = recipe.without_failed(image_manifest, activations.failed_images)  # no rows for them
    schedule = _checked(config, precompute=config.precompute, augment=config.augment, lr=config.lr,
                        batch_size=config.batch_size, custom_head=config.custom_head, ps=config.ps,
                        xtra_fc=config.xtra_fc, tracking_uri=tracking.tracking_uri, manifest=image_manifest)
    if not config.precompute:
        raise dg.Failure("head_on_cache trains on the cache: set precompute=True, or use head_augmented "
                         "to train the head on images", allow_retries=False)
    compute.setup()
    entry = recipe.open_entry(store.get(), activations)
    lr = (float(lr_find_head["suggestion"]) if config.lr_from_finder and lr_find_head["suggestion"] is not None
          else config.lr)
    # Dagster reruns an asset whenever asked; a head is a pure function of its rows, config and seed,
    # so an identical request returns the earlier result instead of training again.
    fingerprint = recipe.head_fingerprint(activations.view_key, {**config.model_dump(exclude={"reuse"}), "lr": lr})

    def train() -> dict:
        bb = activations.backbone()
        recipe.check_same_weights(bb, entry)
        ts = activations.transform()
        params = {**config.model_dump(), "lr": lr, "size": ts.size, "entry_key": entry.key.digest(),
                  "view_key": activations.view_key, "pooled": entry.key.pooled, "fingerprint": fingerprint}
        with _mlflow_run(context, tracking, "head_on_cache", params) as run:
            record = recipe.train_head_on_cache(entry, image_manifest, bb, ts, config.head_config(), lr=lr,
                                                batch_size=config.batch_size, seed=config.seed, schedule=schedule,
                                                on_epoch=_epoch_logger(context, run, "head_on_cache"))
            _log_stage(run, record)
        return record

    record, reused = recipe.head_on_cache_cached(entry, fingerprint, train, reuse=config.reuse)
    if reused:
        context.log.info(f"head_on_cache reused: same activations ({activations.view_key}), config and "
                         f"seed as MLflow run {record['mlflow_run_id']}; nothing trained")
        return _stage_output(record, tracking, fingerprint, {"reused": True, "fingerprint": fingerprint},
                             thresholds=False)
    return _stage_output(record, tracking, fingerprint,
                         {"reused": False, "fingerprint": fingerprint, "streamed": record["streamed"]})


def _augmented_samples(record: dict, image_manifest, config: ImageStageConfig) -> str:
    """What the model sees: 8 augmented training images, as Markdown."""
    import torch

    from precompute.images import load_rgb

    ts = TransformSpec(**record["transform"])
    if config.size:
        ts = TransformSpec(**{**ts.key(), "size": config.size, "resize": None})
    rows = recipe.labelled_split(image_manifest, record["classes"], "train").head(8)
    torch.manual_seed(config.seed)
    tf = train_transform(ts, **config.augmentation_args())
    path = Path(tempfile.mkdtemp(prefix="augment-")) / "augmented.png"
    evaluate.plot_tensor_grid([tf(load_rgb(p)) for p in rows["path"]], path, ts.mean, ts.std)
    return png_markdown(path, f"augmentation {config.augmentation}")


def _image_stage(context, config: ImageStageConfig, image_manifest, previous: dict, stage: str, freeze: int,
                 tracking: MlflowTracking, compute: ComputeDevice, finder: Optional[dict] = None):
    image_manifest = recipe.without_failed(image_manifest, previous.get("failed_images"))  # as the stages before
    arch, xtra_cut = arch_and_cut(context)
    lr = config.learning_rates(finder)
    schedule = _checked(config, arch=arch, xtra_cut=xtra_cut, size=config.size, lr=lr, frozen=freeze,
                        precompute=config.precompute, augment=config.augment, batch_size=config.batch_size,
                        augmentation=config.augmentation, max_zoom=config.max_zoom,
                        tracking_uri=tracking.tracking_uri)
    device = compute.setup()
    with _mlflow_run(context, tracking, stage, {**config.model_dump(), "lr_used": lr}) as run:
        record = recipe.train_on_images(
            previous, image_manifest, stage, schedule, lr, freeze=freeze, augment=config.augment,
            batch_size=config.batch_size, seed=config.seed, num_workers=compute.num_workers, device=device,
            on_epoch=_epoch_logger(context, run, stage), freeze_bn_stats=config.freeze_bn_stats,
            augmentation=config.augmentation_args(), lr_spread=config.lr_spread, size=config.size,
            train_bn=config.train_bn)
        extra = {"augmented_samples": dg.MetadataValue.md(_augmented_samples(previous, image_manifest, config))}
        if stage == "finetuned":
            run.artifact(recipe.save_model(record, context.run.run_id), "model")
            run.pytorch_model(record, "network")
        return _finish(run, record, tracking, data_version=uuid.uuid4().hex, extra=extra)


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags=NOT_CACHEABLE)
def head_augmented(context: dg.AssetExecutionContext, config: ImageStageConfig, image_manifest, head_on_cache,
                   tracking: MlflowTracking, compute: ComputeDevice):
    """The head trained further on freshly augmented images; the body stays frozen. Never cached."""
    return _image_stage(context, config, image_manifest, head_on_cache, "head_augmented", 2, tracking, compute)


class LrFindImagesConfig(LrFindConfig):
    num_it: int = 50
    batch_size: int = 32
    lr_spread: float = 3.0
    augmentation: str = "side_on"


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags=NOT_CACHEABLE)
def lr_find_unfrozen(context: dg.AssetExecutionContext, config: LrFindImagesConfig, image_manifest, head_augmented,
                     tracking: MlflowTracking, compute: ComputeDevice):
    """lr_find for the unfrozen network on augmented images (fastai: lr_find again after unfreeze)."""
    image_manifest = recipe.without_failed(image_manifest, head_augmented.get("failed_images"))
    device = compute.setup()
    result = recipe.lr_find_on_images(head_augmented, image_manifest, 0, config.lr_spread, config.batch_size,
                                      config.seed, config.num_it, {"preset": config.augmentation},
                                      compute.num_workers, device)
    return _lr_find_output(context, tracking, "lr_find_unfrozen", result, config.model_dump())


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags=NOT_CACHEABLE)
def finetuned(context: dg.AssetExecutionContext, config: FinetuneConfig, image_manifest, head_augmented,
              lr_find_unfrozen, tracking: MlflowTracking, compute: ComputeDevice):
    """Every layer group unfrozen, earlier groups at lower learning rates, on augmented images."""
    return _image_stage(context, config, image_manifest, head_augmented, "finetuned", 0, tracking, compute,
                        finder=lr_find_unfrozen)
