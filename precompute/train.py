"""Fit loops, learning-rate schedules and lr_find, for the head on the cache and the whole network.

One loop serves both: batches come from cached rows (``ArrayRows``/``StreamedRows``) or from a
DataLoader over images. Optimizer: AdamW, or SGD with momentum (``FitOptions``), one parameter
group per layer group, so earlier groups take lower rates. Schedules are torch's: OneCycleLR (fastai v1's fit_one_cycle) or SGDR, cosine
with warm restarts (fastai 0.7's ``cycle_len``/``cycle_mult``) after a short warm-up at lr/100.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim import lr_scheduler

from precompute.archs import as_channels_last, channels_last, set_frozen_bn_eval
from precompute.errors import ConfigError  # noqa: F401 - defined torch-free, re-exported here
from precompute.task import SingleLabel, Task

EpochCallback = Callable[[dict], None]
log = logging.getLogger(__name__)
LearningRates = float | Sequence[float] | slice | str


def check_precompute_augment(precompute: bool, augment: bool) -> None:
    if precompute and augment:
        raise ConfigError(
            "precompute=True with augment=True: cached activations are computed once from "
            "un-augmented images, so augmentation cannot apply to them. Set augment=False to "
            "train on the cache, or precompute=False to train on freshly augmented images.")


N_LAYER_GROUPS = 3  # archs.layer_groups: body below lr_cut, body above, head


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ConfigError(f"batch_size {batch_size!r}: use 2 or more (BatchNorm cannot train on a batch of one)")


def seed_everything(seed: int) -> int:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


# -- learning rates per layer group ---------------------------------------------------------------

def group_lrs(lr: LearningRates, n_groups: int, frozen: int = 0) -> list[float]:
    """One learning rate per layer group; frozen groups (the first ``frozen``) get 0.

    - a number: every trainable group gets it;
    - a list: one rate per group, exactly ``n_groups`` (values of frozen groups are ignored);
    - a range, ``slice(lo, hi)`` or ``"lo:hi"``: spread geometrically over the trainable
      groups, lo for the earliest and hi for the head (fastai's ``slice``).
    """
    trainable = n_groups - frozen
    if isinstance(lr, str):
        try:
            lo, hi = (float(v) for v in lr.split(":"))
        except ValueError:
            raise ConfigError(f"learning-rate range {lr!r} must look like '1e-4:1e-2'") from None
        lr = slice(lo, hi)
    if isinstance(lr, slice):
        lo, hi = float(lr.start), float(lr.stop)
        if not 0 < lo <= hi:
            raise ConfigError(f"learning-rate range {lo}:{hi} needs 0 < lo <= hi")
        spread = [hi] if trainable == 1 else list(np.geomspace(lo, hi, trainable))
        return [0.0] * frozen + [float(v) for v in spread]
    if isinstance(lr, (int, float)):
        return [0.0] * frozen + [float(lr)] * trainable
    lrs = [float(v) for v in lr]
    if len(lrs) != n_groups:
        raise ConfigError(f"{len(lrs)} learning rates given for {n_groups} layer groups; give one value, "
                          f"a range 'lo:hi', or exactly {n_groups} (one per group, earliest first)")
    return [0.0] * frozen + lrs[frozen:]


def check_lrs(lr: LearningRates, n_groups: int = N_LAYER_GROUPS, frozen: int = 0) -> list[float]:
    """``group_lrs``, each rate finite and >= 0, and some trainable group's above 0."""
    try:
        lrs = group_lrs(lr, n_groups, frozen)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"learning rate {lr!r}: give a number, a range 'lo:hi' or {n_groups} numbers") from None
    bad = [v for v in lrs if not math.isfinite(v) or v < 0]
    if bad:
        raise ConfigError(f"learning rates must be finite and >= 0, got {lr!r}")
    if not any(lrs[frozen:]):
        raise ConfigError(f"every trainable layer group has learning rate 0 ({lr!r}): nothing would train; "
                          "give a rate > 0")
    return lrs


