"""Predict classes for a folder of new images with a trained model (a file or an MLflow run)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd
import torch

from precompute.inference import predict_paths
from precompute.manifest import scan_images
from precompute.records import StageRecord, checked_record

MODEL_ARTIFACT_DIR = "model"


def load_model(ref: str, tracking_uri: str | None = None) -> StageRecord:
    """A stage record from a ``.pt`` file, or from the ``model/`` artifact of an MLflow run id."""
    if os.path.isfile(ref):
        return checked_record(torch.load(ref, map_location="cpu", weights_only=True), f"model file {ref}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        files = [a.path for a in client.list_artifacts(ref, MODEL_ARTIFACT_DIR) if a.path.endswith(".pt")]
    except Exception as exc:  # noqa: BLE001
        raise FileNotFoundError(f"{ref!r} is neither a model file nor an MLflow run id in {client.tracking_uri} "
                                f"({exc}); pass --model PATH.pt or the run id of a 'finetuned' run") from exc
    if not files:
        raise FileNotFoundError(f"MLflow run {ref} has no model/*.pt artifact: use the run of the 'finetuned' stage")
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(ref, files[0], tmp)
        return checked_record(torch.load(path, map_location="cpu", weights_only=True),
                              f"model {files[0]} of MLflow run {ref}")


def predict_folder(record: StageRecord, folder: str | Path, tta: int = 0, batch_size: int = 64, device="cpu") -> pd.DataFrame:
    """One row per file: path, status, reason, predicted class, and a probability per class.

    For a multi-label model ``predicted`` holds every label whose probability reaches its
    threshold (the record's, tuned on validation), joined by the training CSV's delimiter.
    """
    files = scan_images(folder)
    ok = files[files["status"] == "ok"]
    classes = record.classes
    out = files[["path", "status", "reason"]].copy()
    out["predicted"] = ""
    for c in classes:
        out[f"prob_{c}"] = float("nan")
    if len(ok):
        probs, tta_probs = predict_paths(record, list(ok["path"]), tta, record.augmentation,
                                         batch_size=batch_size, device=device)
        final = tta_probs if tta_probs is not None else probs
        out.loc[ok.index, "predicted"] = record.task.decode(final)
        for j, c in enumerate(classes):
            out.loc[ok.index, f"prob_{c}"] = final[:, j]
    return out
