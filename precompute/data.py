"""Compatibility: the names of the former ``precompute.data``, which is now four modules.

- ``precompute.manifest``    building and summarising manifests (``build_manifest``, ``STATUSES``, ``ok_rows``)
- ``precompute.labels``      classes and tags (``class_names``, ``label_delim``, ``multi_hot``)
- ``precompute.images``      decoding (``load_rgb``, ``to_rgb``, ``shape_problem``, ``ImageLoadError``)
- ``precompute.transforms``  ``TransformSpec``, ``eval_transform``, ``train_transform`` and ``ImageDataset``

Import from those. This module re-exports every name ``precompute.data`` had, private ones
included, for code written against it; patch a function in the module that defines it.
"""

from __future__ import annotations

from precompute.images import MAX_ASPECT_RATIO, ImageLoadError, load_rgb, shape_problem, to_rgb
from precompute.labels import _canonical_tags, _tags_of, class_names, is_multilabel, label_delim, multi_hot, split_tags
from precompute.listing import _csv_entries, _folder_entries, _folder_row, _is_utf8, _read_csv, _under_root
from precompute.manifest import (_EXIF_ORIENTATION, _HASH_BLOCK, IMAGE_EXTENSIONS, MANIFEST_COLUMNS, STATUSES,
                                 ManifestError, _hash_split, _inspect, _is_image_name, _is_inside, _local_entries,
                                 _mark_conflicting_labels, _mark_unknown_labels, _mark_unseen_classes, _printable,
                                 _sha256, build_manifest, log, manifest_summary, ok_rows, scan_images)
from precompute.transforms import (_INTERPOLATIONS, AUGMENTATION_PRESETS, ImageDataset, TransformSpec,
                                   _to_normalized_tensor, eval_transform, train_transform)

__all__ = [
    "AUGMENTATION_PRESETS", "IMAGE_EXTENSIONS", "MANIFEST_COLUMNS", "MAX_ASPECT_RATIO", "STATUSES", "ImageDataset",
    "ImageLoadError", "ManifestError", "TransformSpec", "build_manifest", "class_names", "eval_transform",
    "is_multilabel", "label_delim", "load_rgb", "manifest_summary", "multi_hot", "ok_rows", "scan_images",
    "shape_problem", "split_tags", "to_rgb", "train_transform",
]
