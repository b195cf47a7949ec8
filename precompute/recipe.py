"""The recipe's stages as plain functions: what an asset body calls, and what a notebook can call.

precompute -> head on the cache -> head with augmentation -> unfreeze and fine-tune -> evaluate.
Trained stages are plain dicts (state dict + everything needed to rebuild the network), so they
pickle, log and reload without this module's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from precompute.archs import ArchSpec, body_output_shape, cut_body, describe_groups, freeze_to, get_arch, layer_groups
from precompute.data import ImageDataset, TransformSpec, class_names, eval_transform, ok_rows, train_transform
from precompute.features import PrecomputeStats, compute_activations
from precompute.heads import build_head
from precompute.store import ActivationStore, CacheKey, Entry, view_key
from precompute.train import (ArrayRows, EpochCallback, StreamedRows, check_precompute_augment, differential_lrs,
                              fit, fit_head_on_cache, group_lrs, predict_proba, tensor_batches)

# Cached rows up to this size (as float32) are loaded once; larger sets are streamed per chunk.
DEFAULT_MEMORY_BUDGET = 4 << 30
HEAD_CODE_VERSION = "1"  # bump when training on the cache changes its result for the same inputs
from precompute.weights import load_weights


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
               num_workers: int = 0, device="cpu", on_progress=None) -> tuple[Entry, PrecomputeStats, str]:
    """Fill the entry for every ok image; returns (entry, stats, view key of this image set)."""
    rows = ok_rows(manifest)
    entry = store.entry(activation_key(bb, ts, pooled, dtype))
    stats = compute_activations(bb.body, rows, eval_transform(ts), entry, batch_size, chunk_rows,
                                num_workers, device, on_progress)
    return entry, stats, view_key(entry.key, rows["image_id"], rows["label"])


def open_entry(store: ActivationStore, ref: dict) -> Entry:
    """The entry an activations result points at; its key must match what this code computes."""
    return store.entry(CacheKey(**ref["key"]))


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
    rows = ok_rows(manifest, split)
    index = {c: i for i, c in enumerate(classes)}
    rows = rows[rows["label"].isin(index)]
    return rows.assign(target=rows["label"].map(index).astype(int))


def cached_split(entry: Entry, manifest: pd.DataFrame, classes: Sequence[str], split: str):
    rows = labelled_split(manifest, classes, split)
    return entry.read(list(rows["image_id"])), rows["target"].to_numpy()


def _stage_record(stage: str, bb_or_spec, xtra_cut: int, classes, head_config, ts, weights_id,
                  model: nn.Module, history, lrs=None, groups=None, **extra) -> dict:
    return {"stage": stage, "arch": bb_or_spec.name, "xtra_cut": xtra_cut, "classes": list(classes),
            "head_config": head_config, "transform": ts.key(), "weights_id": weights_id,
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "history": history, "groups": describe_groups(groups, lrs) if groups else None, **extra}


def cached_rows(entry: Entry, manifest: pd.DataFrame, classes: Sequence[str], split: str,
                memory_budget: int) -> ArrayRows | StreamedRows:
    """The split's cached rows: in memory when they fit ``memory_budget`` bytes, else streamed."""
    rows = labelled_split(manifest, classes, split)
    if len(rows) * entry.row_nbytes() * 4 // np.dtype(entry.key.dtype).itemsize <= memory_budget:
        return ArrayRows(entry.read(list(rows["image_id"])), rows["target"].to_numpy())
    return StreamedRows(entry, list(rows["image_id"]), rows["target"].to_numpy())


def train_head_on_cache(entry: Entry, manifest: pd.DataFrame, bb: Backbone, ts: TransformSpec,
                        head_config: dict, epochs: int = 3, lr: float = 1e-3, batch_size: int = 64,
                        seed: int = 0, on_epoch: EpochCallback | None = None,
                        memory_budget: int = DEFAULT_MEMORY_BUDGET) -> dict:
    """fastai's precompute=True: only the head trains, on rows read back from the cache."""
    classes = class_names(manifest)
    train = cached_rows(entry, manifest, classes, "train", memory_budget)
    valid = cached_rows(entry, manifest, classes, "valid", memory_budget)
    torch.manual_seed(seed)
    in_channels = body_output_shape(bb.body, ts.size)[0]
    head = build_head(in_channels, len(classes), **head_config)
    history = fit_head_on_cache(head, train, valid, epochs, lr, batch_size, seed, on_epoch=on_epoch)
    groups = layer_groups(bb.body, head, bb.spec, bb.xtra_cut)
    freeze_to(groups, len(groups) - 1)
    return _stage_record("head_on_cache", bb.spec, bb.xtra_cut, classes, head_config, ts, bb.weights_id,
                         nn.Sequential(bb.body, head), history, [0.0] * (len(groups) - 1) + [lr], groups,
                         seed=seed, epochs=epochs, lr=lr, streamed=isinstance(train, StreamedRows))


