"""The recipe's stages as plain functions: what an asset body calls, and what a notebook can call.

precompute -> head on the cache -> head with augmentation -> unfreeze and fine-tune -> evaluate.
Trained stages are plain dicts (state dict + everything needed to rebuild the network), so they
pickle, log and reload without this module's classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from precompute.archs import ArchSpec, body_output_shape, cut_body, describe_groups, freeze_to, get_arch, layer_groups
from precompute.features import PrecomputeStats, compute_activations
from precompute.heads import UnknownHead, build_head, check_head_config
from precompute.labels import class_names, is_multilabel, label_delim, multi_hot, split_tags
from precompute.manifest import ok_rows
from precompute.store import ActivationStore, CacheCorruption, CacheKey, Entry, ResultCache, VerifyReport, view_key
from precompute.train import (ArrayRows, EpochCallback, LearningRates, Schedule, StreamedRows, check_precompute_augment,
                              differential_lrs, fit, fit_head_on_cache, group_lrs, lr_find, predict_proba,
                              tensor_batches)
from precompute.transforms import ImageDataset, TransformSpec, eval_transform, train_transform
from precompute.weights import load_weights

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


def activation_key(bb: Backbone, ts: TransformSpec, pooled: bool = True, dtype: str = "float32") -> CacheKey:
    return CacheKey(arch=bb.spec.name, weights_id=bb.weights_id, xtra_cut=bb.xtra_cut,
                    cut_index=len(bb.body), transform=ts.key(), pooled=pooled, dtype=dtype)


def precompute(manifest: pd.DataFrame, store: ActivationStore, bb: Backbone, ts: TransformSpec,
               pooled: bool = True, dtype: str = "float32", batch_size: int = 32, chunk_rows: int = 256,
               num_workers: int = 0, device="cpu", on_progress=None,
               shard: tuple[int, int] = (0, 1)) -> tuple[Entry, PrecomputeStats, str]:
    """Fill the entry for every ok image (of one shard); returns (entry, stats, view key)."""
    rows = ok_rows(manifest)
    entry = store.entry(activation_key(bb, ts, pooled, dtype))
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


def repair_entry(entry: Entry, manifest: pd.DataFrame, writable: bool = True) -> VerifyReport:
    """Check every block the manifest's rows live in; drop damaged chunks so the next precompute
    recomputes their rows. A read-only store cannot be repaired or filled: RuntimeError if it
    lacks rows or holds damage, naming both counts."""
    ids = list(dict.fromkeys(ok_rows(manifest)["image_id"]))
    if writable:
        return entry.repair(ids)
    report = entry.verify(ids)
    missing = entry.missing(ids)
    if missing or report.damaged:
        raise RuntimeError(f"activation store {entry.store.root} is read-only, and entry {entry.rel} lacks "
                           f"{len(missing)} of {len(ids)} rows and has {len(report.damaged)} damaged chunk(s): "
                           "point PRECOMPUTE_STORE at a writable store, or fill this one where it is writable")
    return report


@dataclass(frozen=True)
class ActivationsRef:
    """What the activations stage hands on: where its entry is, the rows' view key, the body's
    weights, and the images that failed at precompute (no rows: later stages leave them out)."""
    store: str
    entry: str
    key: dict                              # CacheKey.parts()
    view_key: str
    weights: str = "pretrained"
    weights_path: str | None = None
    failed_images: tuple = field(default_factory=tuple)  # (image_id, path, reason) per failed image

    def __post_init__(self):
        object.__setattr__(self, "failed_images", tuple(tuple(f) for f in self.failed_images or ()))

    @classmethod
    def of(cls, entry: Entry, view: str, weights: str = "pretrained", weights_path: str | None = None,
           failed=()) -> "ActivationsRef":
        return cls(store=entry.store.root, entry=entry.rel, key=entry.key.parts(), view_key=view,
                   weights=weights, weights_path=weights_path, failed_images=failed)

    def to_dict(self) -> dict:
        return {"store": self.store, "entry": self.entry, "key": self.key, "view_key": self.view_key,
                "weights": self.weights, "weights_path": self.weights_path,
                "failed_images": [list(f) for f in self.failed_images]}

    @classmethod
    def from_dict(cls, d: dict) -> "ActivationsRef":
        return cls(store=d["store"], entry=d["entry"], key=d["key"], view_key=d["view_key"],
                   weights=d.get("weights", "pretrained"), weights_path=d.get("weights_path"),
                   failed_images=d.get("failed_images") or ())

    @classmethod
    def coerce(cls, ref: "ActivationsRef | dict") -> "ActivationsRef":
        """The typed ref; a plain dict (as materializations before the dataclass stored it) is read too."""
        return ref if isinstance(ref, cls) else cls.from_dict(ref)

    def cache_key(self) -> CacheKey:
        return CacheKey(**self.key)

    def transform(self) -> TransformSpec:
        return TransformSpec(**self.key["transform"])

    def backbone(self) -> Backbone:
        """The frozen body the rows were computed with (its weights as configured then)."""
        return load_backbone(self.key["arch"], self.key["xtra_cut"], self.weights, self.weights_path)


def open_entry(store: ActivationStore, ref: ActivationsRef | dict) -> Entry:
    """The entry an activations result points at (its key.json is put right if it was damaged)."""
    return store.entry(ActivationsRef.coerce(ref).cache_key())


def check_same_weights(bb: Backbone, entry: Entry) -> None:
    if bb.weights_id != entry.key.weights_id:
        raise RuntimeError(f"weights changed since the activations were computed ({bb.weights_id} vs "
                           f"{entry.key.weights_id}): materialize the activations asset again")


def save_model(record: dict, run_id: str, folder: str | None = None) -> str:
    """The stage record (state dict, arch, classes, transform) as one file for predict/reload."""
    import os
    import tempfile

    folder = folder or tempfile.mkdtemp(prefix=f"model-{run_id[:8]}-")
    path = os.path.join(folder, f"{record['stage']}.pt")
    torch.save({k: v for k, v in record.items() if k != "groups"}, path)
    return path


def labelled_split(manifest: pd.DataFrame, classes: Sequence[str], split: str) -> pd.DataFrame:
    """Usable rows of ``split`` whose classes the model knows, with a ``target`` column: the class
    index, or for a multi-label manifest a multi-hot float32 vector (see ``targets``)."""
    rows = ok_rows(manifest, split)
    index = {c: i for i, c in enumerate(classes)}
    delim = label_delim(manifest)
    known = rows["label"].map(lambda label: all(t in index for t in split_tags(label, delim))).astype(bool)
    if (~known).any():
        logging.getLogger(__name__).warning(
            "%d %s images have labels %s the model was not trained on: left out; rerun from head_on_cache "
            "to include them", int((~known).sum()), split, sorted(set(rows.loc[~known, "label"])))
    rows = rows[known]
    if delim is not None:
        return rows.assign(target=list(multi_hot(rows["label"], classes, delim)))
    return rows.assign(target=rows["label"].map(index).astype(int))


def targets(rows: pd.DataFrame, n_classes: int) -> np.ndarray:
    """The ``target`` column of ``labelled_split`` as an array: (n,) int64 class indices, or
    (n, n_classes) float32 multi-hot rows for a multi-label manifest."""
    if label_delim(rows) is None:
        return rows["target"].to_numpy(dtype=np.int64)
    return np.stack(list(rows["target"])) if len(rows) else np.zeros((0, n_classes), np.float32)


def cached_split(entry: Entry, manifest: pd.DataFrame, classes: Sequence[str], split: str):
    rows = labelled_split(manifest, classes, split)
    return entry.read(list(rows["image_id"])), targets(rows, len(classes))


def _stage_record(stage: str, bb_or_spec, xtra_cut: int, classes, head_config, ts, weights_id,
                  model: nn.Module, history, lrs=None, groups=None, **extra) -> dict:
    return {"stage": stage, "arch": bb_or_spec.name, "xtra_cut": xtra_cut, "classes": list(classes),
            "multilabel": False, "label_delim": None, "thresholds": None,
            "head_config": head_config, "transform": ts.key(), "weights_id": weights_id,
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "history": history, "groups": describe_groups(groups, lrs) if groups else None, **extra}


def cached_rows(entry: Entry, manifest: pd.DataFrame, classes: Sequence[str], split: str,
                memory_budget: int) -> ArrayRows | StreamedRows:
    """The split's cached rows: in memory when they fit ``memory_budget`` bytes, else streamed."""
    rows = labelled_split(manifest, classes, split)
    y = targets(rows, len(classes))
    if len(rows) * entry.row_nbytes() * 4 // np.dtype(entry.key.dtype).itemsize <= memory_budget:
        return ArrayRows(entry.read(list(rows["image_id"])), y)
    return StreamedRows(entry, list(rows["image_id"]), y)


