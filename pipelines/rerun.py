"""A recipe launched again from what an MLflow run logged: ``precompute rerun <run id>``, or
``python -m pipelines.rerun <run id>`` where the project is not installed.

The command lives here, with the Dagster wiring it runs, not in the library: ``precompute``'s CLI
finds it through the ``precompute.commands`` entry point (pyproject.toml), so the library imports
nothing from ``pipelines`` (tests/test_layers.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from pipelines.local import dagster_home, quiet_warnings, with_quiet_logging


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


def add_command(sub: argparse._SubParsersAction) -> None:
    """The ``rerun`` subcommand of ``precompute`` (entry point group ``precompute.commands``)."""
    from precompute.cli import tracking_uri_default

    again = sub.add_parser("rerun", help="launch the recipe an MLflow run logged again, on the local Dagster instance")
    again.add_argument("run_id", help="the MLflow run id of a recipe stage (or of the run grouping them)")
    again.add_argument("--tracking-uri", default=tracking_uri_default(), help="MLflow tracking URI (default: %(default)s)")
    again.set_defaults(fn=_cmd_rerun)


def _cmd_rerun(args: argparse.Namespace) -> int:
    rerun(args.run_id, args.tracking_uri)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.rerun <run id> [--tracking-uri URI]``: precompute's CLI with this command."""
    from precompute.cli import main as cli

    return cli(["rerun", *(sys.argv[1:] if argv is None else argv)], commands=[add_command])


if __name__ == "__main__":
    sys.exit(main())
