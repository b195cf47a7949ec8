"""What happens around a fit, as callbacks on the one loop (``precompute.train.fit``), as in fastai v2.

A callback implements any of the events ``before_fit``, ``before_epoch``, ``after_batch``,
``after_epoch`` and ``after_fit``; each gets the loop (``FitLoop``: the model, optimizer, schedule,
epoch, the batch's loss and lr, the epoch's row, ``stop``). Callbacks run in ``order``, lowest first.

- ``BatchNormPolicy``: which BatchNorm layers update their running statistics;
- ``MixedPrecision``: bf16 or fp16 autocast (fp16 with a gradient scaler on CUDA);
- ``EarlyStopping``: stop when the validation loss stops falling, keep the best epoch's weights;
- ``Recorder``: every batch's loss and lr, every epoch's row; ``plot_loss`` and ``plot_lr``;
- ``ProgressBar``: a tqdm bar inside each epoch; ``TrackEpochs``: each epoch to a tracking run.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NotRequired, Sequence, TypedDict

import torch
from torch import nn
from torch.optim import lr_scheduler

from precompute.archs import set_frozen_bn_eval

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("precompute.train")


class EpochRow(TypedDict):
    """One epoch of a fit, as ``fit`` records it and a stage record keeps it (plain data: files, MLflow)."""
    epoch: int
    train_loss: float
    valid_loss: float
    valid_accuracy: float
    lr: float                          # the last group's rate at the epoch's last batch
    seconds: float
    lr_steps: NotRequired[list[float]]  # every batch's rate; dropped where only the epoch is kept


@dataclass(eq=False)
class FitLoop:
    """The state of one fit as its callbacks see it."""

    model: nn.Module
    groups: Sequence[nn.Module]
    opt: torch.optim.Optimizer
    sched: lr_scheduler.LRScheduler
    steps_per_epoch: int
    n_epochs: int
    device_type: str
    amp_dtype: torch.dtype | None = None   # autocast dtype (MixedPrecision); None: float32
    scaler: torch.amp.GradScaler | None = None
    epoch: int = 0
    loss: float = 0.0                      # the last batch's training loss
    lr: float = 0.0                        # the last group's rate for the last batch
    row: EpochRow = field(default_factory=dict)  # the last epoch's row
    history: list[EpochRow] = field(default_factory=list)
    stop: bool = False                     # a callback ends the fit after the current batch


class Callback:
    """A no-op on every event; subclasses implement the ones they need."""

    order = 0

    def before_fit(self, loop: FitLoop) -> None: ...
    def before_epoch(self, loop: FitLoop) -> None: ...
    def after_batch(self, loop: FitLoop) -> None: ...
    def after_epoch(self, loop: FitLoop) -> None: ...
    def after_fit(self, loop: FitLoop) -> None: ...


class BatchNormPolicy(Callback):
    """Frozen groups' BatchNorm keeps its running statistics (fastai). ``freeze_bn_stats`` keeps
    every BatchNorm's fixed, the trainable body groups' and the head's too (Keras' advice for
    fine-tuning): with small batches the batch statistics of a pretrained body differ so much from
    its running ones (on EfficientNet-Lite0 by about their own size) that the head's inputs shift;
    it is the pipeline's default, and its fine-tuned accuracy on ``make demo`` is the better one
    (the README has the figures). ``freeze_bn_stats=False`` is fastai's rule. BN scale and shift
    still train wherever their group trains."""

    order = -10

    def __init__(self, freeze_bn_stats: bool = True):
        self.freeze_bn_stats = freeze_bn_stats

    def before_epoch(self, loop: FitLoop) -> None:
        set_frozen_bn_eval(loop.groups)
        if self.freeze_bn_stats:
            for m in loop.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision(Callback):
    """Forward and loss under autocast in ``precision`` ("bf16" or "fp16"; None: float32), on the
    CPU too. fp16 scales the loss (torch.amp.GradScaler) so small gradients do not vanish; bf16
    keeps float32's range and needs no scaling."""

    order = -5

    def __init__(self, precision: str | None = "bf16"):
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose bf16, fp16 or None (float32)")
        self.precision = precision

    def before_fit(self, loop: FitLoop) -> None:
        loop.amp_dtype = PRECISIONS.get(self.precision) if self.precision else None
        if self.precision == "fp16":
            loop.scaler = torch.amp.GradScaler(loop.device_type)


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs without a lower validation loss; the model ends with the
    weights of its best epoch, and the history stops at the epoch that ended training."""

    order = 10

    def __init__(self, patience: int):
        self.patience = patience

    def before_fit(self, loop: FitLoop) -> None:
        self.best = (math.inf, None, -1)  # (valid loss, state dict, epoch)

    def after_epoch(self, loop: FitLoop) -> None:
        valid_loss = loop.row["valid_loss"]
        if valid_loss < self.best[0]:
            self.best = (valid_loss, copy.deepcopy(loop.model.state_dict()), loop.epoch)
        elif loop.epoch - self.best[2] >= self.patience:
            log.info("early stopping after epoch %d: no lower validation loss for %d epoch(s); keeping epoch %d's "
                     "weights (valid loss %.4f)", loop.epoch, loop.epoch - self.best[2], self.best[2], self.best[0])
            loop.stop = True

    def after_fit(self, loop: FitLoop) -> None:
        if self.best[1] is not None and self.best[2] != len(loop.history) - 1:
            loop.model.load_state_dict(self.best[1])


class OnEpoch(Callback):
    """A plain function called with each epoch's row."""

    order = 20

    def __init__(self, fn: Callable[[dict], None]):
        self.fn = fn

    def after_epoch(self, loop: FitLoop) -> None:
        self.fn(loop.row)


