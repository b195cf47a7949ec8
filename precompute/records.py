"""What one stage hands the next: typed, and a plain dict on disk.

``StageRecord`` is a trained stage: the network's state dict and everything needed to rebuild it
(arch, cut, head config, transform, task), with how it was trained. ``ActivationsRef`` points at
the activations a stage reads. Both pickle as they are (Dagster's IO manager) and go to files as
``to_dict()`` (tensors, lists, numbers and strings only), which ``torch.load(weights_only=True)``
reads back; ``from_dict`` also reads the flat dicts written before these classes existed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, fields

import torch

from precompute.backbone import Backbone, load_backbone
from precompute.callbacks import EpochRow
from precompute.heads import HeadConfig, UnknownHead, check_head_config
from precompute.store import CacheKey, Entry
from precompute.task import Task
from precompute.train import FitOptions, Schedule
from precompute.transforms import TransformSpec

# Keys a file needs to be a stage record at all (checked before anything is built from it).
REQUIRED_KEYS = ("arch", "classes", "head_config", "state_dict")


@dataclass(eq=False)  # compared by identity: the state dict's tensors have no single truth value
class StageRecord:
    """A trained (or new) network and how it came to be; ``state_dict`` keys are ``0.*`` for the
    body and ``1.*`` for the head (``nn.Sequential(body, head)``)."""

    stage: str
    arch: str
    xtra_cut: int
    task: Task
    head: HeadConfig
    transform: TransformSpec
    weights_id: str
    state_dict: dict
    history: list[EpochRow] = field(default_factory=list)  # one row per epoch, as train.fit returns it
    groups: list[dict] | None = None                    # archs.describe_groups, with each group's lr
    seed: int = 0
    schedule: Schedule | None = None
    lr: float | None = None                             # head_on_cache: the head's rate
    streamed: bool = False                              # head_on_cache: rows streamed from the store
    augment: bool = False
    augmentation: dict = field(default_factory=dict)    # train_transform's arguments
    freeze: int | None = None                           # layer groups [:freeze] stayed frozen
    freeze_bn_stats: bool | None = None
    train_bn: bool | None = None
    fit_options: FitOptions | None = None               # optimizer, weight decay, label smoothing, early stopping
    failed_images: tuple = ()                           # (image_id, path, reason): no rows, left out
    mlflow_run_id: str | None = None
    view_key: str | None = None                         # the cached rows' view the head learned from (its data)

    def __post_init__(self):
        if not isinstance(self.head, HeadConfig):
            raise TypeError(f"StageRecord.head is a precompute.heads.HeadConfig, got {type(self.head).__name__}: "
                            "StageRecord.from_dict reads the plain form")
        self.failed_images = tuple(tuple(f) for f in self.failed_images or ())

    def __setstate__(self, state: dict) -> None:
        """Migrates a pickle of the earlier layout (Dagster's IO manager keeps records pickled): its
        head was the plain ``head_config`` dict, now a checked ``HeadConfig``."""
        state = dict(state)
        if "head_config" in state:
            state["head"] = HeadConfig.from_dict(state.pop("head_config"))
        self.__dict__.update(state)

    @property
    def classes(self) -> list[str]:
        return list(self.task.classes)

    @property
    def thresholds(self) -> tuple[float, ...] | None:
        """Each label's decision threshold (multi-label), else None."""
        return getattr(self.task, "thresholds", None)

    @property
    def last_epoch(self) -> EpochRow | dict:
        return self.history[-1] if self.history else {}

    def to_dict(self, groups: bool = True) -> dict:
        """The record as plain data (``groups=False``: as model files hold it)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["head_config"] = d.pop("head").as_dict()  # the name files have always used: any version reads it
        d.update(task=self.task.to_dict(), classes=self.classes, transform=self.transform.key(),
                 schedule=None if self.schedule is None else self.schedule.as_dict(),
                 fit_options=None if self.fit_options is None else self.fit_options.as_dict(),
                 failed_images=[list(f) for f in self.failed_images])
        if not groups:
            del d["groups"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StageRecord":
        """A record from ``to_dict``, or from the flat dict of earlier versions (``multilabel``,
        ``label_delim`` and ``thresholds`` beside ``classes``; ``schedule`` a dict)."""
        task = Task.from_dict(d["task"] if d.get("task") else d)
        known = {f.name for f in fields(cls)} - {"task", "head", "transform", "schedule", "fit_options"}
        schedule, options = d.get("schedule"), d.get("fit_options")
        return cls(task=task, head=HeadConfig.from_dict(d["head_config"]), transform=TransformSpec(**d["transform"]),
                   schedule=Schedule(**schedule) if schedule else None,
                   fit_options=FitOptions(**options) if options else None,
                   **{k: v for k, v in d.items() if k in known and v is not None})


@dataclass(frozen=True)
class ActivationsRef:
    """What the activations stage hands on: where its entry is, the rows' view key, the body's
    weights, and the images that failed at precompute (no rows: later stages leave them out)."""
    store: str
    entry: str
    key: CacheKey                          # the entry's key (its arch, weights, cut and transform)
    view_key: str
    weights: str = "pretrained"
    weights_path: str | None = None
    failed_images: tuple = field(default_factory=tuple)  # (image_id, path, reason) per failed image

    def __post_init__(self):
        if not isinstance(self.key, CacheKey):
            raise TypeError(f"ActivationsRef.key is a CacheKey, got {type(self.key).__name__}: "
                            "ActivationsRef.from_dict reads the plain form")
        object.__setattr__(self, "failed_images", tuple(tuple(f) for f in self.failed_images or ()))

    def __setstate__(self, state: dict) -> None:
        """Migrates a pickle of the earlier layout (Dagster's IO manager keeps refs pickled): its key
        was the dict of the key's parts, now the ``CacheKey`` itself (the same entry, the same digest)."""
        state = dict(state)
        if isinstance(state.get("key"), dict):
            state["key"] = CacheKey.from_parts(state["key"])
        self.__dict__.update(state)

    @classmethod
    def of(cls, entry: Entry, view: str, weights: str = "pretrained", weights_path: str | None = None,
           failed=()) -> "ActivationsRef":
        return cls(store=entry.store.root, entry=entry.rel, key=entry.key, view_key=view,
                   weights=weights, weights_path=weights_path, failed_images=failed)

    def to_dict(self) -> dict:
        return {"store": self.store, "entry": self.entry, "key": self.key.parts(), "view_key": self.view_key,
                "weights": self.weights, "weights_path": self.weights_path,
                "failed_images": [list(f) for f in self.failed_images]}

    @classmethod
    def from_dict(cls, d: dict) -> "ActivationsRef":
        return cls(store=d["store"], entry=d["entry"], key=CacheKey.from_parts(d["key"]), view_key=d["view_key"],
                   weights=d.get("weights", "pretrained"), weights_path=d.get("weights_path"),
                   failed_images=d.get("failed_images") or ())

    def backbone(self) -> Backbone:
        """The frozen body the rows were computed with (its weights as configured then)."""
        return load_backbone(self.key.arch, self.key.xtra_cut, self.weights, self.weights_path)


def require_typed(value, cls: type, what: str):
    """``value`` itself when it is a ``cls``. A plain dict is what materializations stored before
    ``cls`` existed: refused with the one-time migration that rewrites them (``precompute.migrate``),
    never read silently."""
    if isinstance(value, cls):
        return value
    hint = (f": {what} was stored as a dict by an earlier version; run `python -m precompute.migrate "
            f"$DAGSTER_HOME/storage` once, or materialize it again") if isinstance(value, dict) else ""
    raise TypeError(f"{what} is a {type(value).__name__}, not a {cls.__name__}{hint}")


def checked_record(record, source: str) -> StageRecord:
    """A stage record read from a file or a shared cache is data: its head must be one the code
    registers or the operator allows (precompute.heads), checked before anything is built or imported.
    A dict (a file's content, this version's or an earlier one's) becomes a ``StageRecord``."""
    if isinstance(record, dict) and set(REQUIRED_KEYS) <= record.keys():
        head_config = record["head_config"]
    elif isinstance(record, StageRecord):
        head_config = record.head.as_dict()
    else:
        raise ValueError(f"{source} is not a stage record (a dict with arch, classes, head_config, state_dict): "
                         "pass a model .pt saved by a training stage")
    try:
        check_head_config(head_config)
    except UnknownHead as e:
        raise UnknownHead(f"{source}: {e}") from None
    return record if isinstance(record, StageRecord) else StageRecord.from_dict(record)


def save_model(record: StageRecord, run_id: str, folder: str | None = None) -> str:
    """The stage record (state dict, arch, task, transform) as one file for predict/reload."""
    folder = folder or tempfile.mkdtemp(prefix=f"model-{run_id[:8]}-")
    path = os.path.join(folder, f"{record.stage}.pt")
    torch.save(record.to_dict(groups=False), path)
    return path
