"""The checks before any work that touch the disk or the network: each failure is a ``ConfigError``
that says what to change, and ``validate_run`` reports every problem at once.

What a setting may be (choices, bounds, precompute x augmentation, rates per layer group) is decided
by its model in ``precompute.settings``, and the cut body (arch, cut, image size) by
``precompute.body_spec.BodySpec``; what is left here needs a file or an endpoint: the weights a run
would load, the activation store, the MLflow tracking URI and the image manifest. Nothing is created
(no store folder, no MLflow database, no run), no weight is loaded, and a probe of a remote endpoint
gives up after ``PROBE_TIMEOUT_S``. The probes of the store and of MLflow are ``precompute.probes``,
below the store in the layers (``ActivationStore.check_reachable`` and ``Tracker.check_reachable``
call them); they are re-exported here.

    from precompute.validate import validate_run
    validate_run(arch="resnet34", weights="pretrained", store="s3://bucket/acts",
                 storage_options={"endpoint_url": "http://minio:9000"}, tracking_uri="http://mlflow:5000")
"""

from __future__ import annotations

from precompute.archs import ARCHS
from precompute.errors import ConfigError
from precompute.probes import PROBE_TIMEOUT_S, check_store, check_tracking  # noqa: F401 - re-exported
from precompute.settings import all_checks
from precompute.stages.cache_fill import CacheSettings

__all__ = ["ConfigError", "PROBE_TIMEOUT_S", "validate_run", "check_weights", "check_store", "check_tracking",
           "check_manifest"]


def validate_run(*, arch: str | None = None, weights: str | None = None, weights_path: str | None = None,
                 store: str | None = None, storage_options: dict | str | None = None, tracking_uri: str | None = None,
                 manifest=None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Probe what is given (None: not probed); one ConfigError lists every problem found."""
    checks = []
    if arch in ARCHS and (weights is not None or weights_path is not None):
        checks.append(lambda: check_weights(arch, weights or "pretrained", weights_path))
    if manifest is not None:
        checks.append(lambda: check_manifest(manifest))
    if store is not None:  # the endpoints last: they may take up to timeout_s each
        checks.append(lambda: check_store(store, storage_options, timeout_s))
    if tracking_uri is not None:
        checks.append(lambda: check_tracking(tracking_uri, timeout_s))
    all_checks(*checks)


def check_weights(arch: str, weights: str = "pretrained", weights_path: str | None = None) -> None:
    """The weights a run would load exist (or may be downloaded); nothing is loaded or downloaded."""
    CacheSettings(weights=weights, weights_path=weights_path).check_weights(arch)


def check_manifest(manifest, train_split: str = "train", valid_split: str = "valid", require_valid: bool = True) -> None:
    """Enough usable images to train and to measure: 2+ classes with training images, 1+ validation image."""
    from precompute.manifest import ok_rows

    ok = ok_rows(manifest)
    train, valid = ok[ok["split"] == train_split], ok[ok["split"] == valid_split]
    skipped = {k: int(v) for k, v in manifest.loc[manifest["status"] != "ok", "status"].value_counts().items()}
    note = f" ({len(manifest) - len(ok)} rows not usable: {skipped}; their reasons are in the manifest)" if skipped else ""
    classes = sorted(train["label"].unique())
    if len(train) < 2 or len(classes) < 2:
        raise ConfigError(f"{len(train)} usable {train_split} images in {len(classes)} class(es) {classes}: training "
                          f"needs at least 2 classes with images; add images under {train_split}/<class>/{note}")
    if require_valid and valid.empty:
        raise ConfigError(f"no usable {valid_split} image, so accuracy cannot be measured: add images under "
                          f"{valid_split}/<class>/, or use a CSV without a split column (20% go to {valid_split}){note}")