class Recorder(Callback):
    """fastai's recorder: the loss and lr of every batch and the row of every epoch of the last fit."""

    order = 5

    def before_fit(self, loop: FitLoop) -> None:
        self.lrs, self.losses, self.epochs = [], [], []
        self.steps_per_epoch = loop.steps_per_epoch

    def after_batch(self, loop: FitLoop) -> None:
        self.lrs.append(loop.lr)
        self.losses.append(loop.loss)

    def after_epoch(self, loop: FitLoop) -> None:
        self.epochs.append({k: v for k, v in loop.row.items() if k != "lr_steps"})

    @property
    def valid_losses(self) -> list[float]:
        return [r["valid_loss"] for r in getattr(self, "epochs", [])]

    def plot_loss(self) -> Figure:
        """The training loss of every batch, and the validation loss at the end of each epoch."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(range(1, len(self.losses) + 1), self.losses, label="train")
        ends = [(i + 1) * max(1, self.steps_per_epoch) for i in range(len(self.epochs))]
        ax.plot(ends, self.valid_losses, marker="o", label="valid")
        ax.set(xlabel="batch", ylabel="loss", title="loss")
        ax.legend()
        fig.tight_layout()
        return fig

    def plot_lr(self) -> Figure:
        """The learning rate of the last layer group at every batch: the schedule as it ran."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(range(1, len(self.lrs) + 1), self.lrs)
        ax.set(xlabel="batch", ylabel="learning rate", title="learning rate schedule")
        fig.tight_layout()
        return fig


class ProgressBar(Callback):
    """A tqdm bar over each epoch's batches (an unfrozen epoch on a few thousand photos takes minutes
    on a CPU), with the running loss; ``file``: where it is drawn (default stderr); redrawn at most
    every ``mininterval`` seconds."""

    order = 30

    def __init__(self, desc: str = "fit", file=None, mininterval: float = 0.1):
        self.desc, self.file, self.mininterval = desc, file, mininterval

    def before_epoch(self, loop: FitLoop) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=loop.steps_per_epoch, desc=f"{self.desc} epoch {loop.epoch}", leave=False,
                        file=self.file or sys.stderr, dynamic_ncols=True, mininterval=self.mininterval)

    def after_batch(self, loop: FitLoop) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loop.loss:.4f}", refresh=False)

    def after_epoch(self, loop: FitLoop) -> None:
        self.bar.close()

    def after_fit(self, loop: FitLoop) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()


class TrackEpochs(Callback):
    """Each epoch's losses and accuracy to a tracking run (``run.metrics``), the lr of every step
    (``run.series("lr_step")``), and a log line; ``log`` takes ``.info`` (a logger, Dagster's too)."""

    order = 20

    def __init__(self, run, stage: str, log_to=log):
        self.run, self.stage, self.log = run, stage, log_to
        self.step = 0

    def after_epoch(self, loop: FitLoop) -> None:
        row = loop.row
        self.run.metrics({k: v for k, v in row.items() if k not in ("epoch", "lr_steps")}, step=row["epoch"])
        self.run.series("lr_step", row["lr_steps"], start=self.step)  # the schedule as it ran, per batch
        self.step += len(row["lr_steps"])
        self.log.info(f"{self.stage} epoch {row['epoch']}: train_loss {row['train_loss']:.4f} valid_loss "
                      f"{row['valid_loss']:.4f} valid_accuracy {row['valid_accuracy']:.4f} ({row['seconds']:.1f}s)")


class EpochTable(Callback):
    """Each epoch into ``history`` (with its stage), and printed as fastai prints it when ``verbose``."""

    order = 25

    def __init__(self, history: list[dict], stage: str, verbose: bool = True):
        self.history, self.stage, self.verbose = history, stage, verbose

    def after_epoch(self, loop: FitLoop) -> None:
        row = loop.row
        self.history.append({"stage": self.stage, **{k: v for k, v in row.items() if k != "lr_steps"}})
        if self.verbose:
            if row["epoch"] == 0:
                print(f"{self.stage}: {'epoch':>5} {'train_loss':>10} {'valid_loss':>10} {'accuracy':>9} {'time':>6}")
            print(f"{' ' * len(self.stage)}  {row['epoch']:>5} {row['train_loss']:>10.4f} {row['valid_loss']:>10.4f} "
                  f"{row['valid_accuracy']:>9.4f} {row['seconds']:>5.1f}s")


def sorted_callbacks(callbacks: Sequence[Callback]) -> list[Callback]:
    return sorted(callbacks, key=lambda cb: cb.order)
