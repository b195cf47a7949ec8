"""Labels: the classes of a manifest, single- or multi-label, and their targets.

A single-label manifest has one class per image: ``label`` is the class. A multi-label manifest
(``build_manifest(csv, label_delim=" ")``, fastai's planet-style CSV with several tags per image)
keeps one row per image; ``label`` holds its tags, sorted, without duplicates, joined by the
delimiter, and ``manifest.attrs["label_delim"]`` says how to split them. ``class_names`` is then
the set of tags and ``multi_hot`` the targets.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def class_names(manifest: pd.DataFrame) -> list[str]:
    """Sorted labels (tags, for a multi-label manifest) of usable rows; the index here is the class index."""
    usable = manifest.loc[manifest["status"] == "ok", "label"]  # ok_rows' labels; manifest.py imports this module
    return sorted(_tags_of(usable, label_delim(manifest)))


def label_delim(manifest: pd.DataFrame) -> str | None:
    """The tag delimiter of a multi-label manifest; None for one class per image."""
    return manifest.attrs.get("label_delim") or None


def is_multilabel(manifest: pd.DataFrame) -> bool:
    return label_delim(manifest) is not None


def split_tags(label: str, delim: str | None) -> list[str]:
    """An image's classes: its tags for a multi-label manifest, else the label itself."""
    if delim is None:
        return [label]
    return [t for t in (t.strip() for t in label.split(delim)) if t]


def multi_hot(labels, classes, delim: str) -> np.ndarray:
    """float32 (n, len(classes)) targets: 1 where an image has the tag. Tags not in ``classes`` are an error."""
    index = {c: i for i, c in enumerate(classes)}
    labels = list(labels)
    out = np.zeros((len(labels), len(index)), dtype=np.float32)
    for row, label in enumerate(labels):
        for tag in split_tags(label, delim):
            if tag not in index:
                raise ValueError(f"tag {tag!r} of {label!r} is not one of the classes {list(classes)}")
            out[row, index[tag]] = 1.0
    return out


def _tags_of(labels, delim: str | None) -> set[str]:
    if delim is None:  # one class per image: the labels themselves (no call per row at 100k rows)
        return set(labels)
    return {t for label in labels for t in split_tags(label, delim)}


def _canonical_tags(label: str, delim: str) -> str:
    """Tags sorted and without duplicates, so one tag set has one spelling (and one conflict check)."""
    return delim.join(sorted(set(split_tags(label, delim))))
