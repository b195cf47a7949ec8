"""Training stages. head_on_cache reads the cache; the augmented stages never do (non-cacheable)."""

import uuid
from contextlib import contextmanager
from typing import Optional

import dagster as dg

from assets.partitions import arch_and_cut, arch_cut
from precompute import recipe
from precompute.archs import get_arch
from precompute.train import ConfigError, check_precompute_augment
from resources import ActivationStoreResource, ComputeDevice, MlflowTracking

NOT_CACHEABLE = {"precompute/cacheable": "false"}


class HeadOnCacheConfig(dg.Config):
    epochs: int = 5
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0
    ps: Optional[list[float]] = None     # dropout per linear block; None: fastai's 0.25 ... 0.5
    xtra_fc: list[int] = [512]           # hidden layer sizes
    custom_head: Optional[str] = None    # "package.module:factory" -> nn.Module(in_features, n_classes)
    precompute: bool = True
    augment: bool = False
    reuse: bool = True                   # return the earlier head when rows, config and seed are unchanged


class ImageStageConfig(dg.Config):
    epochs: int = 1
    lr: float = 1e-3                     # the last group's rate; earlier trainable groups 3x lower each
    lrs: Optional[list[float]] = None    # or one rate per layer group (0 for frozen groups)
    batch_size: int = 32
    seed: int = 0
    augment: bool = True
    precompute: bool = False
    flip: bool = True                    # horizontal flips (off for digits, text, ...)
    rotate: float = 10.0                 # degrees
    lighting: float = 0.05               # brightness/contrast jitter
    max_zoom: float = 1.1
    freeze_bn_stats: bool = True         # keep BatchNorm running statistics (see precompute.train.fit)

    def augmentation(self) -> dict:
        return {"flip": self.flip, "rotate": self.rotate, "lighting": self.lighting, "max_zoom": self.max_zoom}


def _fail_on_config(precompute: bool, augment: bool) -> None:
    try:
        check_precompute_augment(precompute, augment)
    except ConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc


@contextmanager
def _mlflow_run(context, tracking: MlflowTracking, stage: str, params: dict):
    arch, xtra_cut = arch_and_cut(context)
    spec = get_arch(arch)
    tags = {"dagster.run_id": context.run.run_id, "dagster.partition": context.partition_key,
            "stage": stage, "arch": arch}
    with tracking.tracker().run(f"{stage} {arch} cut={xtra_cut}",
                                {"arch": arch, "cut": xtra_cut, "lr_cut": spec.lr_cut, **params}, tags) as run:
        yield run


def _finish(context, run, record: dict, tracking: MlflowTracking, data_version: Optional[str] = None,
            extra: Optional[dict] = None):
    run.layer_groups(record["groups"])
    last = record["history"][-1] if record["history"] else {}
    record["mlflow_run_id"] = run.run_id
    metadata = {"mlflow_run_id": run.run_id, "mlflow_tracking_uri": tracking.tracking_uri,
                "valid_accuracy": float(last.get("valid_accuracy", float("nan"))),
                "valid_loss": float(last.get("valid_loss", float("nan"))),
                "layer_groups": dg.MetadataValue.json(record["groups"]), **(extra or {})}
    return dg.Output(record, metadata=metadata,
                     data_version=dg.DataVersion(data_version) if data_version else None)


def _epoch_logger(context, run, stage: str):
    def on_epoch(row: dict) -> None:
        run.metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        context.log.info(f"{stage} epoch {row['epoch']}: train_loss {row['train_loss']:.4f} "
                         f"valid_loss {row['valid_loss']:.4f} valid_accuracy {row['valid_accuracy']:.4f} "
                         f"({row['seconds']:.1f}s)")
    return on_epoch


class FinetuneConfig(ImageStageConfig):
    lr: float = 3e-4                     # the head's rate; the body groups get lr/3 and lr/9


