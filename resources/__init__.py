"""Dagster resources: everything that talks to the outside (images, the store, MLflow, the device, a Dask cluster)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import dagster as dg

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEMO_SOURCE = "demo:digits"


def project_home() -> Path:
    """Where the embedded stores live: $PRECOMPUTE_HOME, default <project>/var."""
    return Path(os.environ.get("PRECOMPUTE_HOME", PROJECT_DIR / "var")).resolve()


def default_tracking_uri(home: Path) -> str:
    """The embedded MLflow store: a SQLite file in the project home (MLflow's file store is in
    maintenance mode). Here, not in precompute.tracking, so the definitions load without mlflow."""
    return f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


class ImageSource(dg.ConfigurableResource):
    """The images: a folder (train/<class>/*, valid/<class>/*) or a CSV of path,label[,split].

    Set PRECOMPUTE_DATA to point the pipeline at your own images; the default writes
    scikit-learn's digits as an image folder under the project home. For a multi-label CSV
    (several tags per image in the label column) set PRECOMPUTE_LABEL_DELIM to the character
    between the tags (" " for fastai's planet CSV): the heads then use sigmoid outputs.

    ``source`` may be an fsspec URL (``s3://bucket/images/`` or ``s3://bucket/labels.csv``) read
    with ``storage_options_json`` (PRECOMPUTE_DATA_OPTIONS). ``scan_index`` is where the scan
    index lives (default beside the activation store, see precompute/scan_index.py); with it a
    manifest reads only new and changed files. ``full_rescan`` reads every file again.
    """

    source: str = DEMO_SOURCE
    root: Optional[str] = None  # for a CSV: folder its paths are relative to (default: the CSV's)
    label_delim: Optional[str] = None  # multi-label CSV: the character between an image's tags
    storage_options_json: str = ""  # fsspec options of a URL source as JSON; "" = $PRECOMPUTE_DATA_OPTIONS
    scan_index: Optional[str] = None  # folder or URL of the scan index; None: every scan reads every file
    scan_index_options_json: str = "{}"  # fsspec options of the scan index location (those of the store)
    full_rescan: bool = False  # ignore the scan index once: read every file and rewrite it
    concurrency: int = 16  # remote objects read at once
    timeout_s: float = 60.0  # per remote object

    def resolve(self) -> str | Path:
        """The source as build_manifest takes it: a local Path, or a URL string."""
        if self.source == DEMO_SOURCE:
            from precompute.demo_data import write_digits_folder

            return write_digits_folder(project_home() / "data" / "digits")
        from precompute.sources import is_url

        return self.source if is_url(self.source) else Path(self.source).expanduser()

    def storage_options(self) -> Optional[dict]:
        return json.loads(self.storage_options_json) if self.storage_options_json.strip() else None

    def scan(self, max_reads: Optional[int] = None):
        """A ``precompute.scan_index.Scan`` with this source's index and limits (its ``stats`` fill in)."""
        from precompute.scan_index import Scan, ScanIndex

        options = json.loads(self.scan_index_options_json or "{}")
        index = ScanIndex(self.scan_index, options) if self.scan_index else None
        return Scan(index=index, full_rescan=self.full_rescan, max_reads=max_reads, concurrency=self.concurrency,
                    timeout_s=self.timeout_s)

    def manifest(self, scan=None):
        from precompute.manifest import build_manifest

        return build_manifest(self.resolve(), root=self.root, label_delim=self.label_delim or None,
                              storage_options=self.storage_options(), scan=scan if scan is not None else self.scan())


class ActivationStoreResource(dg.ConfigurableResource):
    """The activation cache: a local path or an fsspec URL (s3://bucket/prefix) shared by a team."""

    root: str
    storage_options_json: str = "{}"  # e.g. {"endpoint_url": "http://127.0.0.1:9000"} for S3
    compressor: str = ""  # "" = precompute.store.DEFAULT_COMPRESSOR ("auto"); or one of store.COMPRESSORS

    def get(self):
        from precompute.store import DEFAULT_COMPRESSOR, ActivationStore

        return ActivationStore(self.root, json.loads(self.storage_options_json), self.compressor or DEFAULT_COMPRESSOR)


class MlflowTracking(dg.ConfigurableResource):
    """MLflow: a ``sqlite:///`` file, or a tracking server (``http://...``) that stores the artifacts
    itself (leave ``artifact_root`` unset). Calls to a server are bounded: a few retries, each logged,
    then the stage fails naming the server (precompute.tracking.bound_http_retries)."""

    tracking_uri: str
    experiment: str = "precompute-pipeline"
    artifact_root: Optional[str] = None

    def tracker(self):
        from precompute.tracking import Tracker

        return Tracker(self.tracking_uri, self.experiment, self.artifact_root)

    @contextmanager
    def open_run(self, context, stage: str, params: dict, arch: str, xtra_cut: int, manifest=None,
                 view_key: Optional[str] = None):
        """A pipeline stage's MLflow run (a child of the Dagster run's parent run), with what re-executes
        it (``precompute rerun <run id>``): the Dagster run config, job, asset selection and partition,
        the git commit, and the image manifest as a dataset input. Its source is the manifest's own
        (``manifest.attrs["source"]``) and its digest ``view_key``, the rows the stage trained on (the
        activations' view key, which a stage record carries on): both come with the stage's inputs."""
        from precompute.archs import get_arch
        from precompute.tracking import JOB_TAG, PARTITION_TAG, SELECTION_TAG, git_commit

        tracker, dagster_run = self.tracker(), context.run
        keys = dagster_run.asset_selection or context.job_def.asset_layer.selected_asset_keys  # None: the whole job
        selection = ",".join(sorted(k.to_user_string() for k in keys))
        tags = tracker.stage_tags(dagster_run.run_id, context.partition_key, stage,
                                  {PARTITION_TAG: context.partition_key, JOB_TAG: dagster_run.job_name,
                                   SELECTION_TAG: selection, "arch": arch})
        source = manifest.attrs.get("source") if manifest is not None else None
        with tracker.run(f"{stage} {arch} cut={xtra_cut}",
                         {"arch": arch, "cut": xtra_cut, "lr_cut": get_arch(arch).lr_cut, **params}, tags) as run:
            run.provenance(dagster_run.run_config, manifest, source, view_key, git_commit())
            yield run


class ComputeDevice(dg.ConfigurableResource):
    """Where tensors run: "auto" picks the first CUDA device when there is one, else the CPU."""

    device: str = "auto"
    num_threads: int = 0   # 0: leave torch's default
    num_workers: int = 0   # DataLoader decode workers

    def setup(self) -> str:
        return resolve_device(self.device, self.num_threads)


def resolve_device(device: str = "auto", num_threads: int = 0) -> str:
    """ComputeDevice's rule, where the tensors run (a Dask worker resolves "auto" on its own machine)."""
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class DaskCluster(dg.ConfigurableResource):
    """Where sharded precompute runs its shard tasks: a dask.distributed cluster, through Dask's public API.

    ``scheduler_address`` (``tcp://host:8786``, $PRECOMPUTE_DASK_SCHEDULER) connects to a running
    scheduler, whichever cluster manager started it (dask-kubernetes, dask-jobqueue, ``dask scheduler``
    + ``dask worker``). Left empty, each run starts a LocalCluster of ``local_workers`` processes
    ($PRECOMPUTE_DASK_WORKERS) on 127.0.0.1 and stops it at the end. ``task_retries`` is Dask's
    ``retries=`` for a shard task that raised; a task whose worker died is rescheduled by the scheduler
    itself (up to its ``distributed.scheduler.allowed-failures``). Committed chunks survive both.
    """

    scheduler_address: str = ""
    local_workers: int = 2
    threads_per_worker: int = 1
    task_retries: int = 2
    connect_timeout_s: float = 30.0
    no_workers_timeout_s: float = 120.0  # fail a run whose cluster has had no worker this long

    @contextmanager
    def client(self):
        """A ``distributed.Client`` for one run (and the LocalCluster behind it, when there is no address)."""
        import distributed

        if self.scheduler_address.strip():
            try:
                client = distributed.Client(self.scheduler_address.strip(), timeout=self.connect_timeout_s)
            except OSError as e:
                raise ConnectionError(
                    f"no Dask scheduler answered at {self.scheduler_address} within {self.connect_timeout_s:.0f} s ({e}): "
                    "start one (`dask scheduler`, or your cluster manager), or leave PRECOMPUTE_DASK_SCHEDULER empty "
                    "for a LocalCluster on this machine") from e
            with client:
                yield client
            return
        if self.local_workers < 1:
            raise ValueError(f"local_workers {self.local_workers}: a LocalCluster needs 1 or more worker processes "
                             "(PRECOMPUTE_DASK_WORKERS), or set scheduler_address")
        with distributed.LocalCluster(n_workers=self.local_workers, threads_per_worker=self.threads_per_worker,
                                      processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
                distributed.Client(cluster) as client:
            yield client


def scan_index_location(store_root: str) -> Optional[str]:
    """$PRECOMPUTE_SCAN_INDEX (a folder or URL; "off" for none), default <store>/_scan_index: the store is
    what a team shares, so one machine's scan spares the others theirs (precompute/scan_index.py)."""
    value = os.environ.get("PRECOMPUTE_SCAN_INDEX", "").strip()
    if value.lower() in ("off", "none", "0"):
        return None
    return value or f"{str(store_root).rstrip('/')}/_scan_index"


def default_resources() -> dict:
    """The embedded defaults: no server, everything under the project home; env vars override."""
    home = project_home()
    store_root = os.environ.get("PRECOMPUTE_STORE", str(home / "activations"))
    # a tracking server keeps artifacts where it was told (--artifacts-destination); only the
    # embedded sqlite store needs a local folder
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", default_tracking_uri(home))
    return {
        "images": ImageSource(source=os.environ.get("PRECOMPUTE_DATA", DEMO_SOURCE),
                              root=os.environ.get("PRECOMPUTE_DATA_ROOT"),
                              label_delim=os.environ.get("PRECOMPUTE_LABEL_DELIM") or None,
                              storage_options_json=os.environ.get("PRECOMPUTE_DATA_OPTIONS", ""),
                              scan_index=scan_index_location(store_root),
                              scan_index_options_json=os.environ.get("PRECOMPUTE_SCAN_INDEX_OPTIONS",
                                                                     os.environ.get("PRECOMPUTE_STORE_OPTIONS", "{}")),
                              full_rescan=os.environ.get("PRECOMPUTE_FULL_RESCAN", "") in ("1", "true", "yes"),
                              concurrency=int(os.environ.get("PRECOMPUTE_DATA_CONCURRENCY", "16")),
                              timeout_s=float(os.environ.get("PRECOMPUTE_DATA_TIMEOUT_S", "60"))),
        "store": ActivationStoreResource(root=store_root,
                                         storage_options_json=os.environ.get("PRECOMPUTE_STORE_OPTIONS", "{}"),
                                         compressor=os.environ.get("PRECOMPUTE_STORE_COMPRESSOR", "")),
        "tracking": MlflowTracking(tracking_uri=tracking_uri, artifact_root=os.environ.get(
            "PRECOMPUTE_ARTIFACTS", str(home / "mlartifacts") if tracking_uri.startswith("sqlite:") else None)),
        "compute": ComputeDevice(device=os.environ.get("PRECOMPUTE_DEVICE", "auto"),
                                 num_workers=int(os.environ.get("PRECOMPUTE_WORKERS", "0"))),
        "dask": DaskCluster(scheduler_address=os.environ.get("PRECOMPUTE_DASK_SCHEDULER", ""),
                            local_workers=int(os.environ.get("PRECOMPUTE_DASK_WORKERS", "2"))),
    }
