"""MLflow tracking through the client API (no global active run, so steps can run anywhere)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import mlflow.pytorch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from precompute.store import library_versions

MAX_PARAM = 6000  # MLflow's limit on a param value's length


def default_tracking_uri(home: Path) -> str:
    return f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


def stage_metrics(stages: dict[str, dict]) -> dict[str, float]:
    """Each evaluated stage's metrics under one flat MLflow name ("head_on_cache_on_cache.accuracy" for
    the stage "head_on_cache (on cache)"); the image counts (n) are left out."""
    out = {}
    for name, m in stages.items():
        key = name.replace(" ", "_").replace("(", "").replace(")", "")
        out.update({f"{key}.{k}": v for k, v in m.items() if k != "n"})
    return out


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str = "precompute-pipeline",
                 artifact_root: str | None = None):
        self.tracking_uri, self.experiment, self.artifact_root = tracking_uri, experiment, artifact_root
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
        try:
            self.experiment_id()
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"MLflow tracking URI {self.tracking_uri!r} is unreachable ({exc}); "
                               "set MLFLOW_TRACKING_URI to a reachable server or a sqlite:/// path") from exc

    def parent_run(self, group_id: str, partition: str = "") -> str:
        """The run that groups every stage of one pipeline run (created by the first stage)."""
        exp = self.experiment_id()
        query = f"tags.`pipeline.run_id` = '{group_id}' and tags.`pipeline.partition` = '{partition}'"
        found = self.client.search_runs([exp], query, max_results=1)
        if found:
            return found[0].info.run_id
        run = self.client.create_run(exp, tags={"mlflow.runName": f"recipe {partition} {group_id[:8]}",
                                                "pipeline.run_id": group_id, "pipeline.partition": partition})
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

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
        logger.params({**(params or {}), **{f"version.{k}": v for k, v in library_versions().items()},
                       "version.python": platform.python_version()})
        try:
            yield logger
        except BaseException:
            self.client.set_terminated(run.info.run_id, "FAILED")
            raise
        self.client.set_terminated(run.info.run_id, "FINISHED")


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

    def pytorch_model(self, record: dict, name: str = "network") -> None:
        """The trained network as an MLflow model (mlflow.pytorch.load_model gives it back)."""
        from precompute.recipe import TransformSpec, rebuild

        _, model, _ = rebuild(record, TransformSpec(**record["transform"]).size)
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.client.tracking_uri)
        try:
            with mlflow.start_run(run_id=self.run_id):
                # explicit requirements: inferring them imports and scans every module (slow)
                # pickle: mlflow.pytorch.load_model gives the nn.Module back; it unpickles, so load only
                # from a tracking store you trust (precompute.predict loads the weights-only record).
                mlflow.pytorch.log_model(model.eval(), name=name, serialization_format="pickle", pip_requirements=[
                    f"{k}=={v}" for k, v in library_versions().items() if k in ("torch", "torchvision", "timm")])
        finally:
            mlflow.set_tracking_uri(previous)

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
