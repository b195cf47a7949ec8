"""The Learner's predictions: ``get_preds``, ``validate``, ``tta``, ``predict``, ``interpret`` and
``show_batch`` (what the next fit on images sees)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from precompute.inference import predict_paths
from precompute.interpret import Interpretation
from precompute.rows import labelled_split, targets
from precompute.train import predict_proba, tensor_batches
from precompute.transforms import eval_transform, train_transform


class LearnerPredictions:
    """Predictions of ``precompute.learner.Learner``'s current network on its data or on files."""

    def get_preds(self, split: str = "valid") -> tuple[np.ndarray, np.ndarray]:
        """fastai's ``get_preds``: (probabilities, targets) of ``split``, rows in manifest order;
        from the cache when ``precompute`` is on, else from the images (center crop)."""
        rows = labelled_split(self.manifest, self.task, split)
        y = targets(rows, self.task)
        if self._precompute:  # the head alone on the cached rows: no body runs
            x = self._cache().read(list(rows["image_id"]))
            return predict_proba(self.model[1], tensor_batches(x, y), task=self.task)[0], y
        return self.predict(list(rows["path"])), y

    def validate(self) -> dict:
        """Loss and accuracy on the validation split (from the cache when ``precompute`` is on)."""
        return self.record.task.metrics(*self.get_preds("valid"))  # multi-label: the record's tuned thresholds

    def tta(self, n_aug: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """fastai's ``TTA``: (probabilities, targets) on the validation images, each image's
        probabilities the mean over its center crop and ``n_aug`` augmented views (``aug_tfms``,
        else the last stage's augmentation, else the default flips/rotation/zoom). Always on images."""
        rows = labelled_split(self.manifest, self.task, "valid")
        return self.predict(list(rows["path"]), n_aug), targets(rows, self.task)

    TTA = tta

    def predict(self, paths: Sequence[str | os.PathLike], tta: int = 0) -> np.ndarray:
        """Probabilities for image files, one row per path, columns in the order of ``classes``."""
        augmentation = self._aug or self.record.augmentation or None
        probs, tta_probs = predict_paths(self.record, [str(p) for p in paths], tta, augmentation,
                                         batch_size=self.bs, num_workers=self.num_workers, device=self.device)
        return tta_probs if tta_probs is not None else probs

    def interpret(self) -> Interpretation:
        """Confusion matrix, most confused pairs and top losses of the validation predictions."""
        probs, y = self.get_preds("valid")
        rows = labelled_split(self.manifest, self.task, "valid")
        return Interpretation(probs, y, list(self.classes), list(rows["path"]))

    def show_batch(self, n: int = 8, cols: int = 4):
        """``n`` training images as the next fit on images sees them (``aug_tfms`` applied,
        normalization undone), titled with their labels; a matplotlib Figure."""
        from matplotlib.figure import Figure

        from precompute.images import load_rgb

        rows = labelled_split(self.manifest, self.task, "train").sample(frac=1, random_state=self.seed).head(n)
        tf = train_transform(self.transform, **self._aug) if self._aug is not None else eval_transform(self.transform)
        torch.manual_seed(self.seed)
        m, s = np.asarray(self.transform.mean)[:, None, None], np.asarray(self.transform.std)[:, None, None]
        fig = Figure(figsize=(2.5 * cols, 2.7 * max(1, -(-len(rows) // cols))))
        for i, row in enumerate(rows.itertuples()):
            ax = fig.add_subplot(max(1, -(-len(rows) // cols)), cols, i + 1)
            ax.imshow(np.clip(tf(load_rgb(row.path)).numpy() * s + m, 0, 1).transpose(1, 2, 0))
            ax.set_title(str(row.label), fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        return fig
