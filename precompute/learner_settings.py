"""The Learner's settings that are checked before any work: where the cache lives, the
augmentation (``aug_tfms``) and the errors that name what to change."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from precompute.errors import ConfigError
from precompute.settings import AugmentationPreset, choices
from precompute.transforms import Augmentation, TransformSpec, train_transform

AugTfms = str | dict | None  # a preset name (side_on, top_down, basic), train_transform's arguments, or None
_AUG_ARGS = set(inspect.signature(train_transform).parameters) - {"ts"}


def default_store() -> str:
    """Where the cache lives when ``store`` is not given; the CLI (``precompute cache list``) and
    the Dagster resources use the same rule: ``$PRECOMPUTE_STORE``, else
    ``$PRECOMPUTE_HOME/activations``, else ``./var/activations`` (resolved when the Learner is made)."""
    if os.environ.get("PRECOMPUTE_STORE"):
        return os.environ["PRECOMPUTE_STORE"]
    return str(Path(os.environ.get("PRECOMPUTE_HOME", "var")).resolve() / "activations")


def augmentation_args(aug_tfms: AugTfms) -> dict | None:
    """``aug_tfms`` as ``train_transform``'s keyword arguments (None: no augmentation)."""
    if aug_tfms is None:
        return None
    if isinstance(aug_tfms, str):
        if aug_tfms not in choices(AugmentationPreset):  # the pipeline's augmentation setting has the same choices
            raise ConfigError(f"aug_tfms={aug_tfms!r}: choose a preset ({', '.join(choices(AugmentationPreset))}), "
                              "a dict of precompute.transforms.train_transform's arguments, or None")
        return {"preset": aug_tfms}
    if isinstance(aug_tfms, dict):
        unknown = set(aug_tfms) - _AUG_ARGS
        if unknown:
            raise ConfigError(f"aug_tfms has unknown keys {sorted(unknown)}: valid are {sorted(_AUG_ARGS)}")
        Augmentation(aug_tfms.get("preset"), aug_tfms.get("max_zoom"))  # settings.AugmentationSettings' rules
        train_transform(TransformSpec(), **aug_tfms)  # and the transform's own (a type that cannot build one)
        return dict(aug_tfms)
    raise ConfigError(f"aug_tfms={aug_tfms!r}: give a preset name, a dict, or None")


def describe_aug(aug: dict | None) -> str:
    if aug is None:
        return "no augmentation"
    return ", ".join(f"{k}={v}" for k, v in aug.items())


def aug_precompute_error(aug: dict) -> ConfigError:
    return ConfigError(
        f"aug_tfms ({describe_aug(aug)}) with precompute=True: the cache holds the activations of the "
        "un-augmented images, computed once, so augmentation cannot apply to them. Set learn.precompute = False "
        "first to train on freshly augmented images (the body then runs every batch), or leave aug_tfms=None "
        "to train on the cache.")


def trained_body_error(stage: str) -> ConfigError:
    """The one blocker after fine-tuning: freezing again or dropping aug_tfms cannot bring it back."""
    return ConfigError(
        f"precompute=True after the body was trained on images (stage {stage}): the cache holds the pretrained "
        "body's activations, not this body's, so no setting can make it serve this network (freeze() and "
        "aug_tfms=None would not help). Keep precompute=False, or start a new Learner.pretrained(...) to train "
        "a head on the cache")
