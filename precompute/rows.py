"""The labelled rows a stage trains and validates on: from the manifest, from the cache (in memory
or streamed), or as a DataLoader over image files."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from precompute.manifest import ok_rows
from precompute.store import Entry
from precompute.store.dtypes import itemsize
from precompute.task import Task
from precompute.train import ArrayRows, StreamedRows
from precompute.transforms import ImageDataset


# Cached rows up to this size (as float32) are loaded once; larger sets are streamed per chunk.
DEFAULT_MEMORY_BUDGET = 4 << 30


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


def cached_rows(entry: Entry, manifest: pd.DataFrame, classes: Classes, split: str,
                memory_budget: int) -> ArrayRows | StreamedRows:
    """The split's cached rows: in memory when they fit ``memory_budget`` bytes, else streamed."""
    task = _task(manifest, classes)
    rows = labelled_split(manifest, task, split)
    y = targets(rows, task)
    if len(rows) * entry.row_nbytes() * 4 // itemsize(entry.key.dtype) <= memory_budget:
        return ArrayRows(entry.read(list(rows["image_id"])), y)
    return StreamedRows(entry, list(rows["image_id"]), y)


def image_loader(rows: pd.DataFrame, transform: Callable, batch_size: int, shuffle: bool,
                 seed: int | torch.Generator = 0, num_workers: int = 0) -> DataLoader:
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    column = rows["target"]  # labelled_split's: class indices, or a multi-hot vector per image
    labels = (np.stack(list(column)) if len(column) and np.ndim(column.iloc[0]) else
              column.to_numpy(dtype=np.int64))
    return DataLoader(ImageDataset(list(rows["path"]), labels, transform), batch_size=batch_size,
                      shuffle=shuffle, generator=gen, num_workers=num_workers,
                      persistent_workers=False)


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
