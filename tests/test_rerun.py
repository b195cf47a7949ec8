"""A recipe run re-executed from its MLflow run alone (`precompute rerun <run id>`), on a fresh store
and a fresh Dagster instance, reproduces its metrics."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.rerun import add_command, main as rerun_main
from precompute.cli import main as cli
from precompute.tracking import GIT_COMMIT_TAG, RUN_CONFIG_ARTIFACT, git_commit, rerun_spec
from tests.test_pipeline import CACHE_STAGE, PARTITION, SMALL

PROJECT = Path(__file__).resolve().parents[1]
CONFIG = {"ops": {k: SMALL["ops"][k] for k in ("activations", "lr_find_head", "head_on_cache")}}


def _stage_runs(client, dagster_run_id):
    exp = client.get_experiment_by_name("precompute-pipeline")
    runs = client.search_runs([exp.experiment_id], f"tags.`dagster.run_id` = '{dagster_run_id}'")
    return {r.data.tags["stage"]: r for r in runs}


def test_run_logs_what_reruns_it_and_rerun_reproduces_metrics(env, tiny_tree):
    resources, instance, uri, tmp_path = env
    result = dg.materialize(CACHE_STAGE, partition_key=PARTITION, resources=resources, instance=instance,
                            run_config=CONFIG)
    assert result.success
    client = MlflowClient(uri)
    stages = _stage_runs(client, result.run_id)
    assert set(stages) == {"lr_find_head", "head_on_cache"}
    head = client.get_run(stages["head_on_cache"].info.run_id)

    # what the stage logged: the run config, the partition, the job and assets, the commit, the data
    spec = rerun_spec(uri, head.info.run_id)
    assert spec.run_config == CONFIG and spec.partition == PARTITION
    assert set(spec.asset_selection) == {"image_manifest", "activations", "lr_find_head", "head_on_cache"}
    assert head.data.tags["dagster.job"] == spec.job
    assert head.data.tags.get(GIT_COMMIT_TAG) == git_commit()  # a checkout here; None elsewhere, no crash
    (dataset_input,) = head.inputs.dataset_inputs
    view_key = instance.get_latest_materialization_event(dg.AssetKey("activations")).asset_materialization \
        .metadata["view_key"].value
    assert dataset_input.dataset.digest == view_key == spec.dataset_digest
    assert spec.dataset_source == str(tiny_tree)
    assert '"num_rows": 24' in dataset_input.dataset.profile  # the manifest itself: 16 train + 8 valid
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    # the parent run spans its stages: it starts before the first and ends with the last
    parent = client.get_run(head.data.tags["mlflow.parentRunId"])
    children = [client.get_run(r.info.run_id) for r in stages.values()]
    assert parent.info.status == "FINISHED"
    assert parent.info.start_time <= min(c.info.start_time for c in children)
    assert parent.info.end_time >= max(c.info.end_time for c in children)
    assert rerun_spec(uri, parent.info.run_id).run_config == CONFIG  # the parent's id works too

    # rerun from the MLflow run id alone, elsewhere: a fresh store (activations computed again, head
    # trained again), a fresh Dagster instance, the same MLflow server and images
    fresh = tmp_path / "elsewhere"
    environ = {**os.environ, "PRECOMPUTE_HOME": str(fresh / "home"), "DAGSTER_HOME": str(fresh / "dagster_home"),
               "PRECOMPUTE_STORE": str(fresh / "store"), "PRECOMPUTE_DATA": str(tiny_tree),
               "MLFLOW_TRACKING_URI": uri, "PRECOMPUTE_ARTIFACTS": str(tmp_path / "artifacts")}
    done = subprocess.run([sys.executable, "-m", "pipelines.rerun", head.info.run_id], cwd=PROJECT,
                          env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " - DEBUG - " not in done.stdout + done.stderr and "Warning" not in done.stderr  # quiet, as make demo
    new_run_id = next(line.split()[2] for line in done.stdout.splitlines() if line.startswith("Dagster run:"))
    again = _stage_runs(client, new_run_id)
    assert set(again) == {"lr_find_head", "head_on_cache"}
    assert "same data" in done.stdout and "OTHER data" not in done.stdout
    assert again["head_on_cache"].data.tags["dagster.partition"] == PARTITION
    with open(client.download_artifacts(again["head_on_cache"].info.run_id, RUN_CONFIG_ARTIFACT, str(tmp_path))) as f:
        assert {k: v for k, v in yaml.safe_load(f).items() if k != "loggers"} == CONFIG
    # Same seed, same images, same code on the same machine: the head sees the same rows in the same
    # order. The accuracies must be equal; losses may differ only by float32 summation order (the body
    # runs again in a new process; oneDNN may pick other kernels), so 1e-5 relative.
    old, new = head.data.metrics, client.get_run(again["head_on_cache"].info.run_id).data.metrics
    assert new["valid_accuracy"] == old["valid_accuracy"]
    assert new["valid_loss"] == pytest.approx(old["valid_loss"], rel=1e-5)
    assert new["train_loss"] == pytest.approx(old["train_loss"], rel=1e-5)


def test_rerun_of_an_unknown_run_or_store_is_one_line(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert rerun_main(["0123456789abcdef0123456789abcdef", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no MLflow store" in err and "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()  # a mistyped URI creates no store
    MlflowClient(uri).search_experiments()  # an empty store
    capsys.readouterr()
    assert cli(["rerun", "0123456789abcdef0123456789abcdef", "--tracking-uri", uri], commands=[add_command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no MLflow run" in err and "Traceback" not in err


def test_precompute_cli_finds_rerun_through_its_entry_point():
    """`precompute rerun` is pipelines' command, registered for the library's CLI in pyproject.toml;
    the library itself names no pipelines module (tests/test_layers.py)."""
    import tomllib
    from importlib.metadata import EntryPoint

    with open(PROJECT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["entry-points"]["precompute.commands"]
    assert EntryPoint("rerun", declared["rerun"], "precompute.commands").load() is add_command
    with pytest.raises(SystemExit):  # without the command: argparse refuses `rerun`
        cli(["rerun", "x"], commands=[])


def test_git_commit_outside_a_checkout_is_none(tmp_path):
    assert git_commit(tmp_path) is None  # the tag is then left out; nothing fails
    assert git_commit() is None or len(git_commit().removesuffix("-dirty")) == 40
