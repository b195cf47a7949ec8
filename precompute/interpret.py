"""The model's validation predictions read as fastai's ``ClassificationInterpretation``:
confusion matrix, most confused pairs and top losses, as tables and figures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


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
                             "precompute.evaluate.per_class and precompute.metrics.multilabel_metrics")

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
