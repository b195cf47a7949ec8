"""What the model predicts: one class per image, or several labels per image.

A ``Task`` owns everything that differs between the two, as fastai v2's ``Categorize`` and
``MultiCategorize`` do: the target encoding, the loss, the output activation, the decoding of
probabilities into labels, the count of correct predictions and the metrics. It is made once from
the manifest (``Task.from_manifest``) and then travels in the stage record, so later stages never
ask the manifest again (pandas drops ``DataFrame.attrs`` in some operations).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from precompute.labels import class_names, label_delim, multi_hot, split_tags
from precompute.metrics import Evaluation, choose_thresholds, multilabel_metrics, multilabel_predictions, stage_metrics


@dataclass(frozen=True)
class Task:
    """Base of ``SingleLabel`` and ``MultiLabel``; ``classes`` in the order of the model's outputs."""

    classes: tuple[str, ...] = ()
    label_delim: str | None = None   # multi-label: the character between an image's tags
    kind = "base"
    multilabel = False

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))

    @staticmethod
    def from_manifest(manifest: pd.DataFrame, classes: Sequence[str] | None = None) -> "Task":
        """The manifest's task: multi-label when it was built with a ``label_delim``."""
        classes = class_names(manifest) if classes is None else classes
        delim = label_delim(manifest)
        return SingleLabel(classes) if delim is None else MultiLabel(classes, delim)

    # -- targets ------------------------------------------------------------------------------------

    def knows(self, label: str) -> bool:
        """Every class of ``label`` is one the model was trained on."""
        index = set(self.classes)
        return all(t in index for t in split_tags(label, self.label_delim))

    def encode(self, labels: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    # -- the network's outputs ----------------------------------------------------------------------

    def loss(self, label_smoothing: float = 0.0):
        raise NotImplementedError

    def activation(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def correct(self, out: torch.Tensor, y: torch.Tensor) -> float:
        """How many of the batch's images count as right (summed, so batches add up)."""
        raise NotImplementedError

    def predictions(self, probs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode(self, probs: np.ndarray) -> list[str]:
        """The predicted label of each row of ``probs``, spelled as the manifest spells labels."""
        raise NotImplementedError

    def metrics(self, probs: np.ndarray, targets: np.ndarray) -> Evaluation:
        raise NotImplementedError

    def tuned(self, probs: np.ndarray, targets: np.ndarray) -> "Task":
        """The task with whatever it tunes on validation predictions (multi-label: thresholds)."""
        return self

    # -- files --------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"kind": self.kind, "classes": list(self.classes), "label_delim": self.label_delim,
                "thresholds": None}

    @staticmethod
    def from_dict(d: dict) -> "Task":
        kind = d.get("kind") or ("multi_label" if d.get("label_delim") or d.get("multilabel") else "single_label")
        if kind == "single_label":
            return SingleLabel(d["classes"])
        if kind == "multi_label":
            return MultiLabel(d["classes"], d.get("label_delim") or " ", d.get("thresholds"))
        raise ValueError(f"task kind {kind!r}: expected single_label or multi_label")


@dataclass(frozen=True)
class SingleLabel(Task):
    """One class per image: softmax, cross-entropy (optionally label-smoothed), argmax."""

    kind = "single_label"

    def encode(self, labels: Sequence[str]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.asarray([index[label] for label in labels], dtype=np.int64)

    def loss(self, label_smoothing: float = 0.0):
        return lambda out, y: nn.functional.cross_entropy(out, y.long(), label_smoothing=label_smoothing)

    def activation(self, out: torch.Tensor) -> torch.Tensor:
        return torch.softmax(out, 1)

    def correct(self, out: torch.Tensor, y: torch.Tensor) -> float:
        return (out.argmax(1) == y).sum().item()

    def predictions(self, probs: np.ndarray) -> np.ndarray:
        return probs.argmax(1)

    def decode(self, probs: np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.predictions(probs)]

    def metrics(self, probs: np.ndarray, targets: np.ndarray) -> Evaluation:
        return stage_metrics(probs, targets, len(self.classes))


@dataclass(frozen=True)
class MultiLabel(Task):
    """Several labels per image: one sigmoid per label, binary cross-entropy, and a threshold per
    label (0.5 until ``tuned``: the best F1 on validation)."""

    label_delim: str | None = " "
    thresholds: tuple[float, ...] | None = field(default=None)
    kind = "multi_label"
    multilabel = True

    def __post_init__(self):
        super().__post_init__()
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))

    def encode(self, labels: Sequence[str]) -> np.ndarray:
        labels = list(labels)
        if not labels:
            return np.zeros((0, len(self.classes)), np.float32)
        return multi_hot(labels, self.classes, self.label_delim)

    def loss(self, label_smoothing: float = 0.0):
        # label smoothing is a softmax idea: BCE keeps its hard 0/1 targets
        return lambda out, y: nn.functional.binary_cross_entropy_with_logits(out, y.float())

    def activation(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)

    def correct(self, out: torch.Tensor, y: torch.Tensor) -> float:
        # per-label accuracy at 0.5 (logit 0), averaged over labels: fastai's accuracy_thresh while training
        return ((out > 0) == (y > 0.5)).float().mean(1).sum().item()

    def predictions(self, probs: np.ndarray) -> np.ndarray:
        return multilabel_predictions(probs, self.thresholds)

    def tags(self, probs: np.ndarray) -> list[list[str]]:
        return [[c for c, on in zip(self.classes, row) if on] for row in self.predictions(probs)]

    def decode(self, probs: np.ndarray) -> list[str]:
        return [self.label_delim.join(t) for t in self.tags(probs)]

    def metrics(self, probs: np.ndarray, targets: np.ndarray) -> Evaluation:
        return multilabel_metrics(probs, targets, self.thresholds)

    def tuned(self, probs: np.ndarray, targets: np.ndarray) -> "MultiLabel":
        return replace(self, thresholds=choose_thresholds(probs, targets))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "thresholds": None if self.thresholds is None else list(self.thresholds)}
