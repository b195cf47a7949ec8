"""Probes of the outside services a run needs: the activation store and MLflow.

Each answers within ``PROBE_TIMEOUT_S`` (a daemon thread gives up on a host that does not answer;
DNS look-ups ignore socket timeouts), creates nothing it leaves behind (no store folder, no MLflow
database, no run, no bucket) and fails with a ``ConfigError`` that says what to set. They sit at
the bottom of the library, importing no torch, so the store (``ActivationStore.check_reachable``),
the tracker (``Tracker.check_reachable``), ``precompute.validate`` and the Dagster assets call the
same probe.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

from precompute.errors import ConfigError

__all__ = ["PROBE_TIMEOUT_S", "check_store", "check_tracking"]

PROBE_TIMEOUT_S = 3.0
STORE_SETTING = "PRECOMPUTE_STORE"
STORE_OPTIONS_SETTING = "PRECOMPUTE_STORE_OPTIONS"
TRACKING_SETTING = "MLFLOW_TRACKING_URI"


def _bounded(fn: Callable[[], object], timeout_s: float):
    """fn() in a daemon thread, given up after timeout_s (DNS look-ups ignore socket timeouts)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="precompute-probe")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _probe_url(url: str, timeout_s: float) -> str | None:
    """None when something answers at url's host and port, else why not. Through a proxy where one
    applies (as MLflow and botocore would go), else a plain TCP connect."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host:
        return f"no host in {url!r}"
    default = {"https": 443, "http": 80}.get(parts.scheme, 80)
    try:
        port = parts.port or default
    except ValueError as e:
        return str(e)
    proxied = parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host)

    def connect():
        if proxied:
            try:
                urllib.request.urlopen(url, timeout=timeout_s).close()
            except urllib.error.HTTPError as e:
                if e.code in (502, 503, 504):  # the proxy answered for a server that did not
                    raise ConnectionError(f"HTTP {e.code} from the proxy") from None
        else:
            socket.create_connection((host, port), timeout=timeout_s).close()

    try:
        _bounded(connect, timeout_s)
    except (OSError, TimeoutError, urllib.error.URLError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
        return f"cannot connect to {host}:{port} ({reason})"
    return None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_location(path: Path, want: str, what: str, fix: str) -> None:
    """``path`` (a folder or a file, per ``want``) exists as that, or could be created: nothing is created."""
    path = path.expanduser().absolute()
    if path.exists():
        if want == "folder" and not path.is_dir():
            raise ConfigError(f"{what}: {path} is a file, not a folder; {fix}")
        if want == "file" and path.is_dir():
            raise ConfigError(f"{what}: {path} is a folder, not a file; {fix}")
        target = path if path.is_dir() else path.parent
    else:
        target = _nearest_existing(path.parent)
        if not target.is_dir():
            raise ConfigError(f"{what}: {path} cannot be created because {target} is a file, not a folder; {fix}")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: no permission to write in {target}; {fix}")


def _store_options(storage_options: dict | str | None) -> dict:
    if storage_options is None or storage_options == "":
        return {}
    if isinstance(storage_options, str):
        try:
            storage_options = json.loads(storage_options)
        except json.JSONDecodeError as e:
            raise ConfigError(f"store options are not valid JSON ({e}): set {STORE_OPTIONS_SETTING} to a JSON object, "
                              'e.g. {"endpoint_url": "http://127.0.0.1:9000"}') from None
    if not isinstance(storage_options, dict):
        raise ConfigError(f"store options must be a JSON object (a dict), got {storage_options!r}: fix {STORE_OPTIONS_SETTING}")
    return storage_options


def _store_endpoint(protocol: str, root: str, options: dict) -> str | None:
    """Where a store's requests go, for the protocols whose endpoint is known."""
    if protocol in ("s3", "s3a"):
        return (options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "https://s3.amazonaws.com")
    if protocol in ("gs", "gcs"):
        return options.get("endpoint_url") or "https://storage.googleapis.com"
    if protocol in ("http", "https"):
        return root
    return None


