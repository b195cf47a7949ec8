"""MLflow tracking through the client API (no global active run, so steps can run anywhere)."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from precompute.store import library_versions

MAX_PARAM = 6000  # MLflow's limit on a param value's length
RUN_CONFIG_ARTIFACT = "run_config.yaml"
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag: its UI shows it on the run page
PARTITION_TAG, JOB_TAG, SELECTION_TAG = "dagster.partition", "dagster.job", "dagster.asset_selection"
SOURCE_DIR = Path(__file__).resolve().parents[1]


def git_commit(folder: str | Path = SOURCE_DIR) -> str | None:
    """The commit checked out in ``folder``, with "-dirty" when tracked files differ from it; None
    outside a git checkout or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def stage_metrics(stages: dict[str, dict]) -> dict[str, float]:
    """Each evaluated stage's metrics under one flat MLflow name ("head_on_cache_on_cache.accuracy" for
    the stage "head_on_cache (on cache)"); the image counts (n) are left out."""
    out = {}
    for name, m in stages.items():
        key = name.replace(" ", "_").replace("(", "").replace(")", "")
        out.update({f"{key}.{k}": v for k, v in m.items() if k != "n"})
    return out


# MLflow's defaults (7 retries, backoff factor 2, a 120 s timeout) can hold one call for minutes
# while the tracking server is down; these fail a stage in seconds. Values already set win.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class _RetryWarning(logging.Filter):
    """urllib3 logs each retry of MLflow's HTTP client at DEBUG; say it as a WARNING, drop the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Incremented Retry"):
            return False
        record.msg, record.levelno, record.levelname = "HTTP request to %s failed, retrying: %r", logging.WARNING, "WARNING"
        return True


def bound_http_retries() -> None:
    """Bound MLflow's HTTP retries and timeouts (HTTP_LIMITS) and log each retry
    (logger ``urllib3.util.retry``, WARNING)."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    logger = logging.getLogger("urllib3.util.retry")
    if not any(isinstance(f, _RetryWarning) for f in logger.filters):
        logger.addFilter(_RetryWarning())
        logger.setLevel(logging.DEBUG)  # the filter above turns what passes into warnings


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str = "precompute-pipeline",
                 artifact_root: str | None = None):
        self.tracking_uri, self.experiment, self.artifact_root = tracking_uri, experiment, artifact_root
        bound_http_retries()
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri)

    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.artifact_root:  # keep artifacts beside the sqlite db, not in ./mlruns of the cwd
            location = Path(self.artifact_root).resolve().as_uri() if "://" not in self.artifact_root else self.artifact_root
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created concurrently by another step
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def check_reachable(self) -> None:
        """ConfigError unless MLflow answers at the tracking URI (``precompute.probes.check_tracking``:
        no run or experiment is created, a server is given up on after ``PROBE_TIMEOUT_S``)."""
        from precompute.probes import check_tracking

        check_tracking(self.tracking_uri)

    def parent_run(self, group_id: str, partition: str = "") -> str:
        """The run that groups every stage of one pipeline run (created by the first stage)."""
        exp = self.experiment_id()
        query = f"tags.`pipeline.run_id` = '{group_id}' and tags.`pipeline.partition` = '{partition}'"
        found = self.client.search_runs([exp], query, max_results=1)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(exp, tags={"mlflow.runName": f"recipe {partition} {group_id[:8]}",
                                                "pipeline.run_id": group_id, "pipeline.partition": partition})
        return run.info.run_id  # RUNNING: each stage's end moves its end (see _close_parent)

    def _grouping(self, parent_id: str):
        """The parent run if parent_run made it (a run of the pipeline), else None (a sweep's own run)."""
        parent = self.client.get_run(parent_id)
        return parent if "pipeline.run_id" in parent.data.tags else None

    def _open_parent(self, parent_id: str) -> None:
        if self._grouping(parent_id) is not None:
            self.client.update_run(parent_id, status="RUNNING")

    def _close_parent(self, parent_id: str, status: str) -> None:
        """A pipeline run's parent ends when its last stage ends: each stage moves its end to its own;
        a failed stage leaves it FAILED."""
        parent = self._grouping(parent_id)
        if parent is None:
            return
        if parent.info.status == "FAILED":
            status = "FAILED"
        self.client.set_terminated(parent_id, status, end_time=int(time.time() * 1000))

    def stage_tags(self, run_id: str, partition: str, stage: str, extra: dict | None = None) -> dict:
        """Tags of one stage's run: the orchestrator's run id, the stage, ``extra``, and as parent the
        run that groups every stage of that pipeline run and partition."""
        return {"dagster.run_id": run_id, **(extra or {}), "stage": stage,
                "mlflow.parentRunId": self.parent_run(run_id, partition)}

    @contextmanager
    def run(self, name: str, params: dict | None = None, tags: dict | None = None) -> Iterator["RunLogger"]:
        tags = {"mlflow.runName": name, **{k: str(v) for k, v in (tags or {}).items()}}
        run = self.client.create_run(self.experiment_id(), tags=tags)
        logger = RunLogger(self.client, run.info.run_id)
        parent = tags.get("mlflow.parentRunId")
        if parent:
            self._open_parent(parent)
        logger.params({**(params or {}), **{f"version.{k}": v for k, v in library_versions().items()},
                       "version.python": platform.python_version()})
        try:
            yield logger
        except BaseException:
            self.client.set_terminated(run.info.run_id, "FAILED")
            if parent:
                self._close_parent(parent, "FAILED")
            raise
        self.client.set_terminated(run.info.run_id, "FINISHED")
        if parent:
            self._close_parent(parent, "FINISHED")


