"""The metrics a ``Task`` computes on predictions: accuracy and loss, and for multi-label the
threshold per label and the planet competition's scores.

In the core layer, below the Task, with scikit-learn imported only when a metric needs it (so the
Task, and everything that imports it, loads without it). Plots and the report are ``evaluate``'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


@dataclass(frozen=True)
class Evaluation:
    """A model's score on labelled rows: accuracy and loss on ``n`` images; multi-label adds exact
    match, F1 (micro, macro) and F2 per image; ``with_tta`` adds the scores with test-time augmentation."""

    accuracy: float
    loss: float
    n: int
    exact_match: float | None = None
    f1_micro: float | None = None
    f1_macro: float | None = None
    f2_samples: float | None = None
    tta_accuracy: float | None = None
    tta_loss: float | None = None

    def with_tta(self, tta: "Evaluation") -> "Evaluation":
        return replace(self, tta_accuracy=tta.accuracy, tta_loss=tta.loss)

    def to_dict(self) -> dict[str, float]:
        """Plain numbers for the report, Dagster metadata and MLflow (what was not measured left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def stage_metrics(probs: np.ndarray, targets: np.ndarray, n_classes: int, thresholds=None) -> Evaluation:
    """accuracy, loss and n; multi-label targets (2-d multi-hot) get ``multilabel_metrics``."""
    if targets.ndim == 2:
        return multilabel_metrics(probs, targets, thresholds)
    from sklearn.metrics import accuracy_score, log_loss

    labels = list(range(n_classes))
    return Evaluation(accuracy=float(accuracy_score(targets, probs.argmax(1))),
                      loss=float(log_loss(targets, np.clip(probs, 1e-7, 1), labels=labels)), n=int(len(targets)))


def thresholds_or_half(thresholds, n: int) -> np.ndarray:
    """Each label's threshold; 0.5 for every label when none are tuned."""
    return np.full(n, 0.5) if thresholds is None else np.asarray(thresholds, dtype=float)


def choose_thresholds(probs: np.ndarray, targets: np.ndarray, grid: Sequence[float] = THRESHOLD_GRID) -> list[float]:
    """Per label, the threshold on ``grid`` with the best F1 on these (validation) rows; ties go
    to the one nearest 0.5, and a label without positives here keeps 0.5. fastai 0.7 tuned one
    threshold for all labels (planet's ``opt_th``); one per label suits labels of unequal frequency.
    Tuned on validation, so metrics on the same rows are optimistic: the report says so."""
    from sklearn.metrics import fbeta_score

    out = []
    for j in range(probs.shape[1]):
        y = targets[:, j] > 0.5
        if not y.any():
            out.append(0.5)
            continue
        scores = [(fbeta_score(y, probs[:, j] >= t, beta=1, zero_division=0), -abs(t - 0.5), float(t)) for t in grid]
        out.append(max(scores)[2])
    return out


def multilabel_metrics(probs: np.ndarray, targets: np.ndarray, thresholds=None) -> Evaluation:
    """accuracy = fastai's ``accuracy_thresh`` (share of correct label decisions); exact_match =
    every label of an image right; F1 micro/macro over labels; F2 averaged over images (the
    planet competition's score); loss = mean binary cross-entropy."""
    from sklearn.metrics import fbeta_score

    pred, y = multilabel_predictions(probs, thresholds), (targets > 0.5).astype(int)
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return Evaluation(accuracy=float((pred == y).mean()),
                      loss=float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()), n=int(len(y)),
                      exact_match=float((pred == y).all(1).mean()),
                      f1_micro=float(fbeta_score(y, pred, beta=1, average="micro", zero_division=0)),
                      f1_macro=float(fbeta_score(y, pred, beta=1, average="macro", zero_division=0)),
                      f2_samples=float(fbeta_score(y, pred, beta=2, average="samples", zero_division=0)))


def multilabel_predictions(probs: np.ndarray, thresholds=None) -> np.ndarray:
    """0/1 per image and label: the probability reaches the label's threshold (default 0.5)."""
    return (probs >= thresholds_or_half(thresholds, probs.shape[1])).astype(int)
