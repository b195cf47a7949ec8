"""Fault drills on the production stack (tests/services.py): the MLflow server killed while a training
stage runs, and PostgreSQL stopped during a run. Each ends with a clear error, nothing committed lost,
and a rerun that succeeds once the service is back.

The run goes on in a thread while the test watches PostgreSQL directly (psycopg2, not MLflow's HTTP
client) for the moment to strike: the head's first epoch logged to MLflow.
"""

from __future__ import annotations

import threading
import time

import dagster as dg

from assets import activations, head_on_cache, image_manifest, lr_find_head
from precompute.tracking import HTTP_LIMITS
from tests.test_pipeline import PARTITION, SMALL
from tests.services import Prod

CACHE_STAGE = [image_manifest, activations, lr_find_head, head_on_cache]
SMALL_CACHE = {"ops": {k: SMALL["ops"][k] for k in ("activations", "lr_find_head", "head_on_cache")}}
# a head trained for many epochs, so that the stage is surely still running when the service goes
LONG_HEAD = {"ops": {**SMALL_CACHE["ops"], "head_on_cache": {"config": {"epochs": 300, "batch_size": 8}}}}


def in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001  the test inspects it
            box["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def wait_for_head_epoch(p: Prod, thread: threading.Thread, timeout: float = 600.0) -> str:
    """The MLflow run id of head_on_cache once its first epoch's valid_loss is in MLflow's database."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = p.mlflow_sql("""SELECT DISTINCT r.run_uuid FROM runs r
                               JOIN tags s ON s.run_uuid = r.run_uuid AND s.key = 'stage' AND s.value = 'head_on_cache'
                               JOIN experiments e ON e.experiment_id = r.experiment_id
                               JOIN metrics m ON m.run_uuid = r.run_uuid AND m.key = 'valid_loss'
                               WHERE e.name = %s""", p.experiment)
        if rows:
            return rows[0][0]
        assert thread.is_alive(), "the run ended before head_on_cache logged an epoch"
        time.sleep(0.1)
    raise AssertionError("head_on_cache logged no epoch in time")


def materializations(p: Prod, run_id: str) -> set[str]:
    import json

    rows = p.dagster_sql("""SELECT asset_key FROM event_logs WHERE run_id = %s
                            AND dagster_event_type = 'ASSET_MATERIALIZATION'""", run_id)
    return {json.loads(k)[0] for (k,) in rows}


def test_mlflow_server_killed_during_training_fails_clearly_then_a_rerun_succeeds(prod):
    p, mlflow = prod, prod.stack.mlflow
    thread, box = in_thread(lambda: dg.materialize(CACHE_STAGE, partition_key=PARTITION, resources=p.resources,
                                                   instance=p.instance, run_config=LONG_HEAD, raise_on_error=False))
    killed_run = wait_for_head_epoch(p, thread)
    mlflow.kill()
    thread.join(600)
    assert not thread.is_alive()
    result = box["result"]
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    assert [e.step_key for e in failures] == ["head_on_cache"]
    message = str(failures[0].step_failure_data.error.to_string())
    assert f"127.0.0.1:{mlflow.port}" in message and "Max retries exceeded" in message, message
    # each retry was logged, into the run's event log (PostgreSQL), not waited out silently
    retries = p.dagster_sql("SELECT count(*) FROM event_logs WHERE run_id = %s AND event LIKE %s",
                            result.run_id, "%failed, retrying%")[0][0]
    assert retries >= int(HTTP_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])

    mlflow.start()  # the same port: MLFLOW_TRACKING_URI does not change
    again = dg.materialize(CACHE_STAGE, partition_key=PARTITION, resources=p.resources, instance=p.instance,
                           run_config={"ops": {"head_on_cache": SMALL["ops"]["head_on_cache"]}},
                           selection=[head_on_cache])
    assert again.success

    # nothing lost: the first run's upstream materializations and MLflow runs, the killed run's epochs
    assert materializations(p, result.run_id) == {"image_manifest", "activations", "lr_find_head"}
    assert materializations(p, again.run_id) == {"head_on_cache"}
    assert p.dagster_sql("SELECT status FROM runs WHERE run_id = %s", result.run_id) == [("FAILURE",)]
    first, second = p.mlflow_runs(result.run_id), p.mlflow_runs(again.run_id)
    assert first["lr_find_head"][1] == "FINISHED"
    # the server died before the stage could say it failed: MLflow keeps the run as RUNNING
    assert first["head_on_cache"] == (killed_run, "RUNNING")
    assert p.mlflow_sql("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'valid_loss'", killed_run)[0][0] >= 1
    assert second == {"head_on_cache": (second["head_on_cache"][0], "FINISHED")}


def test_postgres_stopped_during_a_run_fails_clearly_then_a_rerun_loses_nothing(prod):
    p, postgres = prod, prod.stack.postgres
    thread, box = in_thread(lambda: dg.materialize(CACHE_STAGE, partition_key=PARTITION, resources=p.resources,
                                                   instance=p.instance, run_config=LONG_HEAD, raise_on_error=False))
    wait_for_head_epoch(p, thread)
    first_id = p.dagster_sql("""SELECT run_id FROM runs WHERE status = 'STARTED'
                                ORDER BY create_timestamp DESC LIMIT 1""")[0][0]
    postgres.stop()
    try:
        thread.join(600)
        assert not thread.is_alive()
    finally:
        postgres.start()  # the same data folder and port
    # the run cannot record even its own failure without its database: materialize raises Dagster's
    # error, caused by PostgreSQL's, which names the server
    error = box.get("error")
    assert error is not None, "the run went on without its database"
    chain = []
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    assert "DagsterPostgresException: too many retries for DB connection" in chain[0]
    assert any(f'"127.0.0.1", port {postgres.port} failed' in text for text in chain), chain

    again = dg.materialize(CACHE_STAGE, partition_key=PARTITION, resources=p.resources, instance=p.instance,
                           run_config=SMALL_CACHE)
    assert again.success
    # nothing lost: what the first run committed before the stop is still there
    assert {"image_manifest", "activations", "lr_find_head"} <= materializations(p, first_id)
    assert p.dagster_sql("SELECT status FROM runs WHERE run_id = %s", first_id)[0][0] != "SUCCESS"
    acts = p.instance.get_latest_materialization_event(activations.key).asset_materialization
    assert acts.metadata["computed"].value == 0 and acts.metadata["reused"].value == 24  # rows kept on S3
    assert {stage: status for stage, (_, status) in p.mlflow_runs(again.run_id).items()} == {
        "lr_find_head": "FINISHED", "head_on_cache": "FINISHED"}
