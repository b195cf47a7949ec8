"""The Learner: fastai 0.7's ``ConvLearner`` on this library, the public face a notebook uses.

    learn = Learner.pretrained("tf_efficientnet_lite0", "data/dogscats", precompute=True)
    learn.fit(3e-3, 3)                       # only the head trains, on cached activations
    learn.precompute = False                 # from here the body runs on images ...
    learn.aug_tfms = "side_on"               # ... so augmentation can apply
    learn.fit(3e-3, 3, cycle_len=1)
    learn.unfreeze()                         # every group trains (with precompute on, it would go off, and say so)
    learn.fit(slice(1e-5, 3e-4), 3, cycle_len=1, cycle_mult=2)  # lower rates for earlier groups
    probs, y = learn.tta()

Between calls the Learner keeps the current stage record (the ``StageRecord`` ``precompute.recipe``'s
stage functions return and take), so each step continues from the last one and ``export`` writes the
file ``precompute predict --model`` reads. The pretrained backbone stays as loaded: it is what
computes the cache, and a body trained on images is never fed back into it.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from precompute import recipe
from precompute.archs import body_output_shape, describe_groups, layer_groups
from precompute.archs import freeze_to as freeze_groups
from precompute.heads import HeadConfig, build_head
from precompute.manifest import build_manifest, ok_rows
from precompute.records import StageRecord
from precompute.store import ActivationStore, Entry
from precompute.task import Task
from precompute.train import (ConfigError, FitOptions, LearningRates, Schedule, StreamedRows, fit_head_on_cache, group_lrs,
                              lr_find, predict_proba, tensor_batches)
from precompute.transforms import AUGMENTATION_PRESETS, TransformSpec, eval_transform, train_transform

log = logging.getLogger(__name__)

AugTfms = str | dict | None  # a preset name (side_on, top_down, basic), train_transform's arguments, or None
_AUG_ARGS = set(inspect.signature(train_transform).parameters) - {"ts"}


def default_store() -> str:
    """Where the cache lives when ``store`` is not given; the CLI (``precompute cache list``) and
    the Dagster resources use the same rule: ``$PRECOMPUTE_STORE``, else
    ``$PRECOMPUTE_HOME/activations``, else ``./var/activations`` (resolved when the Learner is made)."""
    if os.environ.get("PRECOMPUTE_STORE"):
        return os.environ["PRECOMPUTE_STORE"]
    return str(Path(os.environ.get("PRECOMPUTE_HOME", "var")).resolve() / "activations")


def augmentation_args(aug_tfms: AugTfms) -> dict | None:
    """``aug_tfms`` as ``train_transform``'s keyword arguments (None: no augmentation)."""
    if aug_tfms is None:
        return None
    if isinstance(aug_tfms, str):
        if aug_tfms not in AUGMENTATION_PRESETS:
            raise ConfigError(f"aug_tfms={aug_tfms!r}: choose a preset ({', '.join(sorted(AUGMENTATION_PRESETS))}), "
                              "a dict of precompute.transforms.train_transform's arguments, or None")
        return {"preset": aug_tfms}
    if isinstance(aug_tfms, dict):
        unknown = set(aug_tfms) - _AUG_ARGS
        if unknown:
            raise ConfigError(f"aug_tfms has unknown keys {sorted(unknown)}: valid are {sorted(_AUG_ARGS)}")
        train_transform(TransformSpec(), **aug_tfms)  # the transform's own checks (preset, max_zoom)
        return dict(aug_tfms)
    raise ConfigError(f"aug_tfms={aug_tfms!r}: give a preset name, a dict, or None")


def _describe_aug(aug: dict | None) -> str:
    if aug is None:
        return "no augmentation"
    return ", ".join(f"{k}={v}" for k, v in aug.items())


def _aug_precompute_error(aug: dict) -> ConfigError:
    return ConfigError(
        f"aug_tfms ({_describe_aug(aug)}) with precompute=True: the cache holds the activations of the "
        "un-augmented images, computed once, so augmentation cannot apply to them. Set learn.precompute = False "
        "first to train on freshly augmented images (the body then runs every batch), or leave aug_tfms=None "
        "to train on the cache.")