def differential_lrs(lr: float, n_groups: int, factor: float = 3.0) -> list[float]:
    """fastai's advice: each earlier group learns ``factor`` times slower (lr/9, lr/3, lr)."""
    return [lr / factor ** (n_groups - 1 - i) for i in range(n_groups)]


# -- schedules ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """How the learning rate moves during a stage.

    ``one_cycle`` and ``constant`` run ``epochs`` epochs. ``sgdr`` runs ``cycles`` cosine cycles,
    the first ``cycle_len`` epochs long and each next one ``cycle_mult`` times longer (fastai's
    ``fit(lr, cycles, cycle_len, cycle_mult)``), after ``warmup`` of the first cycle's steps at
    lr/100 (fastai 0.7's 1/20). The warm-up precedes the cosine (torch's SequentialLR), so the
    last cycle is cut that many steps short.
    """

    kind: str = "one_cycle"
    epochs: int = 1
    cycles: int = 1
    cycle_len: int = 1
    cycle_mult: int = 1
    warmup: float = 0.05
    pct_start: float = 0.25

    def __post_init__(self):
        if self.kind not in ("one_cycle", "sgdr", "constant"):
            raise ConfigError(f"schedule {self.kind!r}: choose one_cycle, sgdr or constant")
        if min(self.epochs, self.cycles, self.cycle_len, self.cycle_mult) < 1:
            raise ConfigError("epochs, cycles, cycle_len and cycle_mult must be >= 1")

    @property
    def total_epochs(self) -> int:
        if self.kind == "sgdr":
            return self.cycle_len * sum(self.cycle_mult ** i for i in range(self.cycles))
        return self.epochs

    def build(self, opt: torch.optim.Optimizer, steps_per_epoch: int) -> lr_scheduler.LRScheduler:
        steps = max(1, steps_per_epoch) * self.total_epochs
        if self.kind == "constant":
            return lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        if self.kind == "sgdr":
            t0 = max(1, steps_per_epoch) * self.cycle_len
            cosine = lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t0, T_mult=self.cycle_mult)
            warm = int(self.warmup * t0)
            if warm < 1:
                return cosine
            return lr_scheduler.SequentialLR(
                opt, [lr_scheduler.ConstantLR(opt, factor=0.01, total_iters=warm), cosine], milestones=[warm])
        if steps < 4:  # one-cycle needs a warm-up and an annealing step at least
            log.warning("one_cycle over %d step(s) (%d per epoch x %d epoch(s)) is too short for a warm-up "
                        "and an annealing phase (needs at least 4): running a constant learning rate "
                        "instead (lr %s for every step)", steps, steps_per_epoch, self.total_epochs,
                        ", ".join(f"{g['lr']:.3g}" for g in opt.param_groups))
            return lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        return lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=steps,
                                       pct_start=max(self.pct_start, 2 / steps))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FitOptions:
    """How a stage optimizes, beyond its rates and schedule.

    ``optimizer``: ``adamw`` (decoupled weight decay), or ``sgd`` with ``momentum`` as fastai 0.7
    trained; ``weight_decay`` for either. ``label_smoothing`` softens single-label targets in the
    training loss (the validation loss stays the plain one). ``early_stopping_patience``: stop
    after that many epochs without a lower validation loss, and keep the best epoch's weights.
    """

    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-2
    label_smoothing: float = 0.0
    early_stopping_patience: int | None = None

    def __post_init__(self):
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer {self.optimizer!r}: choose adamw or sgd")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum {self.momentum}: use a value in [0, 1), e.g. 0.9")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay {self.weight_decay}: use 0 or more, e.g. 1e-2")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing {self.label_smoothing}: use a value in [0, 1), e.g. 0.1")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError(f"early_stopping_patience {self.early_stopping_patience}: use 1 or more epochs, "
                              "or leave it unset to run every epoch")

    def as_dict(self) -> dict:
        return asdict(self)


def _optimizer(groups: Sequence[nn.Module], lrs: Sequence[float], options: FitOptions) -> torch.optim.Optimizer:
    param_groups = [{"params": [p for p in g.parameters() if p.requires_grad], "lr": lr}
                    for g, lr in zip(groups, lrs)]
    param_groups = [g for g in param_groups if g["params"]]
    if not param_groups:
        raise ConfigError("no trainable parameters: every layer group is frozen")
    if options.optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=options.momentum, weight_decay=options.weight_decay)
    return torch.optim.AdamW(param_groups, weight_decay=options.weight_decay)


# -- cached rows ----------------------------------------------------------------------------------

class ArrayRows:
    """Cached rows held in memory."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        # torch warns on a read-only array (pandas' copy-on-write hands out read-only ones): copy only those
        self.x = torch.from_numpy(np.require(x, np.float32, ["W"]))
        self.y = torch.from_numpy(np.require(y, None, ["W"]))

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
            x, y = torch.from_numpy(np.asarray(rows, dtype=np.float32)), torch.as_tensor(self.y[positions])
            order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                yield x[idx], y[idx]