@dg.asset(group_name="recipe", partitions_def=arch_cut, code_version="1", tags={"precompute/cacheable": "true"})
def head_on_cache(context: dg.AssetExecutionContext, config: HeadOnCacheConfig, image_manifest, activations,
                  store: ActivationStoreResource, tracking: MlflowTracking, compute: ComputeDevice):
    """A new head trained on the cached activations only (fastai precompute=True)."""
    _fail_on_config(config.precompute, config.augment)
    if not config.precompute:
        raise dg.Failure("head_on_cache trains on the cache: set precompute=True, or use head_augmented "
                         "to train the head on images", allow_retries=False)
    compute.setup()
    entry = recipe.open_entry(store.get(), activations)
    bb = recipe.load_backbone(activations["key"]["arch"], activations["key"]["xtra_cut"],
                              activations["weights"], activations["weights_path"])
    recipe.check_same_weights(bb, entry)
    ts = recipe.TransformSpec(**activations["key"]["transform"])
    head_config = {"ps": config.ps, "xtra_fc": config.xtra_fc, "custom": config.custom_head}
    # Dagster reruns an asset whenever asked; a head is a pure function of its rows, config and seed,
    # so an identical request returns the earlier result instead of training again.
    fingerprint = recipe.head_fingerprint(activations["view_key"], config.model_dump(exclude={"reuse"}))
    record = recipe.load_head_result(entry, fingerprint) if config.reuse else None
    if record is not None:
        context.log.info(f"head_on_cache reused: same activations ({activations['view_key']}), config and "
                         f"seed as MLflow run {record['mlflow_run_id']}; nothing trained")
        last = record["history"][-1]
        return dg.Output(record, data_version=dg.DataVersion(fingerprint), metadata={
            "reused": True, "fingerprint": fingerprint, "mlflow_run_id": record["mlflow_run_id"],
            "mlflow_tracking_uri": tracking.tracking_uri, "valid_accuracy": float(last["valid_accuracy"]),
            "valid_loss": float(last["valid_loss"]), "layer_groups": dg.MetadataValue.json(record["groups"])})
    params = {**config.model_dump(), "size": ts.size, "entry_key": entry.key.digest(),
              "view_key": activations["view_key"], "pooled": entry.key.pooled, "fingerprint": fingerprint}
    with _mlflow_run(context, tracking, "head_on_cache", params) as run:
        record = recipe.train_head_on_cache(entry, image_manifest, bb, ts, head_config, config.epochs, config.lr,
                                            config.batch_size, config.seed, _epoch_logger(context, run, "head_on_cache"))
        output = _finish(context, run, record, tracking, data_version=fingerprint,
                         extra={"reused": False, "fingerprint": fingerprint, "streamed": record["streamed"]})
    recipe.save_head_result(entry, fingerprint, record)
    return output


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags=NOT_CACHEABLE)
def head_augmented(context: dg.AssetExecutionContext, config: ImageStageConfig, image_manifest, head_on_cache,
                   tracking: MlflowTracking, compute: ComputeDevice):
    """The head trained further on freshly augmented images; the body stays frozen. Never cached."""
    _fail_on_config(config.precompute, config.augment)
    device = compute.setup()
    with _mlflow_run(context, tracking, "head_augmented", config.model_dump()) as run:
        record = recipe.train_on_images(
            head_on_cache, image_manifest, "head_augmented", config.epochs, config.lrs or config.lr,
            freeze=2, augment=config.augment, batch_size=config.batch_size, seed=config.seed,
            num_workers=compute.num_workers, device=device, on_epoch=_epoch_logger(context, run, "head_augmented"),
            freeze_bn_stats=config.freeze_bn_stats, augmentation=config.augmentation())
        return _finish(context, run, record, tracking, data_version=uuid.uuid4().hex)


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags=NOT_CACHEABLE)
def finetuned(context: dg.AssetExecutionContext, config: FinetuneConfig, image_manifest, head_augmented,
              tracking: MlflowTracking, compute: ComputeDevice):
    """Every layer group unfrozen, earlier groups at lower learning rates, on augmented images."""
    _fail_on_config(config.precompute, config.augment)
    device = compute.setup()
    with _mlflow_run(context, tracking, "finetuned", config.model_dump()) as run:
        record = recipe.train_on_images(
            head_augmented, image_manifest, "finetuned", config.epochs, config.lrs or config.lr,
            freeze=0, augment=config.augment, batch_size=config.batch_size, seed=config.seed,
            num_workers=compute.num_workers, device=device, on_epoch=_epoch_logger(context, run, "finetuned"),
            freeze_bn_stats=config.freeze_bn_stats, augmentation=config.augmentation())
        run.artifact(recipe.save_model(record, context.run.run_id), "model")
        return _finish(context, run, record, tracking, data_version=uuid.uuid4().hex)
