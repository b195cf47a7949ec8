"""The Learner: the one training engine, with fastai's verbs. A notebook and the Dagster stages run it.

    learn = Learner.pretrained("tf_efficientnet_lite0", "data/dogscats", precompute=True)
    learn.lr_find().plot()                   # valley, slide, minimum and steep suggestions
    learn.fit(3e-3, 3)                       # only the head trains, on cached activations
    learn.precompute = False                 # from here the body runs on images ...
    learn.aug_tfms = "side_on"               # ... so augmentation can apply
    learn.fit(3e-3, 3, cycle_len=1)
    learn.unfreeze()                         # every group trains (with precompute on, it would go off, and say so)
    learn.fit(slice(1e-5, 3e-4), 3, cycle_len=1, cycle_mult=2)  # lower rates for earlier groups
    learn.recorder.plot_loss(); probs, y = learn.tta()

``learn.model`` is the network (``nn.Sequential(body, head)``); after each fit ``learn.record``
is the ``StageRecord`` the next stage continues from and ``export`` writes. The pretrained body
that computes the cache stays as loaded: the first fit on images trains a copy.
``Learner.from_cache`` and ``Learner.from_record`` are what the pipeline's stages build.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from precompute.archs import ArchSpec, body_output_shape, describe_groups, get_arch, layer_groups
from precompute.archs import freeze_to as freeze_groups
from precompute.backbone import Backbone, load_backbone, transform_for, with_size
from precompute.body_spec import BodySpec
from precompute.inference import rebuild
from precompute.callbacks import Callback, EpochTable, ProgressBar, Recorder
from precompute.heads import HeadConfig
from precompute.learner_io import LearnerFiles
from precompute.learner_preds import LearnerPredictions
from precompute.learner_settings import (AugTfms, aug_precompute_error, augmentation_args, default_store,
                                         trained_body_error)
from precompute.manifest import build_manifest
from precompute.records import ActivationsRef, StageRecord, require_typed
from precompute.rows import (DEFAULT_MEMORY_BUDGET, cached_rows, failed_images, image_loader, labelled_split,
                             without_failed)
from precompute.settings import ActivationSettings, all_checks
from precompute.stages.cache_fill import activation_key, check_same_weights, open_entry, repair_entry
from precompute.stages.cache_fill import precompute as fill_entry
from precompute.store import ActivationStore, Entry
from precompute.task import Task
from precompute.train import (ConfigError, FitOptions, check_batch_size, LearningRates, Schedule, StreamedRows, fit, group_lrs,
                              predict_proba)
from precompute.transforms import TransformSpec, eval_transform, train_transform

log = logging.getLogger(__name__)


class Learner(LearnerPredictions, LearnerFiles):
    """A network (``model``: body and head), the data, the activation cache and fastai's verbs.

    State: the layer groups frozen (``freeze_to``), whether inputs come from the cache
    (``precompute``), the augmentation for image training (``aug_tfms``), the BatchNorm policy
    (``freeze_bn_stats``, ``train_bn``: the pipeline's image stages take the same settings), the
    precision (``to_bf16``/``to_fp16``), and the last stage record (``record``).
    """

    def __init__(self, spec: ArchSpec, xtra_cut: int, weights_id: str, model: nn.Sequential, manifest: pd.DataFrame,
                 transform: TransformSpec, head_config: HeadConfig, *, store: ActivationStore | None = None,
                 backbone: Backbone | None = None, record: StageRecord | None = None, bs: int = 64, seed: int = 0,
                 device: str = "cpu", num_workers: int = 0, pooled: bool = True, dtype: str = "float32",
                 verbose: bool = True):
        check_batch_size(bs)  # settings: the rule the pipeline's batch_size obeys
        self.spec, self.xtra_cut, self.weights_id, self.model = spec, xtra_cut, weights_id, model
        self.manifest, self.transform, self.head_config = manifest, transform, head_config
        self.store, self.backbone = store, backbone
        self.bs, self.seed, self.device, self.num_workers = bs, seed, device, num_workers
        self.pooled, self.dtype, self.verbose = pooled, dtype, verbose
        self.task = record.task if record is not None else Task.from_manifest(manifest)
        self.classes: list[str] = list(self.task.classes)
        if len(self.classes) < 2 and not self.task.multilabel:
            raise ConfigError(f"{len(self.classes)} class(es) among the usable images: a classifier needs 2 or more")
        self.history: list[dict] = []  # every epoch of every fit, with its stage
        self.recorder = Recorder()      # the last fit's batches: plot_loss, plot_lr
        self.precompute_stats = None    # the cache fill's PrecomputeStats, once this Learner filled it
        self.view_key: str | None = None
        self._entry: Entry | None = None
        self._frozen = self.n_groups - 1  # fastai: a new Learner trains the head only
        self._precompute, self._aug, self._fits = False, None, 0
        self.fit_options = FitOptions()  # optimizer, weight decay, label smoothing, early stopping: every fit
        self.freeze_bn_stats = True      # BatchNorm running statistics stay fixed (precompute.callbacks.BatchNormPolicy)
        self.train_bn = False            # BatchNorm scale/shift trainable in frozen groups (fastai v1)
        self.precision: str | None = None  # None: float32 on the CPU, bf16 on a GPU; to_bf16() / to_fp16()
        self.progress = verbose           # a progress bar inside each epoch
        self.memory_budget = DEFAULT_MEMORY_BUDGET  # cached rows up to this many bytes are read into memory, more stream
        self.record = record or self._make_record("pretrained", [], None)

    # -- making one ---------------------------------------------------------------------------------

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
            raise aug_precompute_error(aug)
        all_checks(lambda: BodySpec(arch, xtra_cut, size), lambda: ActivationSettings.checked(  # as the pipeline's
            size=size, pooled=pooled, dtype=dtype, weights=weights, weights_path=weights_path))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        manifest = data if isinstance(data, pd.DataFrame) else build_manifest(data, label_delim=label_delim)
        missing = {"image_id", "path", "label", "split", "status"} - set(manifest.columns)
        if missing:
            raise ConfigError(f"data is a DataFrame without the manifest columns {sorted(missing)}: "
                              "pass a folder, a CSV, or precompute.manifest.build_manifest(...)")
        if not isinstance(store, ActivationStore):
            store = ActivationStore(str(store) if store is not None else default_store())
        head_config = HeadConfig(ps, (512,) if xtra_fc is None else [int(n) for n in xtra_fc], custom_head)
        bb = load_backbone(arch, xtra_cut, weights, weights_path)
        learn = cls.from_backbone(bb, manifest, transform_for(bb.spec, size), head_config, store=store, bs=bs,
                                  seed=seed, device=device, num_workers=num_workers, pooled=pooled, dtype=dtype,
                                  verbose=verbose)
        learn.precompute = precompute
        learn.aug_tfms = aug
        return learn

    @classmethod
    def from_backbone(cls, bb: Backbone, manifest: pd.DataFrame, transform: TransformSpec, head_config: HeadConfig,
                      entry: Entry | None = None, **kw) -> "Learner":
        """A new head (seeded with ``seed``) on a pretrained body; precompute on with its rows' cache ``entry``."""
        n_classes = len(Task.from_manifest(manifest).classes)
        torch.manual_seed(kw.get("seed", 0))
        head = head_config.build(body_output_shape(bb.body, transform.size)[0], n_classes)
        learn = cls(bb.spec, bb.xtra_cut, bb.weights_id, nn.Sequential(bb.body, head), manifest, transform,
                    head_config, backbone=bb, **kw)
        if entry is not None:
            learn._entry, learn._precompute = entry, True
        return learn

    @classmethod
    def from_cache(cls, ref: ActivationsRef, manifest: pd.DataFrame, store: ActivationStore, head_config: HeadConfig,
                   **kw) -> "Learner":
        """A new head on the entry an activations result points at, precompute on (the rows are
        there: nothing is computed); images that failed at precompute are left out."""
        entry = open_entry(store, ref)
        bb = ref.backbone()
        check_same_weights(bb, entry)
        manifest = without_failed(manifest, ref.failed_images)  # no rows for them
        learn = cls.from_backbone(bb, manifest, ref.key.transform, head_config, entry, store=store,
                                  **{"verbose": False, **kw})
        learn.view_key = ref.view_key
        return learn

    @classmethod
    def from_record(cls, record: StageRecord, manifest: pd.DataFrame, **kw) -> "Learner":
        """The network of a stage record (no pretrained weights loaded), continuing from it on images."""
        record = require_typed(record, StageRecord, "the previous stage's record")
        manifest = without_failed(manifest, record.failed_images)  # the stages before left them out too
        _, model, _ = rebuild(record, record.transform.size)
        learn = cls(get_arch(record.arch), record.xtra_cut, record.weights_id, model, manifest, record.transform,
                    record.head, record=record, **{"verbose": False, **kw})
        learn.aug_tfms = record.augmentation or None
        return learn

    # -- what trains, and on what -------------------------------------------------------------------

    @property
    def groups(self) -> list[nn.Module]:
        return layer_groups(self.model[0], self.model[1], self.spec, self.xtra_cut)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

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
        runs on images (augmented per ``aug_tfms``). True needs the pretrained body, frozen."""
        return self._precompute

    @precompute.setter
    def precompute(self, on: bool) -> None:
        on = bool(on)
        if on and not self._precompute:
            if not self._body_is_pretrained():  # the real blocker first: nothing else can lift it
                raise trained_body_error(self.record.stage)
            if self._aug is not None:
                raise aug_precompute_error(self._aug)
            if self._frozen < self.n_groups - 1:
                raise ConfigError(f"precompute=True with layer groups {self._frozen}..{self.n_groups - 1} training: "
                                  "the cache holds the frozen body's activations. Call learn.freeze() first "
                                  "(only the head trains), or keep precompute=False")
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
            raise aug_precompute_error(aug)
        self._aug = aug

    def freeze_to(self, n: int) -> None:
        """Freeze layer groups ``[:n]``, train ``[n:]`` (negative n counts from the end, as fastai).
        Training a body group changes its activations, so the cache cannot serve them: below the
        head, precompute goes off, and this says so."""
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
        """One rate per layer group (frozen groups 0), fastai's forms: a number (every trainable
        group), a list or array (one per group, earliest first), ``slice(lo, hi)`` (geometric from
        the earliest trainable group to the head), ``slice(hi)`` (hi/10 below the head, fastai v1)."""
        if isinstance(lr, slice) and lr.start is None:
            hi, trainable = float(lr.stop), self.n_groups - self._frozen
            return [0.0] * self._frozen + [hi / 10] * (trainable - 1) + [hi]
        if isinstance(lr, np.ndarray):
            lr = lr.tolist()
        return group_lrs(lr, self.n_groups, frozen=self._frozen)

    def set_size(self, size: int) -> None:
        """Progressive resizing (fastai 0.7's ``set_data`` at a new ``sz``): the same weights on images
        of ``size`` px from the next fit on. The cache is keyed by the transform, so with precompute
        on this is another entry, filled (or read back) now."""
        self.transform = with_size(self.transform, size)
        self._entry, self.view_key = None, None
        if self._precompute:
            self._cache()

    def to_bf16(self) -> "Learner":
        """Train under bfloat16 autocast (also on the CPU); evaluation stays float32."""
        self.precision = "bf16"
        return self

    def to_fp16(self) -> "Learner":
        """Train under float16 autocast, with a gradient scaler on CUDA."""
        self.precision = "fp16"
        return self

    def to_fp32(self) -> "Learner":
        self.precision = None
        return self

    @property
    def entry(self) -> Entry:
        """The cache entry of the pretrained body, this transform and these images (filled first where rows lack)."""
        return self._cache()

    # -- training ---------------------------------------------------------------------------------------

    def fit(self, lr: LearningRates, n_cycle: int, cycle_len: int | None = None, cycle_mult: int = 1,
            cbs: Sequence[Callback] = ()) -> StageRecord:
        """fastai 0.7's ``fit``: without ``cycle_len``, ``n_cycle`` epochs at a constant rate;
        with it, SGDR: ``n_cycle`` cosine cycles, the first ``cycle_len`` epochs long and each next
        ``cycle_mult`` times longer (fit(lr, 3, cycle_len=1, cycle_mult=2) runs 1+2+4 epochs)."""
        if cycle_len is None:
            if cycle_mult != 1:
                raise ConfigError("cycle_mult needs cycle_len (the first cycle's length in epochs)")
            schedule = Schedule("constant", epochs=n_cycle)
        else:
            schedule = Schedule("sgdr", cycles=n_cycle, cycle_len=cycle_len, cycle_mult=cycle_mult)
        return self.fit_schedule(self._trainable_lrs(lr), schedule, cbs=cbs)

    def fit_one_cycle(self, epochs: int, lr: LearningRates = 3e-3, pct_start: float = 0.25,
                      cbs: Sequence[Callback] = ()) -> StageRecord:
        """fastai v1's one-cycle policy (torch's OneCycleLR), ``lr`` the peak rate."""
        return self.fit_schedule(self._trainable_lrs(lr), Schedule("one_cycle", epochs=epochs, pct_start=pct_start),
                                 cbs=cbs)

    def _trainable_lrs(self, lr: LearningRates) -> list[float]:
        lrs = self.lrs_for(lr)
        if not any(lrs):
            raise ConfigError(f"nothing trains: layer groups frozen {self._frozen} of {self.n_groups}, rates {lrs}; "
                              "call freeze_to(n) with a lower n, or give a rate above 0")
        return lrs

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1, lr_mult: float = 100,
                  pct_start: float = 0.3) -> StageRecord:
        """fastai v2's ``fine_tune``: ``freeze_epochs`` one-cycle epochs of the head alone at
        ``base_lr`` (on the cache when precompute is on), then every group for ``epochs`` at half
        that, spread from ``base_lr / 2 / lr_mult`` (earliest group) to ``base_lr / 2`` (the head)."""
        self.freeze()
        self.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)
        self.unfreeze()
        return self.fit_one_cycle(epochs, slice(base_lr / 2 / lr_mult, base_lr / 2), pct_start=pct_start)

    def fit_schedule(self, lrs: Sequence[float], schedule: Schedule, stage: str | None = None,
                     cbs: Sequence[Callback] = ()) -> StageRecord:
        """One fit with one rate per layer group: the head on the cache (precompute), else the
        trainable groups on images. Returns the new ``record``; ``stage`` names it. A rate of 0
        everywhere only measures (the pipeline's tests do)."""
        lrs = list(lrs)
        seed = self.seed + self._fits  # each fit shuffles afresh; the same calls give the same results
        if self._precompute:
            stage = stage or "head_on_cache"
            record = self._fit_on_cache(lrs[-1], schedule, seed, self._callbacks(stage, cbs))
        else:
            body_trains = self._frozen < self.n_groups - 1
            stage = stage or ("finetuned" if body_trains else "head_augmented" if self._aug is not None else "head_on_images")
            record = self._fit_on_images(lrs, schedule, seed, stage, self._callbacks(stage, cbs))
        self.record = record
        self._fits += 1
        return record

    def _callbacks(self, stage: str, extra: Sequence[Callback]) -> list[Callback]:
        self.recorder = Recorder()
        progress = [ProgressBar(stage)] if self.progress else []
        return [self.recorder, EpochTable(self.history, stage, self.verbose), *progress, *extra]

    def _fit_on_cache(self, lr: float, schedule: Schedule, seed: int, cbs: list[Callback]) -> StageRecord:
        """The head (as the last stage left it) trained on cached rows; no image decoded, no body run."""
        entry, head = self._cache(), self.model[1]
        train = cached_rows(entry, self.manifest, self.task, "train", self.memory_budget)
        valid = cached_rows(entry, self.manifest, self.task, "valid", self.memory_budget)
        if len(train) < 2:
            raise ConfigError(f"{len(train)} training rows: the head needs at least 2 training images")
        history = fit(head, [head], [lr], lambda gen: train.batches(self.bs, gen), lambda: valid.batches(512),
                      train.n_batches(self.bs), schedule, seed, task=self.task, freeze_bn_stats=False,
                      options=self.fit_options, callbacks=cbs, precision=self.precision)
        groups = self.groups
        freeze_groups(groups, len(groups) - 1)
        record = self._make_record("head_on_cache", history, [0.0] * (len(groups) - 1) + [lr], seed=seed,
                                   schedule=schedule, lr=lr, streamed=isinstance(train, StreamedRows))
        return self._tuned(record, head, valid.batches(512), "cpu")

    def _fit_on_images(self, lrs: list[float], schedule: Schedule, seed: int, stage: str,
                       cbs: list[Callback]) -> StageRecord:
        if self.backbone is not None and self.model[0] is self.backbone.body:
            self.model[0] = copy.deepcopy(self.backbone.body)  # the cache's body stays the pretrained one
        groups, freeze = self.groups, self._frozen
        freeze_groups(groups, freeze, train_bn=self.train_bn)
        if self.train_bn and 0 < freeze < len(groups):  # frozen groups' BN learns at the earliest trainable rate
            lrs = [lrs[freeze]] * freeze + lrs[freeze:]
        ts = self.transform
        train_tf = train_transform(ts, **self._aug) if self._aug is not None else eval_transform(ts)
        train_rows = labelled_split(self.manifest, self.task, "train")
        valid = image_loader(labelled_split(self.manifest, self.task, "valid"), eval_transform(ts), 64, False, 0,
                             self.num_workers)
        bs, nw = self.bs, self.num_workers
        history = fit(self.model, groups, lrs, lambda gen: image_loader(train_rows, train_tf, bs, True, gen, nw),
                      lambda: valid, -(-len(train_rows) // bs), schedule, seed, device=self.device, task=self.task,
                      freeze_bn_stats=self.freeze_bn_stats, options=self.fit_options, callbacks=cbs,
                      precision=self.precision)
        record = self._make_record(stage, history, lrs, seed=seed, schedule=schedule, augment=self._aug is not None,
                                   augmentation=self._aug or {}, freeze=freeze, freeze_bn_stats=self.freeze_bn_stats,
                                   train_bn=self.train_bn)
        return self._tuned(record, self.model, valid, self.device)

    def _make_record(self, stage: str, history: list[dict], lrs: list[float] | None, **extra) -> StageRecord:
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        if stage != "pretrained":
            extra = {"fit_options": self.fit_options, "failed_images": failed_images(self.manifest), **extra}
        return StageRecord(stage=stage, arch=self.spec.name, xtra_cut=self.xtra_cut, task=self.task,
                           head=self.head_config, transform=self.transform, weights_id=self.weights_id,
                           state_dict=state, history=history, groups=describe_groups(self.groups, lrs),
                           seed=extra.pop("seed", self.seed), **extra)

    @staticmethod
    def _tuned(record: StageRecord, model: nn.Module, valid_batches, device) -> StageRecord:
        """A multi-label record gets per-label thresholds, each the one with the best F1 on validation."""
        if record.task.multilabel:
            record.task = record.task.tuned(*predict_proba(model, valid_batches, device, record.task))
        return record

    # -- internals --------------------------------------------------------------------------------------

    def _cache(self) -> Entry:
        """The cache entry of the pretrained body, the transform and the data; missing rows are computed first."""
        if self._entry is None:
            if self.store is None:
                raise ConfigError("this Learner has no activation store: pass store= to train on the cache")
            if self.backbone is None:  # a Learner made from a record: the pretrained body, loaded once
                weights = "random" if self.weights_id == "random" else "pretrained"
                self.backbone = load_backbone(self.spec.name, self.xtra_cut, weights)
            t0 = time.perf_counter()
            if not self.store.check_reachable():  # read-only: ReadOnlyStore now, before the body runs, if rows lack
                key = activation_key(self.backbone, self.transform, self.pooled, self.dtype)
                repair_entry(self.store.entry(key), self.manifest, writable=False)
            self._entry, self.precompute_stats, self.view_key = fill_entry(
                self.manifest, self.store, self.backbone, self.transform, self.pooled, self.dtype,
                batch_size=self.bs, num_workers=self.num_workers, device=self.device)
            s = self.precompute_stats
            # images that failed (changed since the scan, broken): status "failed", left out as the pipeline does
            self.manifest = without_failed(self.manifest, s.failed)
            if self.verbose:
                print(f"precompute: {s.images} images, {s.computed} computed, {s.reused} read from the cache"
                      f"{f', {len(s.failed)} failed' if s.failed else ''} ({time.perf_counter() - t0:.1f}s)")
        return self._entry

    def _body_is_pretrained(self) -> bool:
        """The network's body is still the pretrained body (whose activations the cache holds)."""
        if self.backbone is None:  # made from a record: only these stages leave the body as loaded
            return self.record.stage in ("pretrained", "head_on_cache")
        if self.model[0] is self.backbone.body:
            return True
        theirs = self.backbone.body.state_dict()
        return all(torch.equal(v.cpu(), theirs[k].cpu()) for k, v in self.model[0].state_dict().items())
