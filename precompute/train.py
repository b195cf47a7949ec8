"""Fit loops: the head on cached activations, and the network on (augmented) images.

Both use AdamW with torch's one-cycle schedule stepped per batch (fastai v1's fit_one_cycle),
one parameter group per layer group so earlier groups can take lower learning rates.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from precompute.archs import set_frozen_bn_eval

EpochCallback = Callable[[dict], None]


class ConfigError(ValueError):
    """A configuration that cannot work; raised before any work starts."""


def check_precompute_augment(precompute: bool, augment: bool) -> None:
    if precompute and augment:
        raise ConfigError(
            "precompute=True with augment=True: cached activations are computed once from "
            "un-augmented images, so augmentation cannot apply to them. Set augment=False to "
            "train on the cache, or precompute=False to train on freshly augmented images.")


def seed_everything(seed: int) -> int:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def group_lrs(lr: float | Sequence[float], n_groups: int) -> list[float]:
    """One learning rate per layer group, from one value or a list of exactly ``n_groups``."""
    if isinstance(lr, (int, float)):
        return [float(lr)] * n_groups
    lrs = [float(v) for v in lr]
    if len(lrs) != n_groups:
        raise ConfigError(f"{len(lrs)} learning rates given for {n_groups} layer groups; "
                          f"give one value or exactly {n_groups}")
    return lrs


def differential_lrs(lr: float, n_groups: int, factor: float = 3.0) -> list[float]:
    """fastai's advice: each earlier group learns ``factor`` times slower (lr/9, lr/3, lr)."""
    return [lr / factor ** (n_groups - 1 - i) for i in range(n_groups)]


def _optimizer(groups: Sequence[nn.Module], lrs: Sequence[float], wd: float, steps: int):
    param_groups = [{"params": [p for p in g.parameters() if p.requires_grad], "lr": lr}
                    for g, lr in zip(groups, lrs)]
    param_groups = [g for g in param_groups if g["params"]]
    if not param_groups:
        raise ConfigError("no trainable parameters: every layer group is frozen")
    opt = torch.optim.AdamW(param_groups, weight_decay=wd)
    if steps < 4:  # one-cycle needs a warm-up and an annealing step at least
        return opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in param_groups], total_steps=steps, pct_start=max(0.25, 2 / steps))
    return opt, sched


@torch.no_grad()
def _evaluate_batches(model: nn.Module, batches, device) -> tuple[float, float]:
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss += nn.functional.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return loss / max(n, 1), correct / max(n, 1)


class ArrayRows:
    """Cached rows held in memory."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = torch.tensor(x).float(), torch.as_tensor(y).long()

    def __len__(self) -> int:
        return len(self.y)

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self.y) // batch_size)

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        order = torch.randperm(len(self.y), generator=generator) if generator is not None else torch.arange(len(self.y))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield self.x[idx], self.y[idx]


class StreamedRows:
    """Cached rows read chunk by chunk from the store: memory holds one chunk, whatever the size.

    Shuffling is two-level (chunk order, then rows within a chunk), as tf.data and webdataset do.
    """

    def __init__(self, entry, image_ids: Sequence[str], y: np.ndarray):
        self.entry, self.ids, self.y = entry, list(image_ids), np.asarray(y)

    def __len__(self) -> int:
        return len(self.ids)

    def _by_chunk(self) -> list[list[int]]:
        index = self.entry.index()
        by_chunk: dict[str, list[int]] = {}
        for pos, image_id in enumerate(self.ids):
            by_chunk.setdefault(index[image_id][0], []).append(pos)
        return list(by_chunk.values())

    def n_batches(self, batch_size: int) -> int:
        return sum(-(-len(g) // batch_size) for g in self._by_chunk())

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        groups = self._by_chunk()
        if generator is not None:
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        for positions in groups:
            (pos, rows), = self.entry.iter_blocks([self.ids[p] for p in positions])
            x, y = torch.from_numpy(np.asarray(rows, dtype=np.float32)), torch.as_tensor(self.y[positions]).long()
            order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                yield x[idx], y[idx]


def fit_head_on_cache(head: nn.Module, train: ArrayRows | StreamedRows, valid: ArrayRows | StreamedRows,
                      epochs: int = 3, lr: float = 1e-3, batch_size: int = 64, seed: int = 0, wd: float = 1e-2,
                      on_epoch: EpochCallback | None = None) -> list[dict]:
    """Train the head on cached activations: no image is decoded, no body run."""
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    if len(train) < 2:
        raise ConfigError(f"{len(train)} training rows: the head needs at least 2 training images")
    opt, sched = _optimizer([head], [lr], wd, train.n_batches(batch_size) * epochs)
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        head.train()
        total, n = 0.0, 0
        for x, y in train.batches(batch_size, gen):
            if len(x) < 2:  # a batch of one breaks BatchNorm1d in train mode
                continue
            loss = nn.functional.cross_entropy(head(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(x), n + len(x)
        valid_loss, valid_acc = _evaluate_batches(head, valid.batches(512), "cpu")
        row = {"epoch": epoch, "train_loss": total / max(n, 1), "valid_loss": valid_loss,
               "valid_accuracy": valid_acc, "lr": sched.get_last_lr()[-1],
               "seconds": time.perf_counter() - t0}
        history.append(row)
        if on_epoch:
            on_epoch(row)
    return history


def fit(model: nn.Module, groups: Sequence[nn.Module], lrs: Sequence[float], train_loader: DataLoader,
        valid_loader: DataLoader, epochs: int = 1, seed: int = 0, wd: float = 1e-2,
        device: str | torch.device = "cpu", on_epoch: EpochCallback | None = None,
        freeze_bn_stats: bool = True) -> list[dict]:
    """Train the network on images; frozen groups get no gradient and keep their BN statistics.

    ``freeze_bn_stats`` keeps every BatchNorm's running statistics fixed (Keras' advice for
    fine-tuning): with small batches, batch statistics of a pretrained body differ so much from
    its running ones (relative change ~1.0 on EfficientNet-Lite0) that the head's inputs shift
    and accuracy collapses. BN scale and shift still train in unfrozen groups.
    """
    seed_everything(seed)
    model.to(device)
    opt, sched = _optimizer(groups, group_lrs(list(lrs), len(groups)), wd, len(train_loader) * epochs)
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        set_frozen_bn_eval(groups)
        if freeze_bn_stats:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        total, n = 0.0, 0
        for x, y in train_loader:
            if len(x) < 2:
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(x), n + len(x)
        valid_loss, valid_acc = _evaluate_batches(model, valid_loader, device)
        row = {"epoch": epoch, "train_loss": total / max(n, 1), "valid_loss": valid_loss,
               "valid_accuracy": valid_acc, "lr": sched.get_last_lr()[-1],
               "seconds": time.perf_counter() - t0}
        history.append(row)
        if on_epoch:
            on_epoch(row)
    return history


@torch.no_grad()
def predict_proba(model: nn.Module, batches, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and targets over an iterable of (x, y) batches."""
    model.eval().to(device)
    probs, targets = [], []
    for x, y in batches:
        probs.append(torch.softmax(model(x.to(device)), 1).cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()


def tensor_batches(x: np.ndarray, y: np.ndarray, batch_size: int = 512):
    return ArrayRows(x, y).batches(batch_size)