def tensor_batches(x: np.ndarray, y: np.ndarray, batch_size: int = 512):
    return ArrayRows(x, y).batches(batch_size)


# -- the loop ---------------------------------------------------------------------------------------

SINGLE_LABEL = SingleLabel()  # the default task: one class per image (the classes matter only for decoding)


def loss_fn(task: Task = SINGLE_LABEL, label_smoothing: float = 0.0):
    """The task's loss: softmax cross-entropy for one class per image (optionally label-smoothed,
    for training); sigmoid + BCE for several labels per image."""
    return task.loss(label_smoothing)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable, device="cpu", task: Task = SINGLE_LABEL) -> tuple[float, float]:
    channels_last(model.eval())
    criterion = loss_fn(task)
    loss, correct, n = 0.0, 0.0, 0
    for x, y in batches:
        x, y = as_channels_last(x.to(device)), y.to(device)
        out = model(x)
        loss += criterion(out, y).item() * len(y)
        correct += task.correct(out, y)
        n += len(y)
    return loss / max(n, 1), correct / max(n, 1)


def _train_mode(model: nn.Module, groups: Sequence[nn.Module], freeze_bn_stats: bool) -> None:
    """Train mode, except BatchNorm whose statistics stay fixed: always those of frozen groups (as
    fastai), and with ``freeze_bn_stats`` every BatchNorm, the head's included: the head's
    statistics were set on the cache's un-augmented rows, and letting them learn on augmented
    images (fastai's rule) cost fine-tuned accuracy on ``make demo`` (the figures are in the
    README). ``freeze_bn_stats=False`` gives fastai's rule."""
    model.train()
    set_frozen_bn_eval(groups)
    if freeze_bn_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def fit(model: nn.Module, groups: Sequence[nn.Module], lrs: Sequence[float],
        train_batches: Callable[[torch.Generator], Iterable], valid_batches: Callable[[], Iterable],
        steps_per_epoch: int, schedule: Schedule = Schedule(), seed: int = 0, wd: float = 1e-2,
        device="cpu", task: Task = SINGLE_LABEL, freeze_bn_stats: bool = True,
        on_epoch: EpochCallback | None = None, label_smoothing: float = 0.0,
        options: FitOptions | None = None) -> list[dict]:
    """Train ``model``; one row per epoch (losses, accuracy, seconds, and the lr of every step).

    ``options`` (optimizer, weight decay, label smoothing, early stopping) default to AdamW with
    ``wd`` and ``label_smoothing``. With early stopping the model ends with the weights of its
    epoch of lowest validation loss, and the history stops at the epoch that ended training.

    Frozen groups' BatchNorm always keeps its running statistics (fastai). ``freeze_bn_stats``
    also keeps those of the body's trainable groups fixed (Keras' advice for fine-tuning): with
    small batches, batch statistics of a pretrained body differ so much from its running ones
    (on EfficientNet-Lite0 by about their own size) that the head's inputs shift and accuracy
    collapses; the head's too (see ``_train_mode``). BN scale and shift still train where their
    group is trainable.
    """
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    channels_last(model.to(device))  # before the optimizer: it holds the parameters it is given
    options = options or FitOptions(weight_decay=wd, label_smoothing=label_smoothing)
    opt = _optimizer(groups, lrs, options)
    sched = schedule.build(opt, steps_per_epoch)
    criterion = loss_fn(task, options.label_smoothing)  # validation loss stays the plain one
    history, best = [], (math.inf, None, -1)  # (valid loss, state dict, epoch) of the best epoch so far
    for epoch in range(schedule.total_epochs):
        t0 = time.perf_counter()
        _train_mode(model, groups, freeze_bn_stats)
        total, n, lr_steps = 0.0, 0, []
        for x, y in train_batches(gen):
            if len(x) < 2:  # a batch of one breaks BatchNorm1d in train mode
                continue
            x, y = as_channels_last(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
                loss = criterion(model(x), y)  # bf16 on a GPU; the CPU path is unchanged float32
            opt.zero_grad()
            loss.backward()
            opt.step()
            lr_steps.append(opt.param_groups[-1]["lr"])
            sched.step()
            total, n = total + loss.item() * len(x), n + len(x)
        valid_loss, valid_acc = evaluate_batches(model, valid_batches(), device, task)
        row = {"epoch": epoch, "train_loss": total / max(n, 1), "valid_loss": valid_loss,
               "valid_accuracy": valid_acc, "lr": lr_steps[-1] if lr_steps else 0.0,
               "seconds": time.perf_counter() - t0, "lr_steps": lr_steps}
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if options.early_stopping_patience is None:
            continue
        if valid_loss < best[0]:
            best = (valid_loss, copy.deepcopy(model.state_dict()), epoch)
        elif epoch - best[2] >= options.early_stopping_patience:
            log.info("early stopping after epoch %d: no lower validation loss for %d epoch(s); keeping epoch %d's "
                     "weights (valid loss %.4f)", epoch, epoch - best[2], best[2], best[0])
            break
    if best[1] is not None and best[2] != len(history) - 1:
        model.load_state_dict(best[1])
    return history


def fit_head_on_cache(head: nn.Module, train: ArrayRows | StreamedRows, valid: ArrayRows | StreamedRows,
                      epochs: int = 3, lr: float = 1e-3, batch_size: int = 64, seed: int = 0, wd: float = 1e-2,
                      on_epoch: EpochCallback | None = None, schedule: Schedule | None = None,
                      task: Task = SINGLE_LABEL, label_smoothing: float = 0.0,
                      options: FitOptions | None = None) -> list[dict]:
    """Train the head on cached activations: no image is decoded, no body run."""
    if len(train) < 2:
        raise ConfigError(f"{len(train)} training rows: the head needs at least 2 training images")
    schedule = schedule or Schedule("one_cycle", epochs=epochs)
    return fit(head, [head], [lr], lambda gen: train.batches(batch_size, gen), lambda: valid.batches(512),
               train.n_batches(batch_size), schedule, seed, wd, "cpu", task, freeze_bn_stats=False,
               on_epoch=on_epoch, label_smoothing=label_smoothing, options=options)


# -- lr_find -------------------------------------------------------------------------------------

LR_FIND_MIN_IT = 10  # fastai 0.7: the best loss counts (and divergence can stop the sweep) from iteration 10

def lr_find(model: nn.Module, groups: Sequence[nn.Module], lrs: Sequence[float],
            train_batches: Callable[[torch.Generator], Iterable], start: float = 1e-7, end: float = 10.0,
            num_it: int = 100, seed: int = 0, device="cpu", task: Task = SINGLE_LABEL,
            freeze_bn_stats: bool = True, min_it: int = LR_FIND_MIN_IT) -> dict:
    """fastai's lr_find: raise the rate exponentially each step, record the smoothed loss.

    The loss is smoothed as fastai does: an exponential moving average (beta 0.98) with bias
    correction. The sweep stops when the loss is no longer finite, or when the smoothed loss
    exceeds 4x the best one seen after the first ``min_it`` iterations (fastai 0.7 counts the best
    from iteration 10 on): on a trained model the first, near-zero losses are noise, and a rise
    over them is no divergence.

    ``lrs`` gives the groups' rates relative to the last group's (frozen groups 0). The model is
    restored afterwards. The suggestion is the rate at the steepest fall of the smoothed loss
    before its minimum, a common choice (fastai v2's ``steep``); always a rate of the sweep
    (within [start, end]); None when the loss never fell.
    """
    if not 0 < start < end:
        raise ConfigError(f"lr_find sweep {start}..{end}: needs 0 < start < end")
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    saved = copy.deepcopy(model.state_dict())
    channels_last(model.to(device))
    ratios = [lr / lrs[-1] for lr in lrs]
    opt = _optimizer(groups, [r * start for r in ratios], FitOptions(weight_decay=0.0))
    sched = lr_scheduler.ExponentialLR(opt, gamma=(end / start) ** (1 / max(1, num_it - 1)))
    criterion = loss_fn(task)
    rates, losses, avg, best = [], [], 0.0, math.inf
    _train_mode(model, groups, freeze_bn_stats)
    step, stopped = 0, None
    while step < num_it:
        seen = 0
        for x, y in train_batches(gen):
            if len(x) < 2:
                continue
            seen += 1
            loss = criterion(model(as_channels_last(x.to(device))), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            avg = 0.98 * avg + 0.02 * loss.item()
            smoothed = avg / (1 - 0.98 ** (step + 1))
            rates.append(opt.param_groups[-1]["lr"])
            losses.append(smoothed)
            if step >= min_it:
                best = min(best, smoothed)
            sched.step()
            step += 1
            if not math.isfinite(smoothed):
                stopped = f"the loss is no longer finite at lr {rates[-1]:.2e}"
            elif smoothed > 4 * best:
                stopped = f"the smoothed loss passed 4x its best at lr {rates[-1]:.2e}"
            if step >= num_it or stopped:
                break
        if stopped or not seen:
            break
    model.load_state_dict(saved)
    if stopped:
        log.info("lr_find stopped after %d of %d iterations: %s", step, num_it, stopped)
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    best_at = min(finite, key=lambda i: losses[i]) if finite else 0
    skip = min(10, best_at // 2)  # fastai skips the first points: the smoothed loss is still noise there
    if best_at - skip >= 2:
        grads = np.gradient(np.asarray(losses[skip:best_at + 1]), np.log10(rates[skip:best_at + 1]))
        suggestion = float(rates[skip + int(np.argmin(grads))])
    elif best_at > 0:  # too few points to differentiate: a tenth of the best rate, the older rule ...
        suggestion = max(float(rates[best_at]) / 10, float(rates[0]))  # ... kept inside the sweep
    else:  # the loss never fell (e.g. an already converged model): no rate to suggest
        suggestion = None
    return {"lrs": rates, "losses": losses, "suggestion": suggestion, "iterations": len(losses),
            "min_loss_lr": float(rates[best_at]) if losses else float(start)}


@torch.no_grad()
def predict_proba(model: nn.Module, batches, device="cpu", task: Task = SINGLE_LABEL) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (the task's activation: softmax, or a sigmoid per label) and targets over (x, y) batches."""
    channels_last(model.eval().to(device))
    probs, targets = [], []
    for x, y in batches:
        out = model(as_channels_last(x.to(device)))
        probs.append(task.activation(out).cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()
