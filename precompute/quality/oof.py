"""Out-of-fold class probabilities from K linear heads on the cached vectors: ridge classifiers
solved in closed form in the dual (n x n kernel of the standardised vectors), one per stratified
fold (seeded), then a temperature fitted on the out-of-fold scores. Used for label issues
(``labels``) and the drift's domain classifier (``findings.drift``).
"""

from __future__ import annotations

import numpy as np

RIDGE = 3.0  # the heads' L2 penalty, relative to the kernel's unit diagonal


def standardised(x: np.ndarray) -> np.ndarray:
    z = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return ((z - z.mean(0)) / (z.std(0) + 1e-6)).astype(np.float64)


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(1, keepdims=True)


def oof_scores(z: np.ndarray, y: np.ndarray, n_classes: int, folds: int = 5, seed: int = 0,
               ridge: float = RIDGE) -> np.ndarray:
    """(n, n_classes) out-of-fold probabilities: each row predicted by a head that never saw it."""
    from sklearn.model_selection import StratifiedKFold

    kernel = z @ z.T / z.shape[1]
    onehot = np.eye(n_classes)[y]
    scores = np.zeros_like(onehot)
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(z, y):
        mean = onehot[tr].mean(0)
        alpha = np.linalg.solve(kernel[np.ix_(tr, tr)] + ridge * np.eye(len(tr)), onehot[tr] - mean)
        scores[te] = kernel[np.ix_(te, tr)] @ alpha + mean
    temps = np.geomspace(0.3, 100, 60)
    nll = [-np.log(_softmax(scores * t)[np.arange(len(y)), y] + 1e-12).mean() for t in temps]
    return _softmax(scores * temps[int(np.argmin(nll))])
