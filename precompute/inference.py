"""A stage record's network rebuilt (``rebuild``), and its probabilities: for image files (with
test-time augmentation), on the validation images, or on the validation rows of the cache."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from precompute.archs import ArchSpec, body_output_shape, cut_body, get_arch, layer_groups
from precompute.records import StageRecord
from precompute.rows import cached_rows, image_loader, labelled_split, targets
from precompute.store import Entry
from precompute.train import StreamedRows, predict_proba

# Valid rows up to this many bytes (as float32) are read at once; more are streamed chunk by chunk, so an
# evaluation's memory holds one chunk of rows (plus the probabilities it returns) at any size.
EVAL_MEMORY_BUDGET = 256 << 20
from precompute.transforms import eval_transform, train_transform


def rebuild(record: StageRecord, size: int) -> tuple[ArchSpec, nn.Sequential, list[nn.Module]]:
    """The network of a stage record, without loading pretrained weights again."""
    spec = get_arch(record.arch)
    body = cut_body(spec.build(), spec, record.xtra_cut)
    head = record.head.build(body_output_shape(body, size)[0], len(record.classes))
    model = nn.Sequential(body, head)
    model.load_state_dict(record.state_dict)
    return spec, model, layer_groups(body, head, spec, record.xtra_cut)


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


def evaluate_on_cache(record: StageRecord, entry: Entry, manifest: pd.DataFrame,
                      memory_budget: int = EVAL_MEMORY_BUDGET) -> tuple[np.ndarray, np.ndarray]:
    """(probs, targets) of the valid split's cached rows, in the manifest's order. Rows over
    ``memory_budget`` bytes are streamed chunk by chunk (the store's order) and put back in order."""
    _, model, _ = rebuild(record, record.transform.size)
    rows = cached_rows(entry, manifest, record.task, "valid", memory_budget)
    probs, y = predict_proba(model[1], rows.batches(512), task=record.task)
    if isinstance(rows, StreamedRows):
        order = rows.order()
        probs[order], y[order] = probs.copy(), y.copy()
    return probs, y
