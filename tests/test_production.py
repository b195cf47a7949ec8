"""The recipe on the production stack, started here on 127.0.0.1 by tests/services.py: Dagster's run,
event-log and schedule storage on PostgreSQL, images and the activation store on S3 (moto's server),
MLflow as a tracking server on PostgreSQL with its artifacts in S3. No service is mocked; one that
cannot start fails the test with its reason and log."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
from mlflow.tracking import MlflowClient

from assets import RECIPE_ASSETS
from tests.test_pipeline import PARTITION, SMALL

STAGES = {"lr_find_head", "head_on_cache", "head_augmented", "lr_find_unfrozen", "finetuned", "evaluation"}


def test_recipe_on_the_production_stack(prod, tmp_path):
    assert type(prod.instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(prod.instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    assert type(prod.instance.schedule_storage).__name__ == "PostgresScheduleStorage"

    result = dg.materialize(RECIPE_ASSETS, partition_key=PARTITION, resources=prod.resources,
                            instance=prod.instance, run_config=SMALL)
    assert result.success
    run_id = result.run_id

    # Dagster: the run, each asset's materialization and the four checks are rows in PostgreSQL
    assert prod.dagster_sql("SELECT status FROM runs WHERE run_id = %s", run_id) == [("SUCCESS",)]
    materialized = prod.dagster_sql("""SELECT asset_key FROM event_logs WHERE run_id = %s
                                       AND dagster_event_type = 'ASSET_MATERIALIZATION'""", run_id)
    assert sorted(json.loads(k)[0] for (k,) in materialized) == sorted(a.key.path[0] for a in RECIPE_ASSETS)
    checks = prod.dagster_sql("""SELECT check_name, execution_status FROM asset_check_executions
                                 WHERE run_id = %s""", run_id)
    assert sorted(checks) == [(name, "SUCCEEDED") for name in
                              sorted(["rows_match_manifest", "finite_values", "every_image_accounted_for",
                                      "blocks_verified"])]
    # the schedule storage's tables were migrated into the same database
    tables = {t for (t,) in prod.dagster_sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"runs", "event_logs", "asset_check_executions", "instigators", "job_ticks"} <= tables
    # a fresh instance object reads the same from PostgreSQL
    fresh = prod.fresh_instance()
    try:
        acts = fresh.get_latest_materialization_event(dg.AssetKey("activations")).asset_materialization
        assert acts.partition == PARTITION and acts.metadata["computed"].value == 24
        assert fresh.get_run_by_id(run_id).is_success
    finally:
        fresh.dispose()

    # the activation store is on S3
    assert any("/features/" in k or k.endswith("zarr.json") for k in prod.s3_keys(f"{prod.prefix}/activations/"))

    # MLflow: one run per stage, FINISHED, in the server's PostgreSQL database
    runs = prod.mlflow_runs(run_id)
    assert set(runs) == STAGES and {status for _, status in runs.values()} == {"FINISHED"}
    finetuned_run = runs["finetuned"][0]
    # ... and their artifacts in the bucket, through the server (--serve-artifacts)
    client = MlflowClient(prod.stack.mlflow.url)
    assert client.get_run(finetuned_run).info.artifact_uri.startswith("mlflow-artifacts:")
    finetuned_keys = [k for k in prod.s3_keys("mlartifacts/") if f"/{finetuned_run}/artifacts/" in k]
    assert any("/artifacts/model/" in k and k.endswith(".pt") for k in finetuned_keys)
    exp_id = client.get_experiment_by_name(prod.experiment).experiment_id
    logged = [m for m in client.search_logged_models([exp_id]) if m.source_run_id == finetuned_run]
    assert len(logged) == 1  # the MLflow model of the network: its files are in the bucket too
    model_prefix = logged[0].artifact_location.removeprefix("mlflow-artifacts:/")
    assert any(k.endswith("/MLmodel") for k in prod.s3_keys(f"mlartifacts/{model_prefix}"))
    report_keys = [k for k in prod.s3_keys("mlartifacts/") if f"/{runs['evaluation'][0]}/artifacts/report/" in k]
    assert any(k.endswith("report.md") for k in report_keys)

    # `precompute predict` loads the fine-tuned model from the server (and the bucket behind it)
    out = tmp_path / "predictions.csv"
    env = {**os.environ, "MLFLOW_TRACKING_URI": prod.stack.mlflow.url}
    done = subprocess.run([str(Path(sys.executable).with_name("precompute")), "predict", "--model", finetuned_run,
                           "--images", str(prod.images / "valid"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert {r["predicted"] for r in rows} <= {"cats", "dogs"}
