"""The Learner's verbs that leave its network as it was: ``lr_find``, ``get_preds``, ``validate``,
``tta``, ``predict``, ``interpret``, ``show_batch`` (what the next fit on images sees) and
``data_quality``."""

from __future__ import annotations

import copy
import os
from typing import Sequence

import numpy as np
import torch

from precompute.archs import freeze_to as freeze_groups
from precompute.archs import layer_groups
from precompute.inference import predict_paths
from precompute.interpret import Interpretation
from precompute.lr_find import LRFindResult, Suggest, lr_find
from precompute.metrics import Evaluation
from precompute.rows import cached_rows, image_loader, labelled_split, targets
from precompute.train import LearningRates, predict_proba, tensor_batches
from precompute.transforms import eval_transform, train_transform


class LearnerPredictions:
    """lr_find and the predictions of ``precompute.learner.Learner``'s current network."""

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100, lr: LearningRates = 1.0,
                suggest: Suggest = "valley") -> LRFindResult:
        """fastai's lr_find on what ``fit`` would train now: the head on the cache (cheap), or the
        trainable groups on images. ``lr`` gives the groups' relative rates (a slice or list keeps
        its ratios). The model is left as it was."""
        ratios = self.lrs_for(lr)
        if self._precompute:
            head = self.model[1]
            train = cached_rows(self._cache(), self.manifest, self.task, "train", self.memory_budget)
            return lr_find(head, [head], [1.0], lambda gen: train.batches(self.bs, gen), start_lr, end_lr, num_it,
                           self.seed, task=self.task, freeze_bn_stats=False, method=suggest, precision=self.precision,
                           steps_per_epoch=train.n_batches(self.bs))
        model = copy.deepcopy(self.model)  # the pretrained body the cache serves stays untouched
        groups = layer_groups(model[0], model[1], self.spec, self.xtra_cut)
        freeze_groups(groups, self._frozen)
        rows = labelled_split(self.manifest, self.task, "train")
        tf = train_transform(self.transform, **self._aug) if self._aug is not None else eval_transform(self.transform)
        bs, nw = self.bs, self.num_workers
        return lr_find(model, groups, ratios, lambda gen: image_loader(rows, tf, bs, True, gen, nw), start_lr, end_lr,
                       num_it, self.seed, self.device, self.task, freeze_bn_stats=self.freeze_bn_stats, method=suggest,
                       precision=self.precision, steps_per_epoch=-(-len(rows) // bs))

    def get_preds(self, split: str = "valid") -> tuple[np.ndarray, np.ndarray]:
        """fastai's ``get_preds``: (probabilities, targets) of ``split``, rows in manifest order;
        from the cache when ``precompute`` is on, else from the images (center crop)."""
        rows = labelled_split(self.manifest, self.task, split)
        y = targets(rows, self.task)
        if self._precompute:  # the head alone on the cached rows: no body runs
            x = self._cache().read(list(rows["image_id"]))
            return predict_proba(self.model[1], tensor_batches(x, y), task=self.task)[0], y
        return self.predict(list(rows["path"])), y

    def validate(self) -> Evaluation:
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

    def data_quality(self, options=None):
        """The data-quality report of this Learner's images (precompute.quality): near-duplicates,
        train/valid leaks, likely label errors and outliers, from the cached vectors (the body runs
        only for rows the cache lacks). ``options``: a ``precompute.quality.QualityOptions``."""
        from precompute.quality import data_quality_tables  # faiss and cleanlab: only when asked

        return data_quality_tables(self._cache(), self.manifest, options=options)
