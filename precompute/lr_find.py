"""fastai's lr_find as a callback on the one fit loop, and fastai v2's suggestion functions.

The rate rises exponentially each step from ``start`` to ``end``; the loss is smoothed as fastai
does (an exponential moving average, beta 0.98, with bias correction). The sweep stops when the
loss is no longer finite, or when the smoothed loss passes 4x the best one seen after the first
``min_it`` iterations (fastai 0.7 counts the best from iteration 10 on): on a trained model the
first, near-zero losses are noise, and a rise over them is no divergence. The model is restored.

Suggestions (each a rate of the sweep, None when the loss never fell), as fastai v2 names them:
``valley`` (the default: in the longest stretch of falling loss, a little past its first third),
``slide`` (where the loss' slope stops changing, searching back from the end), ``minimum`` (a
tenth of the rate of the lowest loss) and ``steep`` (the steepest fall).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim import lr_scheduler

from precompute.callbacks import Callback
from precompute.train import SINGLE_LABEL, ConfigError, FitOptions, Schedule, fit
from precompute.task import Task

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from precompute.heads import HeadConfig

    from precompute.callbacks import FitLoop

log = logging.getLogger(__name__)
LR_FIND_MIN_IT = 10  # fastai 0.7: the best loss counts (and divergence can stop the sweep) from iteration 10
Suggest = Literal["valley", "slide", "minimum", "steep"]


def _trimmed(lrs: Sequence[float], losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """fastai drops the first tenth (the smoothed loss is still noise) and the last 5 points."""
    n = len(losses)
    lo, hi = (n // 10, n - 5) if n >= 20 else (0, n)
    return np.asarray(lrs[lo:hi], dtype=float), np.asarray(losses[lo:hi], dtype=float)


def valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai v2's default: the longest run of falling loss, the rate 1/3 + 1/6 of the way along it."""
    n = len(losses)
    run, start, end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end, start = i, i - run[i]
    third = (end - start) / 3
    return float(lrs[min(n - 1, start + int(third) + int(third / 2))])


def slide(lrs: np.ndarray, losses: np.ndarray, lr_diff: int = 15, thresh: float = 0.005) -> float:
    """fastai v2's slide: from the end back, the first rate where the loss' slope stops changing."""
    grad = np.gradient(losses)
    lr_diff = min(lr_diff, len(losses) - 1)
    r, l_ = -1, -1 - lr_diff
    found = lrs[l_]
    while l_ >= -len(losses) and abs(grad[r] - grad[l_]) > thresh:
        found = lrs[l_]
        r, l_ = r - 1, l_ - 1
    return float(found)


def minimum(lrs: np.ndarray, losses: np.ndarray) -> float:
    """A tenth of the rate of the lowest loss (kept inside the sweep)."""
    return max(float(lrs[int(np.argmin(losses))]) / 10, float(lrs[0]))