def _label_info(manifest: pd.DataFrame) -> dict:
    """What a stage record says about its targets (taken over by later stages)."""
    return {"multilabel": is_multilabel(manifest), "label_delim": label_delim(manifest)}


def _with_thresholds(record: dict, probs: np.ndarray, y: np.ndarray) -> dict:
    """A multi-label record gets per-label thresholds, each the one with the best F1 on validation."""
    if record["multilabel"]:
        from precompute.evaluate import choose_thresholds  # matplotlib comes with it: only when needed

        record["thresholds"] = choose_thresholds(probs, y)
    return record


def _new_head(bb: Backbone, ts: TransformSpec, n_classes: int, head_config: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_head(body_output_shape(bb.body, ts.size)[0], n_classes, **head_config)


def train_head_on_cache(entry: Entry, manifest: pd.DataFrame, bb: Backbone, ts: TransformSpec,
                        head_config: dict, epochs: int = 3, lr: float = 1e-3, batch_size: int = 64,
                        seed: int = 0, on_epoch: EpochCallback | None = None,
                        memory_budget: int = DEFAULT_MEMORY_BUDGET, schedule: Schedule | None = None) -> dict:
    """fastai's precompute=True: only the head trains, on rows read back from the cache."""
    classes = class_names(manifest)
    train = cached_rows(entry, manifest, classes, "train", memory_budget)
    valid = cached_rows(entry, manifest, classes, "valid", memory_budget)
    head = _new_head(bb, ts, len(classes), head_config, seed)
    schedule = schedule or Schedule("one_cycle", epochs=epochs)
    multilabel = is_multilabel(manifest)
    history = fit_head_on_cache(head, train, valid, lr=lr, batch_size=batch_size, seed=seed, on_epoch=on_epoch,
                                schedule=schedule, multilabel=multilabel)
    groups = layer_groups(bb.body, head, bb.spec, bb.xtra_cut)
    freeze_to(groups, len(groups) - 1)
    record = _stage_record("head_on_cache", bb.spec, bb.xtra_cut, classes, head_config, ts, bb.weights_id,
                           nn.Sequential(bb.body, head), history, [0.0] * (len(groups) - 1) + [lr], groups,
                           seed=seed, schedule=schedule.as_dict(), lr=lr, streamed=isinstance(train, StreamedRows),
                           failed_images=failed_images(manifest), **_label_info(manifest))
    if multilabel:
        probs, y = predict_proba(head, valid.batches(512), multilabel=True)
        _with_thresholds(record, probs, y)
    return record


def lr_find_on_cache(entry: Entry, manifest: pd.DataFrame, bb: Backbone, ts: TransformSpec, head_config: dict,
                     batch_size: int = 64, seed: int = 0, num_it: int = 100,
                     memory_budget: int = DEFAULT_MEMORY_BUDGET) -> dict:
    """lr_find for a new head on the cached activations (cheap: no body runs)."""
    classes = class_names(manifest)
    train = cached_rows(entry, manifest, classes, "train", memory_budget)
    head = _new_head(bb, ts, len(classes), head_config, seed)
    return lr_find(head, [head], [1.0], lambda gen: train.batches(batch_size, gen), num_it=num_it, seed=seed,
                   freeze_bn_stats=False, multilabel=is_multilabel(manifest))


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


def save_head_result(entry: Entry, fingerprint: str, record: dict) -> None:
    import io

    buf = io.BytesIO()
    torch.save(record, buf)
    ResultCache(entry).put(f"head-{fingerprint}.pt", buf.getvalue())  # best effort: a read-only store warns


def load_head_result(entry: Entry, fingerprint: str) -> dict | None:
    import io

    blob = ResultCache(entry).get(f"head-{fingerprint}.pt")
    if blob is None:
        return None
    record = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return checked_record(record, f"cached head result head-{fingerprint}.pt in {entry.rel}")


def head_on_cache_cached(entry: Entry, fingerprint: str, train: Callable[[], dict],
                         reuse: bool = True) -> tuple[dict, bool]:
    """The head for ``fingerprint`` (head_fingerprint: rows, config, seed): the one saved beside the
    entry when ``reuse`` and one is there, else ``train()``'s, saved for the next identical request.
    Returns (record, reused)."""
    record = load_head_result(entry, fingerprint) if reuse else None
    if record is not None:
        return record, True
    record = train()
    save_head_result(entry, fingerprint, record)
    return record, False


def checked_record(record, source: str) -> dict:
    """A stage record read from a file or a shared cache is data: its head must be one the code
    registers or the operator allows (precompute.heads), checked before anything is built or imported."""
    if not isinstance(record, dict) or not {"arch", "classes", "head_config", "state_dict"} <= record.keys():
        raise ValueError(f"{source} is not a stage record (a dict with arch, classes, head_config, state_dict): "
                         "pass a model .pt saved by a training stage")
    try:
        check_head_config(record["head_config"])
    except UnknownHead as e:
        raise UnknownHead(f"{source}: {e}") from None
    return record


def rebuild(record: dict, size: int) -> tuple[ArchSpec, nn.Sequential, list[nn.Module]]:
    """The network of a stage record, without loading pretrained weights again."""
    spec = get_arch(record["arch"])
    body = cut_body(spec.build(), spec, record["xtra_cut"])
    head = build_head(body_output_shape(body, size)[0], len(record["classes"]), **record["head_config"])
    model = nn.Sequential(body, head)
    model.load_state_dict(record["state_dict"])
    return spec, model, layer_groups(body, head, spec, record["xtra_cut"])


def image_loader(rows: pd.DataFrame, transform: Callable, batch_size: int, shuffle: bool,
                 seed: int | torch.Generator = 0, num_workers: int = 0) -> DataLoader:
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    labels = targets(rows, 0)  # class indices, or multi-hot rows for a multi-label manifest
    return DataLoader(ImageDataset(list(rows["path"]), labels, transform), batch_size=batch_size,
                      shuffle=shuffle, generator=gen, num_workers=num_workers,
                      persistent_workers=False)


def stage_lrs(lr: LearningRates, n_groups: int, freeze: int, spread: float = 3.0) -> list[float]:
    """A single rate is the last group's, each earlier trainable group ``spread`` times lower
    (fastai: 3-10x); a list or a 'lo:hi' range is taken as given (see train.group_lrs)."""
    if isinstance(lr, (int, float)):
        return [0.0] * freeze + differential_lrs(float(lr), n_groups - freeze, spread)
    return group_lrs(lr, n_groups, frozen=freeze)


def _image_stage_inputs(previous: dict, manifest: pd.DataFrame, freeze: int, size: int | None, train_bn: bool):
    ts = TransformSpec(**previous["transform"])
    if size and size != ts.size:  # progressive resizing: same weights, new input size
        ts = TransformSpec(**{**ts.key(), "size": size, "resize": None})
    spec, model, groups = rebuild(previous, ts.size)
    freeze_to(groups, freeze, train_bn=train_bn)
    return ts, spec, model, groups


def train_on_images(previous: dict, manifest: pd.DataFrame, stage: str, schedule: Schedule,
                    lr: LearningRates, freeze: int, augment: bool = True, precompute: bool = False,
                    batch_size: int = 32, seed: int = 0, num_workers: int = 0, device="cpu",
                    on_epoch: EpochCallback | None = None, freeze_bn_stats: bool = True,
                    augmentation: dict | None = None, lr_spread: float = 3.0, size: int | None = None,
                    train_bn: bool = False) -> dict:
    """Continue from ``previous`` on images, never the cache: groups[:freeze] stay frozen.

    ``size`` different from the previous stage's continues at a new image size (progressive
    resizing); ``train_bn`` keeps BatchNorm scale/shift trainable in frozen groups (fastai v1).
    """
    check_precompute_augment(precompute, augment)
    ts, spec, model, groups = _image_stage_inputs(previous, manifest, freeze, size, train_bn)
    lrs = stage_lrs(lr, len(groups), freeze, lr_spread)
    if train_bn and 0 < freeze < len(groups):  # frozen groups' BN learns at the earliest trainable rate
        lrs = [lrs[freeze]] * freeze + lrs[freeze:]
    classes = previous["classes"]
    train_tf = train_transform(ts, **(augmentation or {})) if augment else eval_transform(ts)
    train_rows = labelled_split(manifest, classes, "train")
    valid = image_loader(labelled_split(manifest, classes, "valid"), eval_transform(ts), 64, False, 0, num_workers)
    multilabel = bool(previous.get("multilabel"))
    history = fit(model, groups, lrs,
                  lambda gen: image_loader(train_rows, train_tf, batch_size, True, gen, num_workers),
                  lambda: valid, -(-len(train_rows) // batch_size), schedule, seed, device=device,
                  multilabel=multilabel, freeze_bn_stats=freeze_bn_stats, on_epoch=on_epoch)
    record = _stage_record(stage, spec, previous["xtra_cut"], classes, previous["head_config"], ts,
                           previous["weights_id"], model, history, lrs, groups, seed=seed, schedule=schedule.as_dict(),
                           augment=augment, augmentation=augmentation or {}, freeze=freeze,
                           freeze_bn_stats=freeze_bn_stats, train_bn=train_bn,
                           multilabel=multilabel, label_delim=previous.get("label_delim"),
                           failed_images=failed_images(manifest))
    if multilabel:
        _with_thresholds(record, *predict_proba(model, valid, device, multilabel=True))
    return record


def lr_find_on_images(previous: dict, manifest: pd.DataFrame, freeze: int = 0, lr_spread: float = 3.0,
                      batch_size: int = 32, seed: int = 0, num_it: int = 50, augmentation: dict | None = None,
                      num_workers: int = 0, device="cpu", freeze_bn_stats: bool = True) -> dict:
    """lr_find for the (partly) unfrozen network on augmented images; rates keep the groups' ratios."""
    ts, _, model, groups = _image_stage_inputs(previous, manifest, freeze, None, False)
    rows = labelled_split(manifest, previous["classes"], "train")
    tf = train_transform(ts, **(augmentation or {}))
    ratios = stage_lrs(1.0, len(groups), freeze, lr_spread)
    return lr_find(model, groups, ratios, lambda gen: image_loader(rows, tf, batch_size, True, gen, num_workers),
                   num_it=num_it, seed=seed, device=device, freeze_bn_stats=freeze_bn_stats,
                   multilabel=bool(previous.get("multilabel")))


def predict_paths(record: dict, paths: Sequence[str], tta: int = 0, augmentation: dict | None = None,
                  batch_size: int = 64, num_workers: int = 0, device="cpu", seed: int = 0):
    """Class probabilities for images: center crop, and with ``tta`` > 0 also the mean of the
    center crop and ``tta`` augmented views (fastai's TTA). Returns (probs, tta_probs or None).
    Softmax over classes, or for a multi-label model one sigmoid per label."""
    ts = TransformSpec(**record["transform"])
    _, model, _ = rebuild(record, ts.size)
    multilabel = bool(record.get("multilabel"))
    rows = pd.DataFrame({"path": list(paths), "target": -1})
    probs, _ = predict_proba(model, image_loader(rows, eval_transform(ts), batch_size, False, 0, num_workers), device,
                             multilabel)
    if not tta:
        return probs, None
    views = [probs]
    aug = train_transform(ts, **(augmentation or {}))
    for i in range(tta):
        torch.manual_seed(seed + i)  # augmentations draw from torch's global generator
        views.append(predict_proba(model, image_loader(rows, aug, batch_size, False, 0, 0), device, multilabel)[0])
    return probs, np.mean(views, axis=0)


def evaluate_on_images(record: dict, manifest: pd.DataFrame, num_workers: int = 0, device="cpu", tta: int = 0,
                       augmentation: dict | None = None):
    """(probs, targets, tta_probs or None) on the validation split."""
    rows = labelled_split(manifest, record["classes"], "valid")
    probs, tta_probs = predict_paths(record, list(rows["path"]), tta, augmentation, num_workers=num_workers,
                                     device=device)
    return probs, targets(rows, len(record["classes"])), tta_probs


def evaluate_on_cache(record: dict, entry: Entry, manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    ts = TransformSpec(**record["transform"])
    _, model, _ = rebuild(record, ts.size)
    x, y = cached_split(entry, manifest, record["classes"], "valid")
    return predict_proba(model[1], tensor_batches(x, y), multilabel=bool(record.get("multilabel")))


def evaluate_stages(records: dict[str, dict], entry: Entry | None, manifest: pd.DataFrame, num_workers: int = 0,
                    device="cpu", tta: int = 0, augmentation: dict | None = None) -> tuple[dict[str, dict], tuple]:
    """Every stage on the validation split, with TTA when ``tta`` > 0; the stage named head_on_cache is
    also scored on the cache (``entry``): the same numbers, a check that the cache is not stale.
    Returns (metrics per stage, (probs, targets, tta_probs) of the last stage)."""
    from precompute import evaluate  # matplotlib comes with it: only when needed

    n_classes = len(list(records.values())[-1]["classes"])
    stages, final = {}, None
    for name, record in records.items():
        probs, y, tta_probs = evaluate_on_images(record, manifest, num_workers, device, tta, augmentation)
        if name == "head_on_cache" and entry is not None:
            cache_probs, _ = evaluate_on_cache(record, entry, manifest)
            stages[name + " (on cache)"] = evaluate.stage_metrics(cache_probs, y, n_classes, record.get("thresholds"))
        m = evaluate.stage_metrics(probs, y, n_classes, record.get("thresholds"))
        if tta_probs is not None:
            t = evaluate.stage_metrics(tta_probs, y, n_classes, record.get("thresholds"))
            m.update(tta_accuracy=t["accuracy"], tta_loss=t["loss"])
        stages[name] = m
        final = (probs, y, tta_probs)
    return stages, final


def write_report(folder, title: str, records: dict[str, dict], stages: dict[str, dict], final: tuple,
                 manifest: pd.DataFrame, details: dict, top_losses: int = 8) -> str:
    """The report of an evaluation in ``folder``: the last stage's confusion matrix and worst mistakes,
    every stage's learning curves, and report.md (returned) with the metrics of ``stages``."""
    from pathlib import Path

    from precompute import evaluate

    folder = Path(folder)
    last = list(records.values())[-1]
    classes, thresholds, multilabel = last["classes"], last.get("thresholds"), bool(last.get("multilabel"))
    probs, y, _ = final
    if multilabel:
        preds = evaluate.multilabel_predictions(probs, thresholds)
        evaluate.plot_label_confusion(y, preds, classes, folder / "confusion_matrix.png")
        tags = evaluate.predicted_tags(probs, classes, thresholds)

        def caption(i: int) -> str:
            true = [c for c, on in zip(classes, y[i] > 0.5) if on]
            return f"true {' '.join(true) or '-'} / pred {' '.join(tags[i]) or '-'}"
    else:
        preds = probs.argmax(1)
        evaluate.plot_confusion(y, preds, classes, folder / "confusion_matrix.png")

        def caption(i: int) -> str:
            return f"true {classes[y[i]]} / pred {classes[preds[i]]} ({probs[i, preds[i]]:.2f})"
    evaluate.plot_learning_curves({r["stage"]: r["history"] for r in records.values()}, folder / "learning_curves.png")
    valid = labelled_split(manifest, classes, "valid")
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
