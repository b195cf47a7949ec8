"""Dagster resources: everything that talks to the outside (images, the store, MLflow, the device)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import dagster as dg

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEMO_SOURCE = "demo:digits"


def project_home() -> Path:
    """Where the embedded stores live: $PRECOMPUTE_HOME, default <project>/var."""
    return Path(os.environ.get("PRECOMPUTE_HOME", PROJECT_DIR / "var")).resolve()


class ImageSource(dg.ConfigurableResource):
    """The images: a folder (train/<class>/*, valid/<class>/*) or a CSV of path,label[,split].

    Set PRECOMPUTE_DATA to point the pipeline at your own images; the default writes
    scikit-learn's digits as an image folder under the project home. For a multi-label CSV
    (several tags per image in the label column) set PRECOMPUTE_LABEL_DELIM to the character
    between the tags (" " for fastai's planet CSV): the heads then use sigmoid outputs.
    """

    source: str = DEMO_SOURCE
    root: Optional[str] = None  # for a CSV: folder its paths are relative to (default: the CSV's)
    label_delim: Optional[str] = None  # multi-label CSV: the character between an image's tags

    def resolve(self) -> Path:
        if self.source == DEMO_SOURCE:
            from precompute.demo_data import write_digits_folder

            return write_digits_folder(project_home() / "data" / "digits")
        return Path(self.source).expanduser()

    def manifest(self):
        from precompute.data import build_manifest

        return build_manifest(self.resolve(), root=self.root, label_delim=self.label_delim or None)


class ActivationStoreResource(dg.ConfigurableResource):
    """The activation cache: a local path or an fsspec URL (s3://bucket/prefix) shared by a team."""

    root: str
    storage_options_json: str = "{}"  # e.g. {"endpoint_url": "http://127.0.0.1:9000"} for S3
    compressor: str = ""  # "" = precompute.store.DEFAULT_COMPRESSOR ("auto"); or one of store.COMPRESSORS

    def get(self):
        from precompute.store import DEFAULT_COMPRESSOR, ActivationStore

        return ActivationStore(self.root, json.loads(self.storage_options_json), self.compressor or DEFAULT_COMPRESSOR)


class MlflowTracking(dg.ConfigurableResource):
    tracking_uri: str
    experiment: str = "precompute-pipeline"
    artifact_root: Optional[str] = None

    def tracker(self):
        from precompute.tracking import Tracker

        return Tracker(self.tracking_uri, self.experiment, self.artifact_root)


class ComputeDevice(dg.ConfigurableResource):
    """Where tensors run: "auto" picks the first CUDA device when there is one, else the CPU."""

    device: str = "auto"
    num_threads: int = 0   # 0: leave torch's default
    num_workers: int = 0   # DataLoader decode workers

    def setup(self) -> str:
        import torch

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def default_resources() -> dict:
    """The embedded defaults: no server, everything under the project home; env vars override."""
    from precompute.tracking import default_tracking_uri

    home = project_home()
    return {
        "images": ImageSource(source=os.environ.get("PRECOMPUTE_DATA", DEMO_SOURCE),
                              root=os.environ.get("PRECOMPUTE_DATA_ROOT"),
                              label_delim=os.environ.get("PRECOMPUTE_LABEL_DELIM") or None),
        "store": ActivationStoreResource(root=os.environ.get("PRECOMPUTE_STORE", str(home / "activations")),
                                         storage_options_json=os.environ.get("PRECOMPUTE_STORE_OPTIONS", "{}"),
                                         compressor=os.environ.get("PRECOMPUTE_STORE_COMPRESSOR", "")),
        "tracking": MlflowTracking(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", default_tracking_uri(home)),
                                   artifact_root=os.environ.get("PRECOMPUTE_ARTIFACTS", str(home / "mlartifacts"))),
        "compute": ComputeDevice(device=os.environ.get("PRECOMPUTE_DEVICE", "auto"),
                                 num_workers=int(os.environ.get("PRECOMPUTE_WORKERS", "0"))),
    }
