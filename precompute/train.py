"""The one fit loop, learning-rate schedules and learning rates per layer group.

One loop (``fit``) serves the head on the cache and the whole network on images: batches come from
cached rows (``ArrayRows``/``StreamedRows``) or from a DataLoader over images. What happens around
it (BatchNorm policy, mixed precision, early stopping, recording, progress, tracking) is a callback
(precompute.callbacks), as in fastai v2; lr_find is one too (precompute.lr_find). Optimizer: AdamW,
or SGD with momentum (``FitOptions``), one parameter group per layer group, so earlier groups take
lower rates. Schedules are torch's: OneCycleLR (fastai v1's fit_one_cycle) or SGDR, cosine with warm
restarts (fastai 0.7's ``cycle_len``/``cycle_mult``) after a short warm-up at lr/100.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim import lr_scheduler

from precompute.archs import as_channels_last, channels_last
from precompute.callbacks import (BatchNormPolicy, Callback, EarlyStopping, EpochRow, FitLoop, MixedPrecision,
                                  OnEpoch, sorted_callbacks)
from precompute.errors import ConfigError  # noqa: F401 - defined torch-free, re-exported here
from precompute.settings import (N_LAYER_GROUPS, FitSettings, ScheduleSettings,  # noqa: F401 - re-exported
                                 check_batch_size, check_lrs as _check_lrs, check_precompute_augment, lr_spec)
from precompute.task import SingleLabel, Task

EpochCallback = Callable[[EpochRow], None]
log = logging.getLogger(__name__)
LearningRates = float | Sequence[float] | slice | str


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
    spec = lr_spec(lr, n_groups)  # settings.lr_spec: the one parser, and its errors
    if isinstance(spec, tuple):
        lo, hi = spec
        spread = [hi] if trainable == 1 else list(np.geomspace(lo, hi, trainable))
        return [0.0] * frozen + [float(v) for v in spread]
    if isinstance(spec, float):
        return [0.0] * frozen + [spec] * trainable
    return [0.0] * frozen + spec[frozen:]


def check_lrs(lr: LearningRates, n_groups: int = N_LAYER_GROUPS, frozen: int = 0) -> list[float]:
    """``group_lrs`` of a usable setting (settings.check_lrs: finite, >= 0, some trainable rate above 0)."""
    _check_lrs(lr, n_groups, frozen)
    return group_lrs(lr, n_groups, frozen)


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

    def __post_init__(self):  # settings.ScheduleSettings decides what is valid
        ScheduleSettings.checked(schedule=self.kind, epochs=self.epochs, cycles=self.cycles,
                                 cycle_len=self.cycle_len, cycle_mult=self.cycle_mult)

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

    def __post_init__(self):  # settings.FitSettings decides what is valid
        FitSettings.checked(**asdict(self))

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


# Streamed training rows pass through a shuffle buffer of this many bytes (as float32): chunks are read in
# random order into it, and batches are drawn from it at random, so one batch mixes rows of many chunks
# (webdataset's shard shuffle plus shuffle buffer). Shuffling only within a chunk is not enough: a store
# written in folder order (a folder per class) holds one class per chunk, and a batch was then one class
# (issue 21: a streamed epoch reached 0.5% at 1,281,167 images in 1,000 classes).
SHUFFLE_BUFFER_BYTES = 512 << 20


class StreamedRows:
    """Cached rows read chunk by chunk from the store: memory holds the shuffle buffer
    (``buffer_bytes``, SHUFFLE_BUFFER_BYTES by default) and one chunk, whatever the size.

    With a generator, chunks come in random order into the buffer and each batch is drawn from the
    whole buffer at random; without one, rows come in the store's chunk order (``order()``).
    """

    def __init__(self, entry, image_ids: Sequence[str], y: np.ndarray, buffer_bytes: int = SHUFFLE_BUFFER_BYTES):
        self.entry, self.ids, self.y = entry, list(image_ids), np.asarray(y)
        self.buffer_bytes = buffer_bytes

    def __len__(self) -> int:
        return len(self.ids)

    def _by_chunk(self) -> list[list[int]]:
        index = self.entry.index()
        by_chunk: dict[str, list[int]] = {}
        for pos, image_id in enumerate(self.ids):
            by_chunk.setdefault(index[image_id][0], []).append(pos)
        return list(by_chunk.values())

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self.ids) // batch_size)

    def order(self) -> np.ndarray:
        """The positions (in ``image_ids``) that ``batches()`` without a generator yields, in that order."""
        groups = self._by_chunk()
        return np.concatenate(groups) if groups else np.zeros(0, np.int64)

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """``n_batches`` batches of ``batch_size`` rows (the last may be smaller)."""
        groups = self._by_chunk()
        if generator is not None:
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        buffer: _ShuffleBuffer | None = None
        for positions in groups:
            (_, rows), = self.entry.iter_blocks([self.ids[p] for p in positions])
            x, y = torch.from_numpy(np.asarray(rows, dtype=np.float32)), torch.as_tensor(self.y[positions])
            if buffer is None:  # the rows it holds, from the row size; at least a batch. Unshuffled (an
                # evaluation), a batch goes out as soon as it is whole: memory holds one chunk.
                capacity = (batch_size if generator is None else  # never more than the rows there are
                            max(batch_size, min(len(self.ids), self.buffer_bytes // max(x[0].numel() * 4, 1))))
                buffer = _ShuffleBuffer(capacity, x, y)
            buffer.add(x, y)
            if buffer.held >= capacity:
                yield from buffer.draw(batch_size, generator, keep_rest=True)
        if buffer is not None and buffer.held:
            yield from buffer.draw(batch_size, generator, keep_rest=False)


class _ShuffleBuffer:
    """The rows between the chunks read and the batches drawn: one tensor, allocated once and filled in
    place (concatenating the chunks held them twice: +0.8 GB at 1,281,167 images)."""

    def __init__(self, capacity: int, x: torch.Tensor, y: torch.Tensor):
        self.x = torch.empty((capacity + len(x), *x.shape[1:]), dtype=x.dtype)
        self.y = torch.empty((capacity + len(y), *y.shape[1:]), dtype=y.dtype)
        self.held = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        end = self.held + len(y)
        if end > len(self.y):  # a chunk larger than the first one: grow
            for name, new in (("x", x), ("y", y)):
                grown = torch.empty((end, *new.shape[1:]), dtype=new.dtype)
                grown[:self.held] = getattr(self, name)[:self.held]
                setattr(self, name, grown)
        self.x[self.held:end], self.y[self.held:end] = x, y
        self.held = end

    def draw(self, batch_size: int, generator: torch.Generator | None, keep_rest: bool):
        """The rows held as batches (copies), at random with a generator; with ``keep_rest`` the rows short
        of a whole batch stay, moved to the front."""
        n = self.held
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        whole = n - n % batch_size if keep_rest else n
        for i in range(0, whole, batch_size):
            idx = order[i:i + batch_size]
            yield self.x[idx], self.y[idx]
        rest = order[whole:]
        self.x[:len(rest)], self.y[:len(rest)] = self.x[rest], self.y[rest]
        self.held = len(rest)


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


def _event(callbacks: Sequence[Callback], name: str, loop: FitLoop) -> None:
    for cb in callbacks:
        getattr(cb, name)(loop)


def fit(model: nn.Module, groups: Sequence[nn.Module], lrs: Sequence[float],
        train_batches: Callable[[torch.Generator], Iterable], valid_batches: Callable[[], Iterable] | None,
        steps_per_epoch: int, schedule: Schedule = Schedule(), seed: int = 0, wd: float = 1e-2,
        device="cpu", task: Task = SINGLE_LABEL, freeze_bn_stats: bool = True,
        on_epoch: EpochCallback | None = None, label_smoothing: float = 0.0,
        options: FitOptions | None = None, callbacks: Sequence[Callback] = (),
        precision: str | None = None) -> list[EpochRow]:
    """Train ``model``: the one loop every stage and the Learner run. One row per epoch (losses,
    accuracy, seconds, and the lr of every step); without ``valid_batches`` no validation runs.

    ``options`` (optimizer, weight decay, label smoothing, early stopping) default to AdamW with
    ``wd`` and ``label_smoothing``. Around the loop are callbacks (precompute.callbacks), these
    always: ``BatchNormPolicy(freeze_bn_stats)``, ``MixedPrecision(precision)`` (None: bf16 on a
    GPU, float32 on the CPU), ``EarlyStopping`` when the options ask for it, ``OnEpoch(on_epoch)``.
    """
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    channels_last(model.to(device))  # before the optimizer: it holds the parameters it is given
    options = options or FitOptions(weight_decay=wd, label_smoothing=label_smoothing)
    opt = _optimizer(groups, lrs, options)
    device_type = torch.device(device).type
    loop = FitLoop(model, groups, opt, schedule.build(opt, steps_per_epoch), steps_per_epoch,
                   schedule.total_epochs, device_type)
    precision = precision or ("bf16" if device_type == "cuda" else None)
    cbs = [BatchNormPolicy(freeze_bn_stats), MixedPrecision(precision), *callbacks]
    if options.early_stopping_patience is not None:
        cbs.append(EarlyStopping(options.early_stopping_patience))
    if on_epoch:
        cbs.append(OnEpoch(on_epoch))
    cbs = sorted_callbacks(cbs)
    criterion = loss_fn(task, options.label_smoothing)  # validation loss stays the plain one
    _event(cbs, "before_fit", loop)
    for epoch in range(loop.n_epochs):
        t0 = time.perf_counter()
        loop.epoch = epoch
        model.train()
        _event(cbs, "before_epoch", loop)
        total, n, lr_steps = 0.0, 0, []
        for x, y in train_batches(gen):
            if len(x) < 2:  # a batch of one breaks BatchNorm1d in train mode
                continue
            x, y = as_channels_last(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            with torch.autocast(device_type, dtype=loop.amp_dtype, enabled=loop.amp_dtype is not None):
                loss = criterion(model(x), y)
            opt.zero_grad()
            if loop.scaler is not None:
                loop.scaler.scale(loss).backward()
                loop.scaler.step(opt)
                loop.scaler.update()
            else:
                loss.backward()
                opt.step()
            loop.lr, loop.loss = opt.param_groups[-1]["lr"], loss.item()
            lr_steps.append(loop.lr)
            loop.sched.step()
            total, n = total + loop.loss * len(x), n + len(x)
            _event(cbs, "after_batch", loop)
            if loop.stop:
                break
        if valid_batches is None:
            if loop.stop:
                break
            continue
        valid_loss, valid_acc = evaluate_batches(model, valid_batches(), device, task)
        loop.row = {"epoch": epoch, "train_loss": total / max(n, 1), "valid_loss": valid_loss,
                    "valid_accuracy": valid_acc, "lr": lr_steps[-1] if lr_steps else 0.0,
                    "seconds": time.perf_counter() - t0, "lr_steps": lr_steps}
        loop.history.append(loop.row)
        _event(cbs, "after_epoch", loop)
        if loop.stop:
            break
    _event(cbs, "after_fit", loop)
    return loop.history


def fit_head_on_cache(head: nn.Module, train: ArrayRows | StreamedRows, valid: ArrayRows | StreamedRows,
                      epochs: int = 3, lr: float = 1e-3, batch_size: int = 64, seed: int = 0, wd: float = 1e-2,
                      on_epoch: EpochCallback | None = None, schedule: Schedule | None = None,
                      task: Task = SINGLE_LABEL, label_smoothing: float = 0.0,
                      options: FitOptions | None = None, callbacks: Sequence[Callback] = ()) -> list[EpochRow]:
    """Train the head on cached activations: no image is decoded, no body run."""
    if len(train) < 2:
        raise ConfigError(f"{len(train)} training rows: the head needs at least 2 training images")
    schedule = schedule or Schedule("one_cycle", epochs=epochs)
    return fit(head, [head], [lr], lambda gen: train.batches(batch_size, gen), lambda: valid.batches(512),
               train.n_batches(batch_size), schedule, seed, wd, "cpu", task, freeze_bn_stats=False,
               on_epoch=on_epoch, label_smoothing=label_smoothing, options=options, callbacks=callbacks)


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
