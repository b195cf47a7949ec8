"""The embedded Dagster instance: its home (telemetry off), the quiet console, and a recipe launched
again from what an MLflow run logged (``precompute rerun <run id>``)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from resources import project_home

# The Dagster APIs this project uses knowingly although Dagster marks them beta: an asset's data
# version (``Output(data_version=...)``, ``DataVersion``: how the manifest and the activations say
# what they contain, and how a head result is reused). Their warnings say nothing a user can act on.
KNOWN_BETA_APIS = (r"Parameter `data_version` of initializer `Output\.__init__`",
                   r"Class `DataVersion`")
# The run's console shows INFO and up: progress and results, not every Dagster event.
QUIET_LOGGING = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
TELEMETRY_OFF = "telemetry:\n  enabled: false\n"


def quiet_warnings() -> None:
    """Hide the beta warnings of KNOWN_BETA_APIS only; every other warning still shows."""
    from dagster import BetaWarning

    for message in KNOWN_BETA_APIS:
        warnings.filterwarnings("ignore", message=message, category=BetaWarning)


def dagster_home() -> Path:
    """$DAGSTER_HOME, default $PRECOMPUTE_HOME/dagster_home, created with a dagster.yaml that turns
    telemetry off (an existing dagster.yaml gets that setting added unless it has its own)."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(project_home() / "dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    text = config.read_text() if config.exists() else ""
    if "telemetry" not in text:
        config.write_text(text + ("\n" if text and not text.endswith("\n") else "") + TELEMETRY_OFF)
    return home


def with_quiet_logging(run_config: dict) -> dict:
    """``run_config`` with the console at INFO, unless it configures the console logger itself."""
    return run_config if "loggers" in run_config else {**run_config, **QUIET_LOGGING}


def rerun(mlflow_run_id: str, tracking_uri: str, out=sys.stdout) -> str:
    """Materialize again what the MLflow run ``mlflow_run_id`` ran: the same job, asset selection,
    partition and run config, on the local instance with the project's Definitions. Returns the
    new Dagster run id; prints it and the new MLflow runs."""
    from precompute.tracking import git_commit, rerun_spec

    spec = rerun_spec(tracking_uri, mlflow_run_id)
    if not spec.partition:
        raise ValueError(f"MLflow run {spec.run_id} names no Dagster partition; it was not logged by a recipe stage")
    dagster_home()
    quiet_warnings()
    import dagster as dg

    from pipelines.definitions import defs

    images = defs.resources["images"]
    source = str(images.resolve())
    if spec.dataset_source and spec.dataset_source != source:
        raise ValueError(f"MLflow run {spec.run_id} read its images from {spec.dataset_source}, but this project "
                         f"reads {source}: set PRECOMPUTE_DATA={spec.dataset_source} to run it on the same images")
    now = git_commit()
    if spec.git_commit and now and spec.git_commit != now:
        print(f"note: the run was logged at commit {spec.git_commit}; this checkout is {now}", file=out)
    known = {j.name for j in defs.resolve_all_job_defs()}
    job = defs.resolve_job_def(spec.job if spec.job in known else "recipe")  # an ad hoc job: its assets in recipe
    selection = [dg.AssetKey.from_user_string(k) for k in spec.asset_selection] or None
    print(f"rerun of MLflow run {spec.run_id}: job {job.name}, partition {spec.partition}"
          + (f", assets {', '.join(spec.asset_selection)}" if spec.asset_selection else ""), file=out)
    result = job.execute_in_process(run_config=with_quiet_logging(spec.run_config), partition_key=spec.partition,
                                    asset_selection=selection, instance=dg.DagsterInstance.get(),
                                    tags={"precompute/rerun_of": spec.run_id}, raise_on_error=False)
    print(f"Dagster run:  {result.run_id} ({'success' if result.success else 'FAILED'}) in "
          f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}", file=out)
    from mlflow.tracking import MlflowClient

    tracking = defs.resources["tracking"]  # where the new runs went (MLFLOW_TRACKING_URI or the project's)
    client = MlflowClient(tracking.tracking_uri)
    exp = client.get_experiment_by_name(tracking.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`dagster.run_id` = '{result.run_id}'",
                              order_by=["attributes.start_time ASC"]) if exp else []
    for r in runs:
        digest = r.inputs.dataset_inputs[0].dataset.digest if r.inputs and r.inputs.dataset_inputs else None
        same = "" if not spec.dataset_digest or digest is None else (
            ", same data" if digest == spec.dataset_digest else f", OTHER data (digest {digest} vs {spec.dataset_digest})")
        print(f"MLflow run:   {r.info.run_id} {r.data.tags.get('stage', '')}{same}", file=out)
    if not result.success:
        raise RuntimeError(f"the rerun failed (Dagster run {result.run_id}): see the log above")
    return result.run_id