def verify_entry(entry: Entry, manifest: pd.DataFrame) -> dict[str, tuple[bool, dict]]:
    """The cache's health for one manifest: name -> (passed, details)."""
    rows = ok_rows(manifest)
    ids = list(dict.fromkeys(rows["image_id"]))
    missing = entry.missing(ids)
    finite, checked = True, 0
    if not missing:
        for _, block in entry.iter_blocks(ids):
            finite &= bool(np.isfinite(block).all())
            checked += len(block)
    bad = manifest[manifest["status"] != "ok"]
    unexplained = bad[bad["reason"].fillna("").str.strip() == ""]
    return {
        "rows_match_manifest": (not missing, {"manifest_images": len(ids), "missing_rows": len(missing)}),
        "finite_values": (finite and not missing, {"rows_checked": checked}),
        "every_image_accounted_for": (not missing and unexplained.empty,
                                      {"with_row": len(ids) - len(missing), "skipped_with_reason": len(bad),
                                       "unexplained": len(unexplained)}),
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
    entry.put_blob(f"head-{fingerprint}.pt", buf.getvalue())


def load_head_result(entry: Entry, fingerprint: str) -> dict | None:
    import io

    blob = entry.get_blob(f"head-{fingerprint}.pt")
    return None if blob is None else torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def rebuild(record: dict, size: int) -> tuple[ArchSpec, nn.Sequential, list[nn.Module]]:
    """The network of a stage record, without loading pretrained weights again."""
    spec = get_arch(record["arch"])
    body = cut_body(spec.build(), spec, record["xtra_cut"])
    head = build_head(body_output_shape(body, size)[0], len(record["classes"]), **record["head_config"])
    model = nn.Sequential(body, head)
    model.load_state_dict(record["state_dict"])
    return spec, model, layer_groups(body, head, spec, record["xtra_cut"])


def image_loader(rows: pd.DataFrame, transform: Callable, batch_size: int, shuffle: bool, seed: int = 0,
                 num_workers: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ImageDataset(list(rows["path"]), list(rows["target"]), transform), batch_size=batch_size,
                      shuffle=shuffle, generator=gen, num_workers=num_workers,
                      persistent_workers=False)


def train_on_images(previous: dict, manifest: pd.DataFrame, stage: str, epochs: int, lr: float | Sequence[float],
                    freeze: int, augment: bool = True, precompute: bool = False, batch_size: int = 32,
                    seed: int = 0, num_workers: int = 0, device="cpu",
                    on_epoch: EpochCallback | None = None, freeze_bn_stats: bool = True,
                    augmentation: dict | None = None) -> dict:
    """Continue from ``previous`` on images (never the cache): groups[:freeze] stay frozen.

    ``lr`` is one value (spread fastai-style, each earlier trainable group 3x lower) or one per group.
    """
    check_precompute_augment(precompute, augment)
    ts = TransformSpec(**previous["transform"])
    spec, model, groups = rebuild(previous, ts.size)
    freeze_to(groups, freeze)
    if isinstance(lr, (int, float)):
        trainable = len(groups) - freeze
        lrs = [0.0] * freeze + differential_lrs(float(lr), trainable)
    else:
        lrs = group_lrs(lr, len(groups))
    classes = previous["classes"]
    train_tf = train_transform(ts, **(augmentation or {})) if augment else eval_transform(ts)
    train = image_loader(labelled_split(manifest, classes, "train"), train_tf, batch_size, True, seed, num_workers)
    valid = image_loader(labelled_split(manifest, classes, "valid"), eval_transform(ts), 64, False, 0, num_workers)
    history = fit(model, groups, lrs, train, valid, epochs, seed, device=device, on_epoch=on_epoch,
                  freeze_bn_stats=freeze_bn_stats)
    return _stage_record(stage, spec, previous["xtra_cut"], classes, previous["head_config"], ts,
                         previous["weights_id"], model, history, lrs, groups, seed=seed, epochs=epochs,
                         augment=augment, augmentation=augmentation or {}, freeze=freeze,
                         freeze_bn_stats=freeze_bn_stats)


def evaluate_on_images(record: dict, manifest: pd.DataFrame, num_workers: int = 0,
                       device="cpu") -> tuple[np.ndarray, np.ndarray]:
    ts = TransformSpec(**record["transform"])
    _, model, _ = rebuild(record, ts.size)
    rows = labelled_split(manifest, record["classes"], "valid")
    return predict_proba(model, image_loader(rows, eval_transform(ts), 64, False, 0, num_workers), device)


def evaluate_on_cache(record: dict, entry: Entry, manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    ts = TransformSpec(**record["transform"])
    _, model, _ = rebuild(record, ts.size)
    x, y = cached_split(entry, manifest, record["classes"], "valid")
    return predict_proba(model[1], tensor_batches(x, y))
