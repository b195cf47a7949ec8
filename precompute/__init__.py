"""precompute: transfer learning on cached activations of a pretrained CNN (fast.ai's precompute=True).

``from precompute import Learner`` is the public face (see precompute.learner); the modules below
it (archs, manifest, labels, images, transforms, store, train, stages, ...) are usable on their
own. The Learner is imported on first use, so ``import precompute.store`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from precompute.learner import Learner

__all__ = ["Learner"]


def __getattr__(name: str):
    if name == "Learner":
        from precompute.learner import Learner

        return Learner
    raise AttributeError(f"module 'precompute' has no attribute {name!r}")