# -- results -----------------------------------------------------------------------------------------

@dataclass
class LRFinder:
    """fastai's lr_find result: the smoothed loss at each rate of an exponential sweep."""

    lrs: list[float]
    losses: list[float]
    suggestion: float | None  # steepest fall of the loss before its minimum; None when it never fell
    min_loss_lr: float

    def plot(self) -> Figure:
        """Loss vs learning rate (log scale), the suggestion marked; shown inline when returned in a notebook."""
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses)
        if self.suggestion is not None:
            ax.axvline(self.suggestion, color="red", linestyle="--", label=f"suggestion {self.suggestion:.2e}")
            ax.legend()
        ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss",
               title="lr_find" if self.suggestion is not None else "lr_find: the loss never fell, no suggestion")
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        said = "none (the loss never fell)" if self.suggestion is None else f"{self.suggestion:.2e}"
        return f"LRFinder(suggestion={said}, min_loss_lr={self.min_loss_lr:.2e}, {len(self.lrs)} steps)"


@dataclass
class Interpretation:
    """The model's validation predictions, read as fastai's ``ClassificationInterpretation``."""

    probs: np.ndarray
    targets: np.ndarray
    classes: list[str]
    paths: list[str]

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def accuracy(self) -> float:
        self._single_label("accuracy")
        return float((self.preds == self.targets).mean()) if len(self.targets) else float("nan")

    def _single_label(self, what: str) -> None:
        if self.targets.ndim != 1:
            raise ValueError(f"{what} is for one class per image; for multi-label targets see "
                             "precompute.evaluate.per_class and multilabel_metrics")

    def confusion_matrix(self) -> np.ndarray:
        """Rows: actual class, columns: predicted class, in the order of ``classes``."""
        from sklearn.metrics import confusion_matrix

        self._single_label("confusion_matrix")
        return confusion_matrix(self.targets, self.preds, labels=list(range(len(self.classes))))

    def most_confused(self, top: int = 5) -> list[tuple[str, str, int]]:
        """(actual, predicted, count) of the largest mistakes, most frequent first."""
        from precompute.evaluate import most_confused

        self._single_label("most_confused")
        return most_confused(self.targets, self.preds, self.classes, top)

    def top_losses(self, k: int = 8) -> pd.DataFrame:
        """The k images the model was most wrong about, worst first."""
        from precompute.evaluate import top_losses

        idx = top_losses(self.probs, self.targets, k)
        p = np.clip(self.probs, 1e-7, 1 - 1e-7)
        if self.targets.ndim == 2:
            loss = -(self.targets * np.log(p) + (1 - self.targets) * np.log(1 - p)).sum(1)
            return pd.DataFrame({"path": [self.paths[i] for i in idx], "loss": loss[idx]})
        return pd.DataFrame({
            "path": [self.paths[i] for i in idx],
            "actual": [self.classes[self.targets[i]] for i in idx],
            "predicted": [self.classes[self.preds[i]] for i in idx],
            "probability": [float(self.probs[i, self.preds[i]]) for i in idx],
            "loss": [float(-np.log(p[i, self.targets[i]])) for i in idx]})

    def plot_confusion_matrix(self) -> Figure:
        cm = self.confusion_matrix()
        side = max(4.0, 0.5 * len(self.classes) + 2)
        fig = Figure(figsize=(side, side))
        ax = fig.add_subplot()
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(self.classes)), self.classes, rotation=45, ha="right")
        ax.set_yticks(range(len(self.classes)), self.classes)
        ax.set(xlabel="predicted", ylabel="actual")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        fig.tight_layout()
        return fig

    def plot_top_losses(self, k: int = 8, cols: int = 4) -> Figure:
        from precompute.images import load_rgb

        table = self.top_losses(k)
        rows = max(1, -(-len(table) // cols))
        fig = Figure(figsize=(3 * cols, 3.2 * rows))
        for n, row in enumerate(table.itertuples()):
            ax = fig.add_subplot(rows, cols, n + 1)
            ax.imshow(load_rgb(row.path))
            ax.axis("off")
            title = (f"{row.actual} -> {row.predicted} ({row.probability:.2f})\nloss {row.loss:.2f}"
                     if hasattr(row, "actual") else f"loss {row.loss:.2f}")
            ax.set_title(title, fontsize=8)
        fig.tight_layout()
        return fig


# -- the Learner -------------------------------------------------------------------------------------

class Learner:
    """A pretrained body, a new head, the data and the activation cache, with fastai's verbs.

    Make one with ``Learner.pretrained``. State: the layer groups frozen (``freeze_to``), whether
    inputs come from the cache (``precompute``), the augmentation for image training
    (``aug_tfms``) and the current stage record (``record``).
    """

    def __init__(self, backbone: recipe.Backbone, manifest: pd.DataFrame, store: ActivationStore,
                 transform: TransformSpec, head_config: dict, *, bs: int = 64, seed: int = 0, device: str = "cpu",
                 num_workers: int = 0, pooled: bool = True, dtype: str = "float32", verbose: bool = True):
        if bs < 2:
            raise ConfigError(f"bs={bs}: BatchNorm needs batches of 2 or more")
        self.backbone, self.manifest, self.store, self.transform = backbone, manifest, store, transform
        self.head_config = head_config
        self.bs, self.seed, self.device, self.num_workers = bs, seed, device, num_workers
        self.pooled, self.dtype, self.verbose = pooled, dtype, verbose
        self.task = Task.from_manifest(manifest)  # one class or several labels per image: loss, decoding, metrics
        self.classes: list[str] = list(self.task.classes)
        if len(self.classes) < 2 and not self.task.multilabel:
            raise ConfigError(f"{len(self.classes)} class(es) among the usable images: a classifier needs 2 or more")
        self._in_channels = body_output_shape(backbone.body, transform.size)[0]
        head = recipe._new_head(backbone, transform, len(self.classes), head_config, seed)
        self._groups = layer_groups(backbone.body, head, backbone.spec, backbone.xtra_cut)  # for summary()
        # Before any fit the record is the pretrained body with a new head, so every stage continues one.
        self.record: StageRecord = recipe._stage_record("pretrained", backbone.spec, backbone.xtra_cut, self.task,
                                                        head_config, transform, backbone.weights_id,
                                                        nn.Sequential(backbone.body, head), [], None, self._groups,
                                                        seed=seed)
        self.history: list[dict] = []  # every epoch of every fit, with its stage
        self.precompute_stats = None  # recipe.precompute's PrecomputeStats, once the cache was filled
        self.view_key: str | None = None
        self._entry: Entry | None = None
        self._frozen = self.n_groups - 1  # fastai: a new Learner trains the head only
        self._precompute = False
        self._aug: dict | None = None
        self._fits = 0
        # optimizer (AdamW, or SGD with momentum), weight decay, label smoothing, early stopping: every fit
        self.fit_options = FitOptions()

    @classmethod
    def pretrained(cls, arch: str, data: str | os.PathLike | pd.DataFrame, precompute: bool = True,
                   size: int | None = None, store: str | ActivationStore | None = None, xtra_cut: int = 0,
                   ps: float | Sequence[float] | None = None, xtra_fc: Sequence[int] | None = None,
                   custom_head: str | None = None, bs: int = 64, seed: int = 0, weights: str = "pretrained",
                   weights_path: str | None = None, device: str = "cpu", aug_tfms: AugTfms = None,
                   label_delim: str | None = None, pooled: bool = True, dtype: str = "float32",
                   num_workers: int = 0, verbose: bool = True) -> "Learner":
        """fastai's ``ConvLearner.pretrained(arch, data, precompute=True)``.

        ``data``: an image folder (``train/<class>/*``, ``valid/<class>/*``), a CSV of
        ``path,label[,split]`` (``label_delim`` for several tags per image), or a manifest from
        ``precompute.manifest.build_manifest``. ``size``: image side (default: the arch's). ``store``:
        a path, an fsspec URL or an ``ActivationStore``; default ``default_store()``.
        ``xtra_cut``, ``ps``, ``xtra_fc`` (default ``[512]``), ``custom_head``: as fastai's.
        ``weights='random'`` skips the pretrained weights; ``weights_path`` names a file.
        ``device``: "cpu", "cuda" or "auto". With ``precompute=True`` (the default) the
        activations of every image are computed now, or read back where the store has them.
        """
        aug = augmentation_args(aug_tfms)
        if precompute and aug is not None:  # before any work: nothing loaded, nothing written
            raise _aug_precompute_error(aug)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        manifest = data if isinstance(data, pd.DataFrame) else build_manifest(data, label_delim=label_delim)
        missing = {"image_id", "path", "label", "split", "status"} - set(manifest.columns)
        if missing:
            raise ConfigError(f"data is a DataFrame without the manifest columns {sorted(missing)}: "
                              "pass a folder, a CSV, or precompute.manifest.build_manifest(...)")
        if not isinstance(store, ActivationStore):
            store = ActivationStore(str(store) if store is not None else default_store())
        head_config = HeadConfig(ps, [512] if xtra_fc is None else [int(n) for n in xtra_fc], custom_head).as_dict()
        bb = recipe.load_backbone(arch, xtra_cut, weights, weights_path)
        learn = cls(bb, manifest, store, recipe.transform_for(bb.spec, size), head_config, bs=bs, seed=seed,
                    device=device, num_workers=num_workers, pooled=pooled, dtype=dtype, verbose=verbose)
        learn.precompute = precompute
        learn.aug_tfms = aug
        return learn

    # -- what trains, and on what -------------------------------------------------------------------

    @property
    def n_groups(self) -> int:
        return len(self._groups)

    @property
    def multilabel(self) -> bool:
        return self.task.multilabel

    @property
    def frozen(self) -> int:
        """How many layer groups, from the first, are frozen."""
        return self._frozen

    @property
    def data(self) -> pd.DataFrame:
        """The manifest (fastai's ``learn.data``): one row per image with its split, label and status."""
        return self.manifest

    @property
    def precompute(self) -> bool:
        """True: the head trains on cached activations and the body never runs. False: the network
        runs on images (augmented per ``aug_tfms``). True needs a frozen, untrained body."""
        return self._precompute

    @precompute.setter
    def precompute(self, on: bool) -> None:
        on = bool(on)
        if on and not self._precompute:
            if self._aug is not None:
                raise _aug_precompute_error(self._aug)
            if self._frozen < self.n_groups - 1:
                raise ConfigError(f"precompute=True with layer groups {self._frozen}..{self.n_groups - 1} training: "
                                  "the cache holds the frozen body's activations. Call learn.freeze() first "
                                  "(only the head trains), or keep precompute=False")
            if not self._body_is_pretrained():
                raise ConfigError("precompute=True after the body was trained on images: the cache holds the "
                                  "pretrained body's activations, not this body's. Keep precompute=False, or "
                                  "start a new Learner.pretrained(...) to train a head on the cache")
            self._cache()
        self._precompute = on

    @property
    def aug_tfms(self) -> dict | None:
        """Augmentation for training on images: a preset name (side_on, top_down, basic), a dict of
        ``train_transform`` arguments (e.g. ``{"preset": "side_on", "max_zoom": 1.2}``), or None.
        Setting it while ``precompute`` is True is an error: augmentation cannot reach the cache."""
        return self._aug

    @aug_tfms.setter
    def aug_tfms(self, value: AugTfms) -> None:
        aug = augmentation_args(value)
        if aug is not None and self._precompute:
            raise _aug_precompute_error(aug)
        self._aug = aug

    def freeze_to(self, n: int) -> None:
        """Freeze layer groups ``[:n]``, train ``[n:]`` (negative n counts from the end, as fastai).

        Training a body group changes its activations, so the cache cannot serve them: below the
        head, precompute goes off, and this says so.
        """
        if not -self.n_groups <= n <= self.n_groups:
            raise ConfigError(f"freeze_to({n}) out of range for {self.n_groups} layer groups: "
                              f"valid is {-self.n_groups}..{self.n_groups}")
        frozen = n + self.n_groups if n < 0 else n
        self._frozen = frozen
        if frozen < self.n_groups - 1 and self._precompute:
            self._precompute = False
            log.warning("layer groups %d..%d now train, body groups among them: their activations change as they "
                        "train, so the cache cannot serve them. precompute is now False: training runs the whole "
                        "network on images (set learn.aug_tfms to augment them)", frozen, self.n_groups - 1)

    def freeze(self) -> None:
        """Only the head trains (fastai's ``freeze``); precompute stays as it is."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Every layer group trains; precompute goes off (see ``freeze_to``)."""
        self.freeze_to(0)

    def lrs_for(self, lr: LearningRates) -> list[float]:
        """One rate per layer group (frozen groups 0), fastai's forms:

        - a number: every trainable group at that rate;
        - a list (or array): one rate per group, earliest first;
        - ``slice(lo, hi)``: geometric from lo (earliest trainable group) to hi (the head);
          ``slice(hi)``: hi/10 for the earlier trainable groups, hi for the head (fastai v1).
        """
        if isinstance(lr, slice) and lr.start is None:
            hi, trainable = float(lr.stop), self.n_groups - self._frozen
            return [0.0] * self._frozen + [hi / 10] * (trainable - 1) + [hi]
        if isinstance(lr, np.ndarray):
            lr = lr.tolist()
        return group_lrs(lr, self.n_groups, frozen=self._frozen)

    # -- training ---------------------------------------------------------------------------------------

    def fit(self, lr: LearningRates, n_cycle: int, cycle_len: int | None = None, cycle_mult: int = 1) -> None:
        """fastai 0.7's ``fit``: without ``cycle_len``, ``n_cycle`` epochs at a constant rate;
        with it, SGDR: ``n_cycle`` cosine cycles, the first ``cycle_len`` epochs long and each next
        ``cycle_mult`` times longer (fit(lr, 3, cycle_len=1, cycle_mult=2) runs 1+2+4 epochs)."""
        if cycle_len is None:
            if cycle_mult != 1:
                raise ConfigError("cycle_mult needs cycle_len (the first cycle's length in epochs)")
            schedule = Schedule("constant", epochs=n_cycle)
        else:
            schedule = Schedule("sgdr", cycles=n_cycle, cycle_len=cycle_len, cycle_mult=cycle_mult)
        self._fit(lr, schedule)

    def fit_one_cycle(self, epochs: int, lr: LearningRates = 3e-3, pct_start: float = 0.25) -> None:
        """fastai v1's one-cycle policy (torch's OneCycleLR), ``lr`` the peak rate."""
        self._fit(lr, Schedule("one_cycle", epochs=epochs, pct_start=pct_start))

    def _fit(self, lr: LearningRates, schedule: Schedule) -> None:
        lrs = self.lrs_for(lr)
        if not any(lrs):
            raise ConfigError(f"nothing trains: layer groups frozen {self._frozen} of {self.n_groups}, rates {lrs}; "
                              "call freeze_to(n) with a lower n, or give a rate above 0")
        seed = self.seed + self._fits  # each fit shuffles afresh; the same calls give the same results
        if self._precompute:
            stage = "head_on_cache"
            record = self._fit_on_cache(lrs[-1], schedule, seed)
        else:
            body_trains = self._frozen < self.n_groups - 1
            stage = "finetuned" if body_trains else "head_augmented" if self._aug else "head_on_images"
            spec = recipe.ImageStage(stage, self._frozen, schedule, lrs, batch_size=self.bs,
                                     augment=self._aug is not None, augmentation=self._aug, seed=seed,
                                     options=self.fit_options)
            record = recipe.train_image_stage(self.record, self.manifest, spec, self.num_workers, self.device,
                                              self._on_epoch(stage))
        self.record = record
        self._fits += 1

    def _on_epoch(self, stage: str):
        def on_epoch(row: dict) -> None:
            self.history.append({"stage": stage, **{k: v for k, v in row.items() if k != "lr_steps"}})
            if self.verbose:
                if row["epoch"] == 0:
                    print(f"{stage}: {'epoch':>5} {'train_loss':>10} {'valid_loss':>10} {'accuracy':>9} {'time':>6}")
                print(f"{' ' * len(stage)}  {row['epoch']:>5} {row['train_loss']:>10.4f} {row['valid_loss']:>10.4f} "
                      f"{row['valid_accuracy']:>9.4f} {row['seconds']:>5.1f}s")
        return on_epoch

    def _fit_on_cache(self, lr: float, schedule: Schedule, seed: int) -> StageRecord:
        """The head (as the last stage left it) trained on cached rows; no image decoded, no body run."""
        entry = self._cache()
        train = recipe.cached_rows(entry, self.manifest, self.task, "train", recipe.DEFAULT_MEMORY_BUDGET)
        valid = recipe.cached_rows(entry, self.manifest, self.task, "valid", recipe.DEFAULT_MEMORY_BUDGET)
        head = self._head()
        history = fit_head_on_cache(head, train, valid, lr=lr, batch_size=self.bs, seed=seed, schedule=schedule,
                                    on_epoch=self._on_epoch("head_on_cache"), task=self.task,
                                    options=self.fit_options)
        bb = self.backbone
        groups = layer_groups(bb.body, head, bb.spec, bb.xtra_cut)
        freeze_groups(groups, self.n_groups - 1)
        record = recipe._stage_record("head_on_cache", bb.spec, bb.xtra_cut, self.task, self.head_config,
                                      self.transform, bb.weights_id, nn.Sequential(bb.body, head), history,
                                      [0.0] * (self.n_groups - 1) + [lr], groups, seed=seed,
                                      schedule=schedule, lr=lr, streamed=isinstance(train, StreamedRows),
                                      fit_options=self.fit_options)
        return recipe._tuned(record, head, valid.batches(512))

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                lr: LearningRates = 1.0) -> LRFinder:
        """fastai's lr_find on what ``fit`` would train now: the head on the cache (cheap), or the
        trainable groups on images. ``lr`` gives the groups' relative rates (a slice or list keeps
        its ratios). The model is left as it was."""
        ratios = self.lrs_for(lr)
        if self._precompute:
            train = recipe.cached_rows(self._cache(), self.manifest, self.task, "train",
                                       recipe.DEFAULT_MEMORY_BUDGET)
            head = self._head()
            result = lr_find(head, [head], [1.0], lambda gen: train.batches(self.bs, gen), start_lr, end_lr, num_it,
                             self.seed, task=self.task, freeze_bn_stats=False)
        else:
            _, model, groups = recipe.rebuild(self.record, self.transform.size)
            freeze_groups(groups, self._frozen)
            rows = recipe.labelled_split(self.manifest, self.task, "train")
            tf = train_transform(self.transform, **self._aug) if self._aug else eval_transform(self.transform)
            result = lr_find(model, groups, ratios,
                             lambda gen: recipe.image_loader(rows, tf, self.bs, True, gen, self.num_workers),
                             start_lr, end_lr, num_it, self.seed, self.device, self.task)
        return LRFinder(result["lrs"], result["losses"], result["suggestion"], result["min_loss_lr"])

    # -- evaluating and predicting ----------------------------------------------------------------------

    def _valid_probs(self) -> tuple[np.ndarray, np.ndarray]:
        if self._precompute:  # recipe.evaluate_on_cache without rebuilding the body it does not run
            x, y = recipe.cached_split(self._cache(), self.manifest, self.task, "valid")
            return predict_proba(self._head(), tensor_batches(x, y), task=self.task)
        probs, targets, _ = recipe.evaluate_on_images(self.record, self.manifest, self.num_workers, self.device)
        return probs, targets

    def validate(self) -> dict:
        """Loss and accuracy on the validation split (from the cache when ``precompute`` is on)."""
        probs, targets = self._valid_probs()
        return self.record.task.metrics(probs, targets)

    def tta(self, n_aug: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """fastai's ``TTA``: (probabilities, targets) on the validation images, each image's
        probabilities the mean over its center crop and ``n_aug`` augmented views (``aug_tfms``,
        else the last stage's augmentation, else the default flips/rotation/zoom). Always on images."""
        augmentation = self._aug or self.record.augmentation or None
        probs, targets, tta_probs = recipe.evaluate_on_images(self.record, self.manifest, self.num_workers,
                                                              self.device, n_aug, augmentation)
        return (tta_probs if tta_probs is not None else probs), targets

    TTA = tta

    def predict(self, paths: Sequence[str | os.PathLike], tta: int = 0) -> np.ndarray:
        """Probabilities for image files, one row per path, columns in the order of ``classes``."""
        probs, tta_probs = recipe.predict_paths(self.record, [str(p) for p in paths], tta, self._aug,
                                                batch_size=self.bs, num_workers=self.num_workers, device=self.device)
        return tta_probs if tta_probs is not None else probs

    def interpret(self) -> Interpretation:
        """Confusion matrix, most confused pairs and top losses of the validation predictions."""
        probs, targets = self._valid_probs()
        rows = recipe.labelled_split(self.manifest, self.task, "valid")
        return Interpretation(probs, targets, list(self.classes), list(rows["path"]))

    # -- files ------------------------------------------------------------------------------------------

    def _record_file(self) -> dict:
        return self.record.to_dict(groups=False)  # as recipe.save_model writes it

    def export(self, path: str | os.PathLike) -> Path:
        """The current stage record as a model file: ``precompute predict --model PATH`` and
        ``precompute.predict.load_model`` read it (``torch.load(weights_only=True)``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self._record_file(), path)
        return path

    def save(self, path: str | os.PathLike) -> Path:
        """``export``'s file plus this Learner's settings (frozen groups, precompute, aug_tfms),
        so ``load`` continues where this left off."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({**self._record_file(), "learner": {"frozen": self._frozen, "precompute": self._precompute,
                                                        "aug_tfms": self._aug, "fits": self._fits}}, path)
        return path

    def load(self, path: str | os.PathLike) -> None:
        """A file of ``save`` (or ``export``) into this Learner: same arch, cut, classes and transform."""
        raw = torch.load(path, map_location="cpu", weights_only=True)
        settings = (raw.pop("learner", None) if isinstance(raw, dict) else None) or {}
        record = recipe.checked_record(raw, f"model file {path}")
        for name, theirs, mine in (("arch", record.arch, self.backbone.spec.name),
                                   ("xtra_cut", record.xtra_cut, self.backbone.xtra_cut),
                                   ("classes", record.classes, self.classes),
                                   ("transform", record.transform.key(), self.transform.key())):
            if theirs != mine:
                raise ConfigError(f"{path}: {name} is {theirs!r}, this Learner's is {mine!r}; "
                                  "load it into a Learner.pretrained(...) made with the same settings")
        self._precompute, self._aug = False, None
        self.record = record
        self._fits = int(settings.get("fits", 0))
        self.freeze_to(int(settings.get("frozen", self.n_groups - 1)))
        if settings.get("precompute"):
            self.precompute = True
        self.aug_tfms = settings.get("aug_tfms")

    # -- internals --------------------------------------------------------------------------------------

    def _cache(self) -> Entry:
        """The cache entry of this backbone, transform and data; missing rows are computed first."""
        if self._entry is None:
            t0 = time.perf_counter()
            if not self.store.check_reachable():  # read-only: ReadOnlyStore now, before the body runs, if rows lack
                key = recipe.activation_key(self.backbone, self.transform, self.pooled, self.dtype)
                recipe.repair_entry(self.store.entry(key), self.manifest, writable=False)
            self._entry, self.precompute_stats, self.view_key = recipe.precompute(
                self.manifest, self.store, self.backbone, self.transform, self.pooled, self.dtype,
                batch_size=self.bs, num_workers=self.num_workers, device=self.device)
            s = self.precompute_stats
            # images that failed (changed since the scan, broken): status "failed", left out as the pipeline does
            self.manifest = recipe.without_failed(self.manifest, s.failed)
            if self.verbose:
                print(f"precompute: {s.images} images, {s.computed} computed, {s.reused} read from the cache"
                      f"{f', {len(s.failed)} failed' if s.failed else ''} ({time.perf_counter() - t0:.1f}s)")
        return self._entry

    def _head(self) -> nn.Module:
        """A head module with the current record's head weights."""
        head = build_head(self._in_channels, len(self.classes), **self.head_config)
        head.load_state_dict({k[2:]: v for k, v in self.record.state_dict.items() if k.startswith("1.")})
        return head

    def _body_is_pretrained(self) -> bool:
        """The record's body equals the loaded pretrained body (whose activations the cache holds)."""
        body = self.backbone.body.state_dict()
        return all(torch.equal(v, body[k[2:]].cpu()) for k, v in self.record.state_dict.items()
                   if k.startswith("0."))

    # -- what a reader sees -----------------------------------------------------------------------------

    def summary(self) -> str:
        """Which layer groups train, at which rate last, and whether inputs come from the cache or images."""
        bb, n = self.backbone, self.n_groups
        n_train, n_valid = len(ok_rows(self.manifest, "train")), len(ok_rows(self.manifest, "valid"))
        kind = "multi-label tags" if self.multilabel else "classes"
        lines = [f"Learner: {bb.spec.name} (xtra_cut={bb.xtra_cut}, weights {bb.weights_id[:24]}), "
                 f"{self.transform.size} px, {len(self.classes)} {kind} ({', '.join(self.classes[:6])}"
                 f"{', ...' if len(self.classes) > 6 else ''}), {n_train} train / {n_valid} valid images"]
        if self._precompute:
            where = f"store {self.store.root}" + (f", entry {self._entry.rel}" if self._entry is not None else "")
            lines.append(f"inputs: cached activations: the body does not run, only the head trains ({where})")
        else:
            lines.append(f"inputs: images ({_describe_aug(self._aug)}): the whole network runs every batch")
        trains = list(range(self._frozen, n))
        lines.append(f"layer groups: {n}; {'group' if len(trains) == 1 else 'groups'} "
                     f"{', '.join(map(str, trains)) or 'none'} train, {self._frozen} frozen")
        last_lrs = [g["lr"] for g in self.record.groups] if self.record.groups else [None] * n
        described = describe_groups(self._groups)
        whats = [f"{g['layers'][0]} .. {g['layers'][-1]} ({len(g['layers'])} layers)" if len(g["layers"]) > 1
                 else g["layers"][0] for g in described]
        width = max(map(len, whats))
        for g, what, lr in zip(described, whats, last_lrs):
            name = "head" if g["index"] == n - 1 else "body"
            state = "trains" if g["index"] >= self._frozen else "frozen"
            lr_text = f" (last lr {lr:.2e})" if lr else ""
            lines.append(f"  {g['index']}  {name}  {what:<{width}}  {g['n_params']:>10,} params  {state}{lr_text}")
        history = self.record.history
        if not history:
            lines.append(f"stage: {self.record.stage} (a new head, not trained yet)")
        else:
            lines.append(f"stage: {self.record.stage}, epochs: {len(history)}, valid accuracy "
                         f"{history[-1]['valid_accuracy']:.4f}, loss {history[-1]['valid_loss']:.4f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython: the same text, not a one-line repr
        p.text(self.summary())
