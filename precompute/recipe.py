"""The recipe's stages as plain functions: what an asset body calls, and what a notebook can call.

precompute -> head on the cache -> head with augmentation -> unfreeze and fine-tune -> evaluate.
A trained stage is a ``StageRecord`` (precompute.records): the state dict and everything needed
to rebuild the network; its ``to_dict()`` is the model file. What the model predicts (one class
or several labels per image) is the record's ``Task`` (precompute.task).

Each stage's settings are a typed, checked object (``CacheSettings``, ``HeadStage``,
``ImageStage``); the functions at the end (``fill_cache``, ``train_head_stage``,
``run_image_stage``, ``evaluation_report``) run a stage as the pipeline does, tracking included,
so an asset body only turns its config into settings and the result into metadata.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, ContextManager, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from precompute.archs import ArchSpec, body_output_shape, cut_body, describe_groups, freeze_to, get_arch, layer_groups
from precompute.features import PrecomputeStats, check_decoder, compute_activations
from precompute.heads import HeadConfig, UnknownHead, build_head, check_head_config
from precompute.manifest import ok_rows
from precompute.records import REQUIRED_KEYS, ActivationsRef, StageRecord
from precompute.store.dtypes import itemsize
from precompute.store import ActivationStore, CacheCorruption, CacheKey, Entry, ResultCache, VerifyReport, view_key
from precompute.task import Task
from precompute.train import (ArrayRows, EpochCallback, FitOptions, LearningRates, Schedule, StreamedRows, check_precompute_augment,
                              N_LAYER_GROUPS, ConfigError, check_batch_size, check_lrs, differential_lrs, fit,
                              fit_head_on_cache, group_lrs, lr_find, predict_proba, tensor_batches)
from precompute.transforms import Augmentation, ImageDataset, TransformSpec, eval_transform, train_transform
from precompute.weights import (ALLOW_DOWNLOAD_ENV, WeightsUnavailable, load_weights, looks_like_torch_file,
                                resolve_weights_file)

# Cached rows up to this size (as float32) are loaded once; larger sets are streamed per chunk.
DEFAULT_MEMORY_BUDGET = 4 << 30
HEAD_CODE_VERSION = "1"  # bump when training on the cache changes its result for the same inputs


@dataclass
class Backbone:
    spec: ArchSpec
    body: nn.Sequential
    weights_id: str
    xtra_cut: int


def load_backbone(arch: str, xtra_cut: int = 0, weights: str = "pretrained",
                  weights_path: str | None = None) -> Backbone:
    spec = get_arch(arch)
    model, weights_id = load_weights(spec, weights, weights_path)
    return Backbone(spec, cut_body(model, spec, xtra_cut), weights_id, xtra_cut)


def transform_for(spec: ArchSpec, size: int | None = None) -> TransformSpec:
    return TransformSpec.for_arch(spec, size=size)


def activation_key(bb: Backbone, ts: TransformSpec, pooled: bool = True, dtype: str = "float32",
                   decoder: str = "pil") -> CacheKey:
    return CacheKey(arch=bb.spec.name, weights_id=bb.weights_id, xtra_cut=bb.xtra_cut,
                    cut_index=len(bb.body), transform=ts.key(), pooled=pooled, dtype=dtype, decoder=decoder)


def precompute(manifest: pd.DataFrame, store: ActivationStore, bb: Backbone, ts: TransformSpec,
               pooled: bool = True, dtype: str = "float32", batch_size: int = 32, chunk_rows: int = 256,
               num_workers: int = 0, device="cpu", on_progress=None,
               shard: tuple[int, int] = (0, 1), decoder: str = "pil") -> tuple[Entry, PrecomputeStats, str]:
    """Fill the entry for every ok image (of one shard); returns (entry, stats, view key).
    ``decoder``: "pil" (CPU) or "nvjpeg" (JPEGs on the CUDA device; part of the entry's key)."""
    rows = ok_rows(manifest)
    entry = store.entry(activation_key(bb, ts, pooled, dtype, decoder))
    stats = compute_activations(bb.body, rows, eval_transform(ts), entry, batch_size, chunk_rows,
                                num_workers, device, on_progress, shard)
    rows = rows[~rows["image_id"].isin({f[0] for f in stats.failed})]  # the view is what downstream can read
    return entry, stats, view_key(entry.key, rows["image_id"], rows["label"])


def without_failed(manifest: pd.DataFrame, failed) -> pd.DataFrame:
    """The manifest with images that failed at precompute (``PrecomputeStats.failed``: image_id, path,
    reason) as status ``failed``: stages after the cache leave them out instead of missing their rows."""
    reasons = {image_id: reason for image_id, _, reason in failed or ()}
    hit = manifest["image_id"].isin(reasons.keys()) & (manifest["status"] == "ok")
    if not hit.any():
        return manifest
    out = manifest.copy()
    out.loc[hit, "status"] = "failed"
    out.loc[hit, "reason"] = out.loc[hit, "image_id"].map(reasons)
    logging.getLogger(__name__).warning("%d images failed when their activations were computed and are left out: "
                                        "%s", int(hit.sum()), sorted(out.loc[hit, "path"])[:10])
    return out


def failed_images(manifest: pd.DataFrame) -> list[list[str]]:
    """[image_id, path, reason] of the manifest's ``failed`` rows: a stage record carries them on."""
    rows = manifest[manifest["status"] == "failed"]
    return [[r.image_id, r.path, r.reason] for r in rows.itertuples()]


class ReadOnlyStore(RuntimeError):
    """The store cannot be written, and the entry lacks rows or holds damage: nothing here can fix it."""


def repair_entry(entry: Entry, manifest: pd.DataFrame, writable: bool = True) -> VerifyReport:
    """Check every block the manifest's rows live in; drop damaged chunks so the next precompute
    recomputes their rows. A read-only store cannot be repaired or filled: ReadOnlyStore (a
    RuntimeError) if it lacks rows or holds damage, naming both counts."""
    ids = list(dict.fromkeys(ok_rows(manifest)["image_id"]))
    if writable:
        return entry.repair(ids)
    report = entry.verify(ids)
    missing = entry.missing(ids)
    if missing or report.damaged:
        raise ReadOnlyStore(f"activation store {entry.store.root} is read-only, and entry {entry.rel} lacks "
                           f"{len(missing)} of {len(ids)} rows and has {len(report.damaged)} damaged chunk(s): "
                           "point PRECOMPUTE_STORE at a writable store, or fill this one where it is writable")
    return report


def open_entry(store: ActivationStore, ref: ActivationsRef | dict) -> Entry:
    """The entry an activations result points at (its key.json is put right if it was damaged).
    The rows are not checked here: ``check_same_weights`` and ``verify_entry`` do that."""
    return store.entry(ActivationsRef.coerce(ref).cache_key())


def check_same_weights(bb: Backbone, entry: Entry) -> None:
    if bb.weights_id != entry.key.weights_id:
        raise RuntimeError(f"weights changed since the activations were computed ({bb.weights_id} vs "
                           f"{entry.key.weights_id}): materialize the activations asset again")


def save_model(record: StageRecord, run_id: str, folder: str | None = None) -> str:
    """The stage record (state dict, arch, task, transform) as one file for predict/reload."""
    import os
    import tempfile

    folder = folder or tempfile.mkdtemp(prefix=f"model-{run_id[:8]}-")
    path = os.path.join(folder, f"{record.stage}.pt")
    torch.save(record.to_dict(groups=False), path)
    return path


Classes = Task | Sequence[str]  # a task, or class names (the task is then the manifest's, for these classes)


def _task(manifest: pd.DataFrame, classes: Classes) -> Task:
    return classes if isinstance(classes, Task) else Task.from_manifest(manifest, list(classes))


def labelled_split(manifest: pd.DataFrame, classes: Classes, split: str) -> pd.DataFrame:
    """Usable rows of ``split`` whose classes the model knows, with a ``target`` column: the
    task's encoding (class index, or a multi-hot float32 vector per image; see ``targets``)."""
    task = _task(manifest, classes)
    rows = ok_rows(manifest, split)
    known = rows["label"].map(task.knows).astype(bool)
    if (~known).any():
        logging.getLogger(__name__).warning(
            "%d %s images have labels %s the model was not trained on: left out; rerun from head_on_cache "
            "to include them", int((~known).sum()), split, sorted(set(rows.loc[~known, "label"])))
    rows = rows[known]
    encoded = task.encode(rows["label"])
    return rows.assign(target=list(encoded) if task.multilabel else encoded)


def targets(rows: pd.DataFrame, task: Task) -> np.ndarray:
    """The ``target`` column of ``labelled_split`` as an array: (n,) int64 class indices, or
    (n, n_classes) float32 multi-hot rows for a multi-label task."""
    if not task.multilabel:
        return rows["target"].to_numpy(dtype=np.int64, copy=True)  # writable: pandas 3 hands out read-only views
    return np.stack(list(rows["target"])) if len(rows) else np.zeros((0, len(task.classes)), np.float32)


def cached_split(entry: Entry, manifest: pd.DataFrame, classes: Classes, split: str):
    task = _task(manifest, classes)
    rows = labelled_split(manifest, task, split)
    return entry.read(list(rows["image_id"])), targets(rows, task)


def _stage_record(stage: str, bb_or_spec, xtra_cut: int, task: Task, head_config, ts, weights_id,
                  model: nn.Module, history, lrs=None, groups=None, **extra) -> StageRecord:
    return StageRecord(stage=stage, arch=bb_or_spec.name, xtra_cut=xtra_cut, task=task, head_config=head_config,
                       transform=ts, weights_id=weights_id,
                       state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                       history=history, groups=describe_groups(groups, lrs) if groups else None, **extra)


def cached_rows(entry: Entry, manifest: pd.DataFrame, classes: Classes, split: str,
                memory_budget: int) -> ArrayRows | StreamedRows:
    """The split's cached rows: in memory when they fit ``memory_budget`` bytes, else streamed."""
    task = _task(manifest, classes)
    rows = labelled_split(manifest, task, split)
    y = targets(rows, task)
    if len(rows) * entry.row_nbytes() * 4 // itemsize(entry.key.dtype) <= memory_budget:
        return ArrayRows(entry.read(list(rows["image_id"])), y)
    return StreamedRows(entry, list(rows["image_id"]), y)


def _tuned(record: StageRecord, model: nn.Module, valid_batches, device="cpu") -> StageRecord:
    """A multi-label record gets per-label thresholds, each the one with the best F1 on validation."""
    if record.task.multilabel:
        record.task = record.task.tuned(*predict_proba(model, valid_batches, device, record.task))
    return record


def _new_head(bb: Backbone, ts: TransformSpec, n_classes: int, head_config: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_head(body_output_shape(bb.body, ts.size)[0], n_classes, **head_config)


def train_head_on_cache(entry: Entry, manifest: pd.DataFrame, bb: Backbone, ts: TransformSpec,
                        head_config: dict, epochs: int = 3, lr: float = 1e-3, batch_size: int = 64,
                        seed: int = 0, on_epoch: EpochCallback | None = None,
                        memory_budget: int = DEFAULT_MEMORY_BUDGET, schedule: Schedule | None = None,
                        options: FitOptions | None = None) -> StageRecord:
    """fastai's precompute=True: only the head trains, on rows read back from the cache."""
    task = Task.from_manifest(manifest)
    train = cached_rows(entry, manifest, task, "train", memory_budget)
    valid = cached_rows(entry, manifest, task, "valid", memory_budget)
    head = _new_head(bb, ts, len(task.classes), head_config, seed)
    schedule = schedule or Schedule("one_cycle", epochs=epochs)
    options = options or FitOptions()
    history = fit_head_on_cache(head, train, valid, lr=lr, batch_size=batch_size, seed=seed, on_epoch=on_epoch,
                                schedule=schedule, task=task, options=options)
    groups = layer_groups(bb.body, head, bb.spec, bb.xtra_cut)
    freeze_to(groups, len(groups) - 1)
    record = _stage_record("head_on_cache", bb.spec, bb.xtra_cut, task, head_config, ts, bb.weights_id,
                           nn.Sequential(bb.body, head), history, [0.0] * (len(groups) - 1) + [lr], groups,
                           seed=seed, schedule=schedule, lr=lr, streamed=isinstance(train, StreamedRows),
                           fit_options=options, failed_images=failed_images(manifest))
    return _tuned(record, head, valid.batches(512))


def lr_find_on_cache(entry: Entry, manifest: pd.DataFrame, bb: Backbone, ts: TransformSpec, head_config: dict,
                     batch_size: int = 64, seed: int = 0, num_it: int = 100,
                     memory_budget: int = DEFAULT_MEMORY_BUDGET) -> dict:
    """lr_find for a new head on the cached activations (cheap: no body runs)."""
    task = Task.from_manifest(manifest)
    train = cached_rows(entry, manifest, task, "train", memory_budget)
    head = _new_head(bb, ts, len(task.classes), head_config, seed)
    return lr_find(head, [head], [1.0], lambda gen: train.batches(batch_size, gen), num_it=num_it, seed=seed,
                   freeze_bn_stats=False, task=task)


def lr_find_on_ref(ref: ActivationsRef | dict, manifest: pd.DataFrame, store: ActivationStore, head_config: dict,
                   batch_size: int = 64, seed: int = 0, num_it: int = 100) -> dict:
    """``lr_find_on_cache`` on the entry an activations result points at (images failed there left out)."""
    ref = ActivationsRef.coerce(ref)
    manifest = without_failed(manifest, ref.failed_images)  # no rows for them
    return lr_find_on_cache(open_entry(store, ref), manifest, ref.backbone(), ref.transform(), head_config,
                            batch_size, seed, num_it)


def verify_entry(entry: Entry, manifest: pd.DataFrame, failed=()) -> dict[str, tuple[bool, dict]]:
    """The cache's health for one manifest: name -> (passed, details). ``failed`` is
    ``PrecomputeStats.failed``: those images have no row, and the checks name them with their reason."""
    rows = ok_rows(manifest)
    ids = list(dict.fromkeys(rows["image_id"]))
    missing = entry.missing(ids)
    reasons = {image_id: f"{path}: {reason}" for image_id, path, reason in failed}
    paths = rows.drop_duplicates("image_id").set_index("image_id")["path"]
    named = {"missing_images": [reasons.get(i, f"{paths[i]}: no row in the entry") for i in missing[:20]]}
    finite, checked, damage = True, 0, ""
    gone = set(missing)
    present = [i for i in ids if i not in gone]  # one missing row must not hide the others' values
    if present:
        try:  # every block read here is checked against its crc32c
            for _, block in entry.iter_blocks(present):
                finite &= bool(np.isfinite(block).all())
                checked += len(block)
        except CacheCorruption as exc:
            damage = str(exc)
    bad = manifest[manifest["status"] != "ok"]
    unexplained = bad[bad["reason"].fillna("").str.strip() == ""]
    return {
        "rows_match_manifest": (not missing, {"manifest_images": len(ids), "missing_rows": len(missing), **named}),
        "finite_values": (finite and not damage, {"rows_checked": checked}),
        "blocks_verified": (not missing and not damage, {"rows_read": checked, "damage": damage or "none"}),
        "every_image_accounted_for": (not missing and unexplained.empty,
                                      {"with_row": len(ids) - len(missing), "skipped_with_reason": len(bad),
                                       "unexplained": len(unexplained), "failed_at_precompute": len(failed), **named}),
    }


def head_fingerprint(view: str, config: dict) -> str:
    """What determines a head trained on the cache: the rows it reads, its config and seed."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps({"view": view, "config": config, "code": HEAD_CODE_VERSION},
                                     sort_keys=True, default=str).encode()).hexdigest()[:24]


def save_head_result(entry: Entry, fingerprint: str, record: StageRecord) -> None:
    import io

    buf = io.BytesIO()
    torch.save(record.to_dict() if isinstance(record, StageRecord) else record, buf)
    ResultCache(entry).put(f"head-{fingerprint}.pt", buf.getvalue())  # best effort: a read-only store warns


def load_head_result(entry: Entry, fingerprint: str) -> StageRecord | None:
    import io

    blob = ResultCache(entry).get(f"head-{fingerprint}.pt")
    if blob is None:
        return None
    record = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return checked_record(record, f"cached head result head-{fingerprint}.pt in {entry.rel}")


def head_on_cache_cached(entry: Entry, fingerprint: str, train: Callable[[], StageRecord],
                         reuse: bool = True) -> tuple[StageRecord, bool]:
    """The head for ``fingerprint`` (head_fingerprint: rows, config, seed): the one saved beside the
    entry when ``reuse`` and one is there, else ``train()``'s, saved for the next identical request.
    Returns (record, reused)."""
    record = load_head_result(entry, fingerprint) if reuse else None
    if record is not None:
        return record, True
    record = train()
    save_head_result(entry, fingerprint, record)
    return record, False


def checked_record(record, source: str) -> StageRecord:
    """A stage record read from a file or a shared cache is data: its head must be one the code
    registers or the operator allows (precompute.heads), checked before anything is built or imported.
    A dict (a file's content, this version's or an earlier one's) becomes a ``StageRecord``."""
    if isinstance(record, dict) and set(REQUIRED_KEYS) <= record.keys():
        head_config = record["head_config"]
    elif isinstance(record, StageRecord):
        head_config = record.head_config
    else:
        raise ValueError(f"{source} is not a stage record (a dict with arch, classes, head_config, state_dict): "
                         "pass a model .pt saved by a training stage")
    try:
        check_head_config(head_config)
    except UnknownHead as e:
        raise UnknownHead(f"{source}: {e}") from None
    return StageRecord.coerce(record)


def rebuild(record: StageRecord, size: int) -> tuple[ArchSpec, nn.Sequential, list[nn.Module]]:
    """The network of a stage record, without loading pretrained weights again."""
    spec = get_arch(record.arch)
    body = cut_body(spec.build(), spec, record.xtra_cut)
    head = build_head(body_output_shape(body, size)[0], len(record.classes), **record.head_config)
    model = nn.Sequential(body, head)
    model.load_state_dict(record.state_dict)
    return spec, model, layer_groups(body, head, spec, record.xtra_cut)


def image_loader(rows: pd.DataFrame, transform: Callable, batch_size: int, shuffle: bool,
                 seed: int | torch.Generator = 0, num_workers: int = 0) -> DataLoader:
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    column = rows["target"]  # labelled_split's: class indices, or a multi-hot vector per image
    labels = (np.stack(list(column)) if len(column) and np.ndim(column.iloc[0]) else
              column.to_numpy(dtype=np.int64))
    return DataLoader(ImageDataset(list(rows["path"]), labels, transform), batch_size=batch_size,
                      shuffle=shuffle, generator=gen, num_workers=num_workers,
                      persistent_workers=False)


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
        check_precompute_augment(self.precompute, self.augment)
        check_batch_size(self.batch_size)
        if self.augmentation:
            Augmentation(self.augmentation.get("preset"), self.augmentation.get("max_zoom"))
        if not isinstance(self.lr, (int, float)) or self.lr != 0:  # a rate of 0 only measures (tests do)
            check_lrs(self.lr, N_LAYER_GROUPS, self.frozen(N_LAYER_GROUPS))

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
        ts = previous.transform
        if self.size and self.size != ts.size:  # progressive resizing: same weights, new input size
            ts = TransformSpec(**{**ts.key(), "size": self.size, "resize": None})
        return ts


def train_image_stage(previous: StageRecord, manifest: pd.DataFrame, stage: ImageStage, num_workers: int = 0,
                      device="cpu", on_epoch: EpochCallback | None = None) -> StageRecord:
    """Continue from ``previous`` on images as ``stage`` says; the task (classes, multi-label) is the previous one's."""
    previous = StageRecord.coerce(previous)
    manifest = without_failed(manifest, previous.failed_images)  # the stages before left them out too
    ts = stage.transform(previous)
    spec, model, groups = rebuild(previous, ts.size)
    freeze = stage.frozen(len(groups))
    freeze_to(groups, freeze, train_bn=stage.train_bn)
    lrs = stage_lrs(stage.lr, len(groups), freeze, stage.lr_spread)
    if stage.train_bn and 0 < freeze < len(groups):  # frozen groups' BN learns at the earliest trainable rate
        lrs = [lrs[freeze]] * freeze + lrs[freeze:]
    task = previous.task
    train_tf = train_transform(ts, **(stage.augmentation or {})) if stage.augment else eval_transform(ts)
    train_rows = labelled_split(manifest, task, "train")
    valid = image_loader(labelled_split(manifest, task, "valid"), eval_transform(ts), 64, False, 0, num_workers)
    bs = stage.batch_size
    history = fit(model, groups, lrs, lambda gen: image_loader(train_rows, train_tf, bs, True, gen, num_workers),
                  lambda: valid, -(-len(train_rows) // bs), stage.schedule, stage.seed, device=device,
                  task=task, freeze_bn_stats=stage.freeze_bn_stats, on_epoch=on_epoch, options=stage.options)
    record = _stage_record(stage.name, spec, previous.xtra_cut, task, previous.head_config, ts,
                           previous.weights_id, model, history, lrs, groups, seed=stage.seed,
                           schedule=stage.schedule, augment=stage.augment, augmentation=stage.augmentation or {},
                           freeze=freeze, freeze_bn_stats=stage.freeze_bn_stats, train_bn=stage.train_bn,
                           fit_options=stage.options, failed_images=failed_images(manifest))
    return _tuned(record, model, valid, device)


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
                      num_workers: int = 0, device="cpu", freeze_bn_stats: bool = True) -> dict:
    """lr_find for the (partly) unfrozen network on augmented images; rates keep the groups' ratios."""
    previous = StageRecord.coerce(previous)
    manifest = without_failed(manifest, previous.failed_images)
    ts = previous.transform
    _, model, groups = rebuild(previous, ts.size)
    freeze_to(groups, freeze)
    rows = labelled_split(manifest, previous.task, "train")
    tf = train_transform(ts, **(augmentation or {}))
    ratios = stage_lrs(1.0, len(groups), freeze, lr_spread)
    return lr_find(model, groups, ratios, lambda gen: image_loader(rows, tf, batch_size, True, gen, num_workers),
                   num_it=num_it, seed=seed, device=device, freeze_bn_stats=freeze_bn_stats, task=previous.task)


def predict_paths(record: StageRecord, paths: Sequence[str], tta: int = 0, augmentation: dict | None = None,
                  batch_size: int = 64, num_workers: int = 0, device="cpu", seed: int = 0):
    """Probabilities for images: center crop, and with ``tta`` > 0 also the mean of the center crop
    and ``tta`` augmented views (fastai's TTA). Returns (probs, tta_probs or None). The task's
    activation: softmax over classes, or for a multi-label model one sigmoid per label."""
    ts = record.transform
    _, model, _ = rebuild(record, ts.size)
    rows = pd.DataFrame({"path": list(paths), "target": -1})
    probs, _ = predict_proba(model, image_loader(rows, eval_transform(ts), batch_size, False, 0, num_workers), device,
                             record.task)
    if not tta:
        return probs, None
    views = [probs]
    aug = train_transform(ts, **(augmentation or {}))
    for i in range(tta):
        torch.manual_seed(seed + i)  # augmentations draw from torch's global generator
        views.append(predict_proba(model, image_loader(rows, aug, batch_size, False, 0, 0), device, record.task)[0])
    return probs, np.mean(views, axis=0)


def evaluate_on_images(record: StageRecord, manifest: pd.DataFrame, num_workers: int = 0, device="cpu", tta: int = 0,
                       augmentation: dict | None = None):
    """(probs, targets, tta_probs or None) on the validation split."""
    rows = labelled_split(manifest, record.task, "valid")
    probs, tta_probs = predict_paths(record, list(rows["path"]), tta, augmentation, num_workers=num_workers,
                                     device=device)
    return probs, targets(rows, record.task), tta_probs


def evaluate_on_cache(record: StageRecord, entry: Entry, manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    _, model, _ = rebuild(record, record.transform.size)
    x, y = cached_split(entry, manifest, record.task, "valid")
    return predict_proba(model[1], tensor_batches(x, y), task=record.task)


def evaluate_stages(records: dict[str, StageRecord], entry: Entry | None, manifest: pd.DataFrame,
                    num_workers: int = 0, device="cpu", tta: int = 0,
                    augmentation: dict | None = None) -> tuple[dict[str, dict], tuple]:
    """Every stage on the validation split, with TTA when ``tta`` > 0; the stage named head_on_cache is
    also scored on the cache (``entry``): the same numbers, a check that the cache is not stale.
    Returns (metrics per stage, (probs, targets, tta_probs) of the last stage)."""
    stages, final = {}, None
    for name, record in records.items():
        task = record.task
        probs, y, tta_probs = evaluate_on_images(record, manifest, num_workers, device, tta, augmentation)
        if name == "head_on_cache" and entry is not None:
            cache_probs, _ = evaluate_on_cache(record, entry, manifest)
            stages[name + " (on cache)"] = task.metrics(cache_probs, y)
        m = task.metrics(probs, y)
        if tta_probs is not None:
            t = task.metrics(tta_probs, y)
            m.update(tta_accuracy=t["accuracy"], tta_loss=t["loss"])
        stages[name] = m
        final = (probs, y, tta_probs)
    return stages, final


def write_report(folder, title: str, records: dict[str, StageRecord], stages: dict[str, dict], final: tuple,
                 manifest: pd.DataFrame, details: dict, top_losses: int = 8) -> str:
    """The report of an evaluation in ``folder``: the last stage's confusion matrix and worst mistakes,
    every stage's learning curves, and report.md (returned) with the metrics of ``stages``."""
    from pathlib import Path

    from precompute import evaluate

    folder = Path(folder)
    task = list(records.values())[-1].task
    classes, thresholds, multilabel = list(task.classes), getattr(task, "thresholds", None), task.multilabel
    probs, y, _ = final
    preds = task.predictions(probs)
    if multilabel:
        evaluate.plot_label_confusion(y, preds, classes, folder / "confusion_matrix.png")
        tags = task.tags(probs)

        def caption(i: int) -> str:
            true = [c for c, on in zip(classes, y[i] > 0.5) if on]
            return f"true {' '.join(true) or '-'} / pred {' '.join(tags[i]) or '-'}"
    else:
        evaluate.plot_confusion(y, preds, classes, folder / "confusion_matrix.png")

        def caption(i: int) -> str:
            return f"true {classes[y[i]]} / pred {classes[preds[i]]} ({probs[i, preds[i]]:.2f})"
    evaluate.plot_learning_curves({r.stage: r.history for r in records.values()}, folder / "learning_curves.png")
    valid = labelled_split(manifest, task, "valid")
    worst = evaluate.top_losses(probs, y, top_losses)
    evaluate.plot_image_grid([valid["path"].iloc[i] for i in worst], [caption(i) for i in worst],
                             folder / "top_losses.png")
    md = evaluate.render_report(
        title, stages, classes, details,
        {"Confusion matrix (finetuned)": "confusion_matrix.png", "Top losses (finetuned)": "top_losses.png",
         "Learning curves": "learning_curves.png"},
        evaluate.per_class(probs, y, classes, thresholds),
        () if multilabel else evaluate.most_confused(y, preds, classes), multilabel)
    (folder / "report.md").write_text(md)
    return md


# -- the stages as the pipeline runs them --------------------------------------------------------------
# Each takes the stage's typed settings, the upstream results and ``open_run`` (params -> an open
# tracking run, precompute.tracking's run logger): the orchestrator decides where runs go, these
# decide what is trained, logged and handed on. ``log`` takes .info/.warning (a logger, Dagster's too).

LOG = logging.getLogger(__name__)
OpenRun = Callable[[dict], ContextManager]


def epoch_logger(run, stage: str, log=LOG) -> EpochCallback:
    """Each epoch's losses and accuracy to the run (and the lr of every step), and a log line."""
    step = [0]

    def on_epoch(row: dict) -> None:
        run.metrics({k: v for k, v in row.items() if k not in ("epoch", "lr_steps")}, step=row["epoch"])
        run.series("lr_step", row["lr_steps"], start=step[0])  # the schedule as it ran, per batch
        step[0] += len(row["lr_steps"])
        log.info(f"{stage} epoch {row['epoch']}: train_loss {row['train_loss']:.4f} valid_loss {row['valid_loss']:.4f} "
                 f"valid_accuracy {row['valid_accuracy']:.4f} ({row['seconds']:.1f}s)")
    return on_epoch


def log_stage(run, record: StageRecord) -> StageRecord:
    """Inside the stage's run: its layer groups, its run id on the record, and for a multi-label
    record each label's threshold (as predict will use it)."""
    import re

    run.layer_groups(record.groups)
    record.mlflow_run_id = run.run_id
    if record.thresholds is not None:
        run.metrics({"threshold." + re.sub(r"[^\w\-. /]", "_", c): t for c, t in zip(record.classes, record.thresholds)})
    return record


def stage_metadata(record: StageRecord, thresholds: bool = True) -> dict:
    """What the orchestrator shows of a trained stage: its run, last epoch and layer groups."""
    last = record.last_epoch
    out = {"mlflow_run_id": record.mlflow_run_id, "valid_accuracy": float(last.get("valid_accuracy", float("nan"))),
           "valid_loss": float(last.get("valid_loss", float("nan"))), "layer_groups": record.groups}
    if thresholds and record.thresholds is not None:
        out["thresholds"] = dict(zip(record.classes, record.thresholds))
    return out


@dataclass(frozen=True)
class CacheSettings:
    """How the activations are computed and stored (the ``activations`` stage's settings)."""
    size: int | None = None        # image size; None: the arch's input size
    pooled: bool = True            # concat max+avg pool vector (fastai); False: spatial maps
    dtype: str = "float32"
    batch_size: int = 32
    chunk_rows: int = 256          # rows per committed chunk: the most a crash can lose
    weights: str = "pretrained"
    weights_path: str | None = None
    decoder: str = "pil"           # pil (CPU) or nvjpeg (JPEGs on the CUDA device): part of the entry's key
    DTYPES: ClassVar[tuple[str, ...]] = ("float32", "float16", "bfloat16")  # bfloat16 is stored as its bits

    def __post_init__(self):
        if self.dtype not in self.DTYPES:
            raise ConfigError(f"dtype {self.dtype!r}: the activation store keeps {' or '.join(self.DTYPES)}")
        check_batch_size(self.batch_size)
        if isinstance(self.chunk_rows, bool) or not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise ConfigError(f"chunk_rows {self.chunk_rows!r}: use 1 or more rows per committed chunk")
        if self.weights not in ("pretrained", "random"):
            raise ConfigError(f"weights {self.weights!r}: use 'pretrained' or 'random' (or pass weights_path)")
        if self.weights == "random" and self.weights_path is not None:
            raise ConfigError("weights='random' and a weights_path contradict each other: drop one")

    def check_weights(self, arch: str) -> None:
        """The weights ``arch`` would load exist (or may be downloaded); nothing is loaded or downloaded."""
        if self.weights_path is not None:
            path = Path(self.weights_path).expanduser()
            if not path.is_file():
                raise ConfigError(f"weights_path {self.weights_path} is not a file: point it at a state dict (.pt/.pth)")
            try:
                torch_file = looks_like_torch_file(path)  # 4 bytes; tensors are checked on load
            except OSError as e:
                raise ConfigError(f"weights_path {self.weights_path} cannot be read ({e.strerror or e}): "
                                  "fix its permissions") from None
            if not torch_file:
                raise ConfigError(f"weights_path {self.weights_path} is not a file torch.save writes (text, an "
                                  f"image?): point it at the state dict of {arch}, saved with "
                                  "torch.save(model.state_dict(), path)")
            return
        spec = get_arch(arch)
        if self.weights == "random" or (spec.source == "torchvision" and os.environ.get(ALLOW_DOWNLOAD_ENV) == "1"):
            return  # nothing to find, or fetched by the run itself
        try:
            resolve_weights_file(spec, self.weights, None)
        except (WeightsUnavailable, ValueError) as e:
            raise ConfigError(str(e)) from None


@dataclass
class CacheFill:
    """What filling the cache did: the reference later stages read, and the entry's health."""
    ref: ActivationsRef
    entry: Entry
    stats: PrecomputeStats
    repaired: VerifyReport
    checks: dict[str, tuple[bool, dict]]

    def metadata(self) -> dict:
        on_disk, raw = self.entry.nbytes_on_disk(), self.entry.raw_nbytes()
        return {"entry": self.entry.rel, "entry_key": self.entry.key.digest(), "view_key": self.ref.view_key,
                "key_parts": json.loads(json.dumps(self.entry.key.parts(), default=str)),
                **self.stats.as_dict(), "bytes_on_disk": on_disk,
                "compression_ratio": round(raw / on_disk, 3) if on_disk else 0.0, "codec": self.entry.codec(),
                "chunks_verified": len(self.repaired.verified),
                "chunks_unverified": len(self.repaired.unverified),  # written before checksums: not verifiable
                "chunks_repaired": self.repaired.damaged}


def fill_cache(manifest: pd.DataFrame, store: ActivationStore, arch: str, xtra_cut: int, settings: CacheSettings,
               writable: bool = True, num_workers: int = 0, device="cpu", on_progress=None, log=LOG) -> CacheFill:
    """The ``activations`` stage: damaged chunks dropped (so their rows are computed again), every
    missing row computed, and the entry checked against the manifest (``verify_entry``)."""
    s = settings
    check_decoder(s.decoder, device)  # before the weights load: nvjpeg without CUDA is a config error
    bb = load_backbone(arch, xtra_cut, s.weights, s.weights_path)
    ts = transform_for(bb.spec, s.size)
    repaired = repair_entry(store.entry(activation_key(bb, ts, s.pooled, s.dtype, s.decoder)), manifest, writable)
    if repaired.damaged:
        log.warning(f"dropped {len(repaired.damaged)} damaged chunk(s), their rows are recomputed: "
                    + "; ".join(repaired.damaged.values()))
    entry, stats, view = precompute(manifest, store, bb, ts, s.pooled, s.dtype, s.batch_size, s.chunk_rows,
                                    num_workers, device, on_progress, decoder=s.decoder)
    log.info(f"activations {entry.rel}: {stats.computed} computed, {stats.reused} reused, "
             f"{stats.images_per_s:.1f} img/s, {entry.nbytes_on_disk() / 2**20:.1f} MiB on disk")
    if stats.failed:  # the run goes on without them (no rows: later stages leave them out); the checks name them
        log.warning(f"{len(stats.failed)} images failed to decode or transform and have no row: "
                    + "; ".join(f"{path}: {reason}" for _, path, reason in stats.failed[:10]))
    ref = ActivationsRef.of(entry, view, s.weights, s.weights_path, stats.failed)
    return CacheFill(ref, entry, stats, repaired, verify_entry(entry, manifest, stats.failed))


@dataclass(frozen=True)
class HeadStage:
    """The ``head_on_cache`` stage: a new head trained on the cached rows only (fastai's precompute=True)."""
    head_config: dict
    schedule: Schedule = Schedule("one_cycle", epochs=5)
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0
    precompute: bool = True
    augment: bool = False
    options: FitOptions = FitOptions()

    def __post_init__(self):
        check_precompute_augment(self.precompute, self.augment)
        if not self.precompute:
            raise ConfigError("head_on_cache trains on the cache: set precompute=True, or use head_augmented "
                              "to train the head on images")
        check_batch_size(self.batch_size)
        check_lrs(self.lr, 1)
        HeadConfig(**self.head_config)


def schedule_params(schedule: Schedule) -> dict:
    """The schedule's warm-up as it runs (not in the stage configs): sgdr's share of the first cycle
    at lr/100, one_cycle's share of the steps rising to the peak."""
    return {"warmup": schedule.warmup if schedule.kind == "sgdr" else 0.0,
            "pct_start": schedule.pct_start if schedule.kind == "one_cycle" else 0.0}


def train_head_stage(ref: ActivationsRef | dict, manifest: pd.DataFrame, store: ActivationStore, stage: HeadStage,
                     open_run: OpenRun, params: dict, reuse: bool = True,
                     log=LOG) -> tuple[StageRecord, bool, str]:
    """``head_on_cache`` as the pipeline runs it. A head is a pure function of its rows, config and
    seed, so an identical request (same ``head_fingerprint`` of the view and ``params``) returns the
    earlier head instead of training again. Returns (record, reused, fingerprint)."""
    ref = ActivationsRef.coerce(ref)
    manifest = without_failed(manifest, ref.failed_images)  # no rows for them
    entry = open_entry(store, ref)
    fingerprint = head_fingerprint(ref.view_key, {**params, "lr": stage.lr})

    def train() -> StageRecord:
        bb = ref.backbone()
        check_same_weights(bb, entry)
        ts = ref.transform()
        logged = {**params, **stage.options.as_dict(), **schedule_params(stage.schedule), "lr": stage.lr,
                  "size": ts.size, "epochs": stage.schedule.total_epochs, "entry_key": entry.key.digest(), "view_key": ref.view_key, "pooled": entry.key.pooled,
                  "fingerprint": fingerprint}
        with open_run(logged) as run:
            record = train_head_on_cache(entry, manifest, bb, ts, stage.head_config, lr=stage.lr,
                                         batch_size=stage.batch_size, seed=stage.seed, schedule=stage.schedule,
                                         on_epoch=epoch_logger(run, "head_on_cache", log), options=stage.options)
            return log_stage(run, record)

    record, reused = head_on_cache_cached(entry, fingerprint, train, reuse=reuse)
    if reused:
        log.info(f"head_on_cache reused: same activations ({ref.view_key}), config and seed as MLflow run "
                 f"{record.mlflow_run_id}; nothing trained")
    return record, reused, fingerprint


def run_image_stage(previous: StageRecord | dict, manifest: pd.DataFrame, stage: ImageStage, open_run: OpenRun,
                    params: dict, export: bool = False, num_workers: int = 0, device="cpu",
                    log=LOG) -> StageRecord:
    """An image stage as the pipeline runs it, in one tracked run whose params carry the real image
    size and epoch count; with ``export`` the record also goes to the run as the model file and
    as a servable network."""
    previous = StageRecord.coerce(previous)
    with open_run(stage.logged_params(previous, params)) as run:
        record = train_image_stage(previous, manifest, stage, num_workers, device, epoch_logger(run, stage.name, log))
        if export:
            import tempfile

            run.artifact(save_model(record, run.run_id, tempfile.mkdtemp(prefix="model-")), "model")
            run.pytorch_model(record, "network")
        return log_stage(run, record)


def augmented_samples(previous: StageRecord | dict, manifest: pd.DataFrame, stage: ImageStage, path,
                      n: int = 8):
    """What the model sees in ``stage``: ``n`` augmented training images, plotted to ``path``."""
    from precompute import evaluate
    from precompute.images import load_rgb

    previous = StageRecord.coerce(previous)
    ts = stage.transform(previous)
    rows = labelled_split(manifest, previous.task, "train").head(n)
    torch.manual_seed(stage.seed)
    tf = train_transform(ts, **(stage.augmentation or {}))
    return evaluate.plot_tensor_grid([tf(load_rgb(p)) for p in rows["path"]], path, ts.mean, ts.std)


def evaluation_report(records: dict[str, StageRecord | dict], ref: ActivationsRef | dict, store: ActivationStore,
                      manifest: pd.DataFrame, folder, title: str, details: dict, tta: int = 4, top_losses: int = 8,
                      num_workers: int = 0, device="cpu") -> tuple[dict[str, dict], str]:
    """The ``evaluation_report`` stage: every stage scored (``evaluate_stages``, TTA with the last
    stage's augmentation) and the report written to ``folder`` (``write_report``). Returns
    (metrics per stage, the report's Markdown)."""
    from pathlib import Path

    ref = ActivationsRef.coerce(ref)
    records = {name: StageRecord.coerce(r) for name, r in records.items()}
    manifest = without_failed(manifest, ref.failed_images)  # no rows for them
    entry = open_entry(store, ref)
    last = list(records.values())[-1]
    stages, final = evaluate_stages(records, entry, manifest, num_workers, device, tta, last.augmentation or None)
    Path(folder).mkdir(parents=True, exist_ok=True)
    details = {**details, "entry_key": entry.key.digest(), "view_key": ref.view_key, "tta_views": tta,
               **{f"mlflow_run.{r.stage}": r.mlflow_run_id for r in records.values()}}
    return stages, write_report(folder, title, records, stages, final, manifest, details, top_losses)


def accuracy_metadata(stages: dict[str, dict]) -> dict[str, float]:
    """Each evaluated stage's accuracy (and with TTA) under a flat name: ``<stage>_accuracy``."""
    return {**{f"{n}_accuracy": m["accuracy"] for n, m in stages.items()},
            **{f"{n}_tta_accuracy": m["tta_accuracy"] for n, m in stages.items() if "tta_accuracy" in m}}
