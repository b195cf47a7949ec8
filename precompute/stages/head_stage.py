"""The ``head_on_cache`` stage: a new head trained on the cached rows only (fastai's precompute=True),
reused when rows, config and seed are unchanged; and lr_find for such a head."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd
import torch

from precompute.backbone import Backbone
from precompute.callbacks import Callback, OnEpoch, TrackEpochs
from precompute.heads import HeadConfig
from precompute.learner import Learner
from precompute.lr_find import LRFindResult
from precompute.records import ActivationsRef, StageRecord, checked_record
from precompute.stages.common import LOG, OpenRun, log_stage, schedule_params
from precompute.stages.cache_fill import open_entry
from precompute.store import ActivationStore, Entry, ResultCache
from precompute.settings import HeadStageSettings
from precompute.train import EpochCallback, FitOptions, Schedule
from precompute.transforms import TransformSpec

HEAD_CODE_VERSION = "1"  # bump when training on the cache changes its result for the same inputs


def _head_learner(entry: Entry, manifest: pd.DataFrame, bb: Backbone, ts: TransformSpec, head_config: HeadConfig,
                  batch_size: int, seed: int, memory_budget: int | None) -> Learner:
    learn = Learner.from_backbone(bb, manifest, ts, head_config, entry, bs=batch_size, seed=seed, verbose=False)
    if memory_budget is not None:  # 0: every row streamed from the store
        learn.memory_budget = memory_budget
    return learn


def train_head_on_cache(entry: Entry, manifest: pd.DataFrame, bb: Backbone, ts: TransformSpec,
                        head_config: HeadConfig, epochs: int = 3, lr: float = 1e-3, batch_size: int = 64,
                        seed: int = 0, on_epoch: EpochCallback | None = None, memory_budget: int | None = None,
                        schedule: Schedule | None = None, options: FitOptions | None = None,
                        cbs: Sequence[Callback] = ()) -> StageRecord:
    """fastai's precompute=True: a new head trains on rows read back from the cache (a Learner's fit)."""
    learn = _head_learner(entry, manifest, bb, ts, head_config, batch_size, seed, memory_budget)
    learn.fit_options = options or FitOptions()
    cbs = [*cbs, *([OnEpoch(on_epoch)] if on_epoch else [])]
    return learn.fit_schedule(learn.lrs_for(lr), schedule or Schedule("one_cycle", epochs=epochs), cbs=cbs)


def lr_find_on_cache(entry: Entry, manifest: pd.DataFrame, bb: Backbone, ts: TransformSpec, head_config: HeadConfig,
                     batch_size: int = 64, seed: int = 0, num_it: int = 100,
                     memory_budget: int | None = None) -> LRFindResult:
    """lr_find for a new head on the cached activations (cheap: no body runs)."""
    return _head_learner(entry, manifest, bb, ts, head_config, batch_size, seed, memory_budget).lr_find(num_it=num_it)


def lr_find_on_ref(ref: ActivationsRef, manifest: pd.DataFrame, store: ActivationStore, head_config: HeadConfig,
                   batch_size: int = 64, seed: int = 0, num_it: int = 100) -> LRFindResult:
    """``lr_find_on_cache`` on the entry an activations result points at (images failed there left out)."""
    learn = Learner.from_cache(ref, manifest, store, head_config, bs=batch_size, seed=seed)
    result = learn.lr_find(num_it=num_it)
    result.head = head_config
    return result


def head_fingerprint(view: str, config: dict) -> str:
    """What determines a head trained on the cache: the rows it reads, its config and seed."""
    return hashlib.sha256(json.dumps({"view": view, "config": config, "code": HEAD_CODE_VERSION},
                                     sort_keys=True, default=str).encode()).hexdigest()[:24]


def save_head_result(entry: Entry, fingerprint: str, record: StageRecord) -> None:
    buf = io.BytesIO()
    torch.save(record.to_dict() if isinstance(record, StageRecord) else record, buf)
    ResultCache(entry).put(f"head-{fingerprint}.pt", buf.getvalue())  # best effort: a read-only store warns


def load_head_result(entry: Entry, fingerprint: str) -> StageRecord | None:
    blob = ResultCache(entry).get(f"head-{fingerprint}.pt")
    if blob is None:
        return None
    record = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    return checked_record(record, f"cached head result head-{fingerprint}.pt in {entry.rel}")


def head_on_cache_cached(entry: Entry, fingerprint: str, train: Callable[[], StageRecord],
                         reuse: bool = True) -> tuple[StageRecord, bool]:
    """The head for ``fingerprint`` (head_fingerprint: rows, config, seed): the one saved beside the
    entry when ``reuse`` and one is there, else ``train()``'s, saved for the next identical request.
    Returns (record, reused)."""
    record = load_head_result(entry, fingerprint) if reuse else None
    if record is not None:
        return record, True
    record = train()
    save_head_result(entry, fingerprint, record)
    return record, False


@dataclass(frozen=True)
class HeadStage:
    """The ``head_on_cache`` stage: a new head trained on the cached rows only (fastai's precompute=True)."""
    head: HeadConfig
    schedule: Schedule = Schedule("one_cycle", epochs=5)
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0
    precompute: bool = True
    augment: bool = False
    options: FitOptions = FitOptions()

    def __post_init__(self):
        HeadStageSettings.checked(precompute=self.precompute, augment=self.augment, batch_size=self.batch_size,
                                  lr=self.lr)  # settings.HeadStageSettings decides what is valid
        if not isinstance(self.head, HeadConfig):
            raise TypeError(f"HeadStage.head is a precompute.heads.HeadConfig, got {type(self.head).__name__}")


def train_head_stage(ref: ActivationsRef, manifest: pd.DataFrame, store: ActivationStore, stage: HeadStage,
                     open_run: OpenRun, params: dict, reuse: bool = True,
                     log=LOG) -> tuple[StageRecord, bool, str]:
    """``head_on_cache`` as the pipeline runs it. A head is a pure function of its rows, config and
    seed, so an identical request (same ``head_fingerprint`` of the view and ``params``) returns the
    earlier head instead of training again. Returns (record, reused, fingerprint)."""
    entry = open_entry(store, ref)
    fingerprint = head_fingerprint(ref.view_key, {**params, "lr": stage.lr})

    def train() -> StageRecord:
        learn = Learner.from_cache(ref, manifest, store, stage.head, bs=stage.batch_size, seed=stage.seed)
        learn.fit_options = stage.options
        logged = {**params, **stage.options.as_dict(), **schedule_params(stage.schedule), "lr": stage.lr,
                  "size": learn.transform.size, "epochs": stage.schedule.total_epochs, "entry_key": entry.key.digest(),
                  "view_key": ref.view_key, "pooled": entry.key.pooled, "fingerprint": fingerprint}
        with open_run(logged) as run:
            record = learn.fit_schedule(learn.lrs_for(stage.lr), stage.schedule,
                                        cbs=[TrackEpochs(run, "head_on_cache", log)])
            return log_stage(run, record)

    record, reused = head_on_cache_cached(entry, fingerprint, train, reuse=reuse)
    record.view_key = ref.view_key  # the stages after it log the same data (a head kept before this field lacked it)
    if reused:
        log.info(f"head_on_cache reused: same activations ({ref.view_key}), config and seed as MLflow run "
                 f"{record.mlflow_run_id}; nothing trained")
    return record, reused, fingerprint