def log_sweep(tracker: Tracker, name: str, params: dict, tags: dict, result, summary: dict,
              child_params: dict) -> tuple[str, list[str]]:
    """A head sweep (``precompute.sweep``'s result and summary) in MLflow: one run with the best
    configuration's metrics and params and the table as JSON, and under it one child run per
    configuration (its params, ``child_params`` and per-epoch metrics). Returns (run id, child run ids)."""
    with tracker.run(name, params, tags) as parent:
        children = []
        for i, (cfg, history) in enumerate(zip(result.configs, result.histories)):
            child_tags = {**tags, "stage": "head_sweep.config", "mlflow.parentRunId": parent.run_id}
            with tracker.run(f"head_sweep config {i}", {"config": i, **cfg.as_dict(), **child_params},
                             child_tags) as child:
                child.history(history)
            children.append(child.run_id)
        best = summary["table"][summary["best_index"]]
        parent.metrics({"best_valid_accuracy": best["valid_accuracy"], "best_valid_loss": best["valid_loss"],
                        "best_config": summary["best_index"], "seconds": result.seconds})
        parent.json(summary["table"], "sweep_table.json")
        parent.params({f"best.{k}": v for k, v in summary["best"].items()})
    return parent.run_id, children


@contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model needs it) on ``uri``, then the global tracking URI and
    $MLFLOW_TRACKING_URI as they were (mlflow.set_tracking_uri also writes the variable)."""
    from unittest import mock

    before, variable = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with mock.patch.dict(os.environ):  # set_tracking_uri writes the variable: patch.dict restores it after
            mlflow.set_tracking_uri(uri)
            yield
    finally:
        with mock.patch.dict(os.environ):
            mlflow.set_tracking_uri(None)  # no URI of our own: the variable or MLflow's default decides again
            if (variable or mlflow.get_tracking_uri()) != before:
                mlflow.set_tracking_uri(before)  # the caller had set one: put it back


@dataclass(frozen=True)
class RerunSpec:
    """What an MLflow stage run recorded about how it ran: enough to launch it again."""

    run_id: str
    run_config: dict
    partition: str
    job: str
    asset_selection: list[str]
    dataset_source: str | None
    dataset_digest: str | None
    git_commit: str | None


def rerun_spec(tracking_uri: str, run_id: str) -> RerunSpec:
    """The run config, partition, job and data of an MLflow run logged by a pipeline stage. A parent
    (grouping) run is answered with its first stage that logged them."""
    import yaml

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        raise ValueError(f"no MLflow store at {tracking_uri}: set MLFLOW_TRACKING_URI or --tracking-uri to the "
                         "store that holds the run")
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(f"no MLflow run {run_id!r} in {tracking_uri}: pass a run id shown in the MLflow UI "
                         "(or set MLFLOW_TRACKING_URI / --tracking-uri to the store that holds it)") from None
    if RUN_CONFIG_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
        children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                                      order_by=["attributes.start_time ASC"])
        logged = [c for c in children if RUN_CONFIG_ARTIFACT in {a.path for a in client.list_artifacts(c.info.run_id)}]
        if not logged:
            raise ValueError(f"MLflow run {run_id} has no {RUN_CONFIG_ARTIFACT} (nor do its child runs): it was not "
                             "logged by a pipeline stage of this version; pass the run id of a stage such as head_on_cache")
        run = logged[0]
    with tempfile.TemporaryDirectory() as tmp:
        with open(client.download_artifacts(run.info.run_id, RUN_CONFIG_ARTIFACT, tmp)) as f:
            run_config = yaml.safe_load(f) or {}
    tags = run.data.tags
    datasets = run.inputs.dataset_inputs if run.inputs else []
    source = digest = None
    if datasets:
        ds = datasets[0].dataset
        digest = ds.digest
        try:
            spec = json.loads(ds.source)
            source = spec.get("uri") or spec.get("url")
        except (TypeError, ValueError):
            source = ds.source
    return RerunSpec(run.info.run_id, run_config, tags.get(PARTITION_TAG, ""), tags.get(JOB_TAG, ""),
                     [k for k in tags.get(SELECTION_TAG, "").split(",") if k], source, digest, tags.get(GIT_COMMIT_TAG))


class RunLogger:
    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def params(self, params: dict) -> None:
        items = [Param(k, str(v)[:MAX_PARAM]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metrics(self, metrics: dict, step: int = 0) -> None:
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def series(self, key: str, values: list[float], start: int = 0) -> None:
        """One metric at consecutive steps (a schedule's lr per batch, an lr_find curve)."""
        import time

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(v), now, start + i) for i, v in enumerate(values)]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def pytorch_model(self, record, name: str = "network", register: bool = True):
        """The trained network as an MLflow pyfunc that serves images (precompute.serving: paths or
        bytes in, the stage's own transform, classes and probabilities out), registered in the Model
        Registry as ``precompute-<arch>-cut<n>``. Returns mlflow's ModelInfo (``registered_model_version``)."""
        from precompute import serving
        from precompute.records import StageRecord, require_typed, save_model

        record = require_typed(record, StageRecord, "the record to log")
        with _fluent_tracking_uri(self.client.tracking_uri), tempfile.TemporaryDirectory() as tmp, \
                mlflow.start_run(run_id=self.run_id):
            path = save_model(record, self.run_id, tmp)  # weights only: loaded with weights_only=True
            return serving.log_model(path, record, name, register)

    def provenance(self, run_config: dict, manifest=None, source: str | None = None, digest: str | None = None,
                   git: str | None = None) -> None:
        """What re-executes this run: the orchestrator's run config (``run_config.yaml``), the data as an
        MLflow dataset input (the manifest, its image source and digest), the git commit."""
        import yaml

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, RUN_CONFIG_ARTIFACT)
            with open(path, "w") as f:
                yaml.safe_dump(run_config or {}, f, sort_keys=False)
            self.client.log_artifact(self.run_id, path)
        if git:
            self.tags({GIT_COMMIT_TAG: git})
        if manifest is not None or source or digest:
            self.dataset(manifest, source, digest)

    def dataset(self, manifest=None, source: str | None = None, digest: str | None = None,
                name: str = "image_manifest", context: str = "training") -> None:
        """The image manifest as an MLflow dataset input: its schema and row count, its source and a
        digest (the view key: images, labels and the cache entry they were read through)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source = source or "unknown"
        if manifest is not None:
            import mlflow.data

            try:
                with warnings.catch_warnings():  # schema hints about integer columns, ambiguous local sources
                    warnings.simplefilter("ignore", UserWarning)
                    ds = mlflow.data.from_pandas(manifest, source=source, name=name, digest=digest).to_dict()
            except mlflow.exceptions.MlflowException:  # a source MLflow cannot resolve: named as given
                ds = None
        else:
            ds = None
        if ds is None:
            ds = {"name": name, "digest": digest or "unknown", "source_type": "precompute",
                  "source": json.dumps({"uri": source})}
        self.client.log_inputs(self.run_id, [DatasetInput(Dataset(**ds), [InputTag("mlflow.data.context", context)])])

    def history(self, history: list[dict]) -> None:
        for row in history:
            self.metrics({k: v for k, v in row.items() if k not in ("epoch", "lr_steps")}, step=row["epoch"])

    def layer_groups(self, groups: list[dict]) -> None:
        """Each group's layers, parameter count, learning rate and trainable flag."""
        flat = {}
        for g in groups:
            for k in ("layers", "n_params", "lr", "trainable"):
                flat[f"group{g['index']}.{k}"] = g.get(k)
        self.params(flat)
        self.json(groups, "layer_groups.json")

    def json(self, obj, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                json.dump(obj, f, indent=2, default=str)
            self.client.log_artifact(self.run_id, path)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)
