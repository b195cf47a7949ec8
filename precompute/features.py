"""Run the frozen body over images once and commit the activations to the store, chunk by chunk."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from precompute.archs import as_channels_last, channels_last
from precompute.heads import concat_pool
from precompute.images import ImageLoadError
from precompute.store import Entry
from precompute.transforms import ImageDataset

log = logging.getLogger(__name__)


@dataclass
class PrecomputeStats:
    images: int          # distinct image contents the manifest asks for
    computed: int        # rows run through the body in this call
    reused: int          # rows already in the entry
    chunks: int          # chunks committed in this call
    seconds: float
    # (image_id, path, reason) of images that failed to decode or transform: no row, never zeros
    failed: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "failed": len(self.failed), "failed_images": [list(f) for f in self.failed],
                "images_per_s": round(self.images_per_s, 2)}


class _Isolated(Dataset):
    """(index, tensor or None, reason): one image that fails is reported, not raised, so the run goes on."""

    def __init__(self, images: ImageDataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return i, self.images[i][0], ""
        except ImageLoadError as e:
            return i, None, e.reason


def _collate(items):
    """(indices of good images, their batch or None, [(index, reason)] of failed ones)."""
    good = [(i, x) for i, x, _ in items if x is not None]
    return ([i for i, _ in good], torch.stack([x for _, x in good]) if good else None,
            [(i, reason) for i, x, reason in items if x is None])


def in_shard(image_id: str, index: int, count: int) -> bool:
    return int(image_id[:8], 16) % count == index


@torch.inference_mode()
def compute_activations(body: nn.Module, manifest: pd.DataFrame, transform: Callable, entry: Entry,
                        batch_size: int = 32, chunk_rows: int = 256, num_workers: int = 0,
                        device: str | torch.device = "cpu",
                        on_progress: Callable[[int, int], None] | None = None,
                        shard: tuple[int, int] = (0, 1)) -> PrecomputeStats:
    """Compute the rows of ``manifest`` (ok rows, columns image_id and path) missing from ``entry``.

    Memory holds one chunk of outputs at most (``chunk_rows``); each full chunk is committed
    before the next is started, so a crash loses at most one chunk of work. ``shard=(i, n)``
    takes only the images whose hash falls in shard i of n: n processes (Dagster steps) fill one
    entry in parallel with disjoint chunks.
    """
    start = time.perf_counter()
    first_paths = manifest.drop_duplicates("image_id").set_index("image_id")["path"]
    index, count = shard
    if count > 1:
        first_paths = first_paths[[in_shard(i, index, count) for i in first_paths.index]]
    todo = entry.missing(first_paths.index)
    n_images = len(first_paths)
    device = torch.device(device)
    body = channels_last(body.eval().to(device))  # faster on CPU and GPU: see archs.channels_last
    committed = 0
    failed: list[tuple[str, str, str]] = []
    if todo:
        with entry.writing():  # a lease: housekeeping leaves the entry alone while it fills
            loader = DataLoader(_Isolated(ImageDataset([first_paths[i] for i in todo], None, transform)),
                                batch_size=batch_size, num_workers=num_workers, shuffle=False, collate_fn=_collate,
                                persistent_workers=False, pin_memory=torch.device(device).type == "cuda")
            ids: list[str] = []
            buffer: list[np.ndarray] = []
            seen = 0
            bar = tqdm(total=len(todo), desc=f"precompute {entry.key.arch}", unit="img", disable=None)
            for good, x, bad in loader:
                for i, reason in bad:  # no row for it: the asset's checks name it, a rerun tries it again
                    failed.append((todo[i], str(first_paths[todo[i]]), reason))
                    log.warning("precompute %s: %s failed, left out: %s", entry.key.arch, first_paths[todo[i]], reason)
                if x is not None:
                    x = x.to(device, non_blocking=True)
                    out = body(as_channels_last(x))
                    if entry.key.pooled:
                        out = concat_pool(out)
                    buffer.append(out.float().cpu().numpy().astype(entry.key.dtype, copy=False))
                    ids += [todo[i] for i in good]
                seen += len(good) + len(bad)
                bar.update(len(good) + len(bad))
                if ids and (len(ids) >= chunk_rows or seen == len(todo)):
                    entry.commit(ids, np.concatenate(buffer))
                    committed += 1
                    ids, buffer = [], []
                    if on_progress:
                        on_progress(seen, len(todo))
            bar.close()
    stats = PrecomputeStats(n_images, len(todo) - len(failed), n_images - len(todo), committed,
                            time.perf_counter() - start, failed)
    log.info("precompute %s: %d computed, %d reused, %d failed, %.1f img/s", entry.rel, stats.computed,
             stats.reused, len(failed), stats.images_per_s)
    return stats