def check_store(root: str, storage_options: dict | str | None = None, timeout_s: float = PROBE_TIMEOUT_S,
                read_only_ok: bool = False) -> bool:
    """The activation store can be written: a local folder that exists or can be created, or a URL
    whose endpoint answers within ``timeout_s`` and takes a probe object. Nothing is left behind.

    With ``read_only_ok``, a store that exists and can be listed but not written passes too and
    False is returned (a read-only mount of a complete cache still serves reads and training)."""
    try:
        _check_store_writable(root, storage_options, timeout_s)
        return True
    except ConfigError:
        if not read_only_ok or not _store_listable(root, storage_options, timeout_s):
            raise
        return False


def _store_listable(root: str, storage_options, timeout_s: float) -> bool:
    import fsspec

    try:
        fs, base = fsspec.core.url_to_fs(str(root), **_store_options(storage_options))
        _bounded(lambda: fs.ls(base), max(10.0, 3 * timeout_s))
        return True
    except Exception:  # noqa: BLE001 - cannot be listed: not a read-only store but a missing or broken one
        return False


def _check_store_writable(root: str, storage_options, timeout_s: float) -> None:
    import fsspec

    options = _store_options(storage_options)
    root = str(root or "").strip()
    fix = f"set {STORE_SETTING} to a writable path or URL (s3://bucket/prefix)"
    if not root:
        raise ConfigError(f"the activation store is not set: {fix}")
    protocol = fsspec.utils.get_protocol(root)
    if protocol in ("file", "local"):
        _check_writable_location(Path(fsspec.core.strip_protocol(root)), "folder", f"activation store {root!r}", fix)
        return
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"activation store {root!r}: protocol {protocol!r} is not available ({e}); "
                          f"install its fsspec package (s3fs for s3://, gcsfs for gs://) or {fix}") from None
    endpoint = _store_endpoint(protocol, root, options)
    if endpoint:
        why = _probe_url(endpoint, timeout_s)
        if why:
            raise ConfigError(f"activation store {root!r} is unreachable: endpoint {endpoint} does not answer ({why}). "
                              f"Start the server or fix endpoint_url in {STORE_OPTIONS_SETTING}, or {fix}")

    def write_probe():  # one object written and removed; no makedirs, which would create a missing bucket
        fs, base = fsspec.core.url_to_fs(root, **options)
        probe = f"{base}/.probe-{uuid.uuid4().hex}"
        fs.pipe_file(probe, b"ok")
        fs.rm(probe)

    try:  # the endpoint answers; a probe object proves the bucket and the credentials
        _bounded(write_probe, max(10.0, 3 * timeout_s))
    except TimeoutError as e:
        raise ConfigError(f"activation store {root!r} did not take a probe object ({e}); {fix}") from None
    except FileNotFoundError as e:
        raise ConfigError(f"activation store {root!r}: {e} (the bucket must exist; it is not created here); "
                          f"create it or {fix}") from None
    except Exception as e:  # noqa: BLE001 - a backend's own errors: credentials, permissions, ...
        raise ConfigError(f"activation store {root!r} is not writable ({type(e).__name__}: {e}); {fix}") from None


_DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def check_tracking(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """MLflow can be reached at ``uri``: a sqlite file or folder that can be created, or a server that
    answers within ``timeout_s``. Nothing is created and no run is started."""
    uri = str(uri or "").strip()
    fix = f"set {TRACKING_SETTING} to a reachable server (http://host:5000) or to sqlite:///<path> (the embedded default)"
    if not uri:
        raise ConfigError(f"the MLflow tracking URI is not set: {fix}")
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+", 1)[0]  # postgresql+psycopg2 -> postgresql
    what = f"MLflow tracking URI {uri!r}"
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if path and path != ":memory:":
            _check_writable_location(Path(path), "file", what, fix)
    elif scheme in ("", "file") or len(scheme) == 1:  # a folder (MLflow's file store); "c:" is a drive
        _check_writable_location(Path(parts.path if scheme == "file" else uri), "folder", what, fix)
    elif scheme in ("http", "https"):
        why = _probe_url(uri, timeout_s)
        if why:
            raise ConfigError(f"{what} is unreachable ({why}). Start the MLflow server, or {fix}")
    elif scheme in _DB_PORTS:
        why = _probe_url(f"tcp://{parts.hostname}:{parts.port or _DB_PORTS[scheme]}", timeout_s)
        if why:
            raise ConfigError(f"{what} is unreachable: the database does not answer ({why}); {fix}")
    # other schemes (databricks, ...) are left to MLflow