def steep(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The rate of the steepest fall of the loss (its lowest slope against log10 of the rate)."""
    return float(lrs[int(np.argmin(np.gradient(losses, np.log10(lrs))))])


SUGGESTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "valley": valley, "slide": slide, "minimum": minimum, "steep": steep}


@dataclass
class LRFindResult:
    """The sweep (rates and smoothed losses), each suggestion function's rate, and the chosen one."""

    lrs: list[float]
    losses: list[float]
    suggestions: dict[str, float | None] = field(default_factory=dict)
    method: str = "valley"
    stopped: str | None = None  # why the sweep ended early, if it did
    head: "HeadConfig | None" = None    # on the cache: the head config swept (a stage using the rate checks it trains the same)

    @property
    def suggestion(self) -> float | None:
        """The rate of ``method``; None when the loss never fell (an already converged model)."""
        return self.suggestions.get(self.method)

    @property
    def iterations(self) -> int:
        return len(self.losses)

    @property
    def min_loss_lr(self) -> float:
        finite = [i for i, v in enumerate(self.losses) if math.isfinite(v)]
        return float(self.lrs[min(finite, key=lambda i: self.losses[i])]) if finite else float("nan")

    def plot(self) -> Figure:
        """Loss vs learning rate (log scale), every suggestion marked; shown inline in a notebook."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses)
        for (name, lr), color in zip(self.suggestions.items(), ("red", "orange", "green", "purple")):
            if lr is not None:
                ax.axvline(lr, color=color, linestyle="--" if name == self.method else ":", label=f"{name} {lr:.2e}")
        if self.suggestion is not None:
            ax.legend()
        ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss",
               title="lr_find" if self.suggestion is not None else "lr_find: the loss never fell, no suggestion")
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        said = "none (the loss never fell)" if self.suggestion is None else f"{self.suggestion:.2e}"
        others = ", ".join(f"{k} {v:.2e}" for k, v in self.suggestions.items() if v is not None and k != self.method)
        return (f"LRFindResult({self.method}={said}{'; ' + others if others else ''}, "
                f"min_loss_lr={self.min_loss_lr:.2e}, {self.iterations} steps)")


def suggest(lrs: Sequence[float], losses: Sequence[float], method: Suggest = "valley",
            stopped: str | None = None) -> LRFindResult:
    """Every suggestion function on a sweep; all None when the loss never fell below its first value."""
    if method not in SUGGESTIONS:
        raise ConfigError(f"lr_find suggestion {method!r}: choose one of {', '.join(SUGGESTIONS)}")
    x, y = _trimmed(lrs, losses)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    fell = len(y) >= 3 and int(np.argmin(y)) > 0
    suggestions = {name: (fn(x, y) if fell else None) for name, fn in SUGGESTIONS.items()}
    return LRFindResult(list(lrs), list(losses), suggestions, method, stopped)


class LRFinder(Callback):
    """Raises the rate exponentially each batch, records the smoothed loss, stops on divergence,
    and puts the model back as it was."""

    order = 0

    def __init__(self, start: float, end: float, num_it: int, min_it: int = LR_FIND_MIN_IT):
        self.start, self.end, self.num_it, self.min_it = start, end, num_it, min_it

    def before_fit(self, loop: FitLoop) -> None:
        self.saved = copy.deepcopy(loop.model.state_dict())
        loop.sched = lr_scheduler.ExponentialLR(loop.opt, gamma=(self.end / self.start) ** (1 / max(1, self.num_it - 1)))
        self.lrs, self.losses, self.avg, self.best, self.stopped = [], [], 0.0, math.inf, None

    def after_batch(self, loop: FitLoop) -> None:
        step = len(self.losses)
        self.avg = 0.98 * self.avg + 0.02 * loop.loss
        smoothed = self.avg / (1 - 0.98 ** (step + 1))
        self.lrs.append(loop.lr)
        self.losses.append(smoothed)
        if step >= self.min_it:
            self.best = min(self.best, smoothed)
        if not math.isfinite(smoothed):
            self.stopped = f"the loss is no longer finite at lr {loop.lr:.2e}"
        elif smoothed > 4 * self.best:
            self.stopped = f"the smoothed loss passed 4x its best at lr {loop.lr:.2e}"
        loop.stop = bool(self.stopped) or len(self.losses) >= self.num_it

    def after_fit(self, loop: FitLoop) -> None:
        loop.model.load_state_dict(self.saved)
        if self.stopped:
            log.info("lr_find stopped after %d of %d iterations: %s", len(self.losses), self.num_it, self.stopped)


def lr_find(model: nn.Module, groups: Sequence[nn.Module], lrs: Sequence[float],
            train_batches: Callable[[torch.Generator], Iterable], start: float = 1e-7, end: float = 10.0,
            num_it: int = 100, seed: int = 0, device="cpu", task: Task = SINGLE_LABEL, freeze_bn_stats: bool = True,
            min_it: int = LR_FIND_MIN_IT, method: Suggest = "valley", precision: str | None = None,
            steps_per_epoch: int | None = None) -> LRFindResult:
    """fastai's lr_find on the fit loop: ``lrs`` gives the groups' rates relative to the last
    group's (frozen groups 0); no weight decay; the model is restored afterwards. The sweep runs
    ``num_it`` batches, over as many passes of ``train_batches`` as that takes."""
    if not 0 < start < end:
        raise ConfigError(f"lr_find sweep {start}..{end}: needs 0 < start < end")
    finder = LRFinder(start, end, num_it, min_it)
    epochs = num_it if not steps_per_epoch else -(-num_it // steps_per_epoch) + 1  # the finder stops at num_it
    fit(model, groups, [lr / lrs[-1] * start for lr in lrs], train_batches, None, steps_per_epoch or num_it,
        Schedule("constant", epochs=epochs), seed, device=device, task=task, freeze_bn_stats=freeze_bn_stats,
        options=FitOptions(weight_decay=0.0), callbacks=[finder], precision=precision)
    return suggest(finder.lrs, finder.losses, method, finder.stopped)
