"""`precompute_sharded` on a dask.distributed cluster of worker processes (PRECOMPUTE_EXECUTOR=dask).

The cluster is a LocalCluster on 127.0.0.1 with 2 worker processes behind nannies: the scheduler,
the task hand-off and the workers' own job loading are the code path a remote cluster takes.
"""

import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
from distributed import Client, LocalCluster, WorkerPlugin

from precompute.data import build_manifest, ok_rows
from precompute.features import in_shard
from precompute.store import ActivationStore
from tests.conftest import copy_tree
from tests.test_sharding import PARTITION, assert_same_entry, single_run

SHARD_STEPS = ("compute_shard[shard_0]", "compute_shard[shard_1]")


def dask_sharded_job():
    """The job with the executor $PRECOMPUTE_EXECUTOR picks (dask here), as the orchestrator and each
    worker load it. Dagster caches a loaded job per process: test_sharding's target is another function."""
    from pipelines.definitions import defs
    from pipelines.sharding import executor_from_env

    return defs.resolve_job_def("precompute_sharded").with_executor_def(executor_from_env())


@pytest.fixture(scope="module")
def dask(tmp_path_factory, dogscats):
    """2 Dask worker processes with the pipeline's settings in their env, a persistent Dagster home."""
    root = tmp_path_factory.mktemp("dask")
    images = copy_tree(dogscats, root / "images", {"train": 6, "valid": 3})
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with pytest.MonkeyPatch.context() as mp:
        # the workers are spawned with this env: they build the job's resources and executor from it
        for var, value in {"PRECOMPUTE_HOME": root / "home", "PRECOMPUTE_DATA": images, "PRECOMPUTE_STORE": root / "store",
                           "DAGSTER_HOME": home, "PRECOMPUTE_EXECUTOR": "dask", "OMP_NUM_THREADS": 1}.items():
            mp.setenv(var, str(value))
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            mp.setenv("PRECOMPUTE_DASK_SCHEDULER", cluster.scheduler_address)
            manifest = build_manifest(images)
            yield SimpleNamespace(root=root, client=client, manifest=manifest,
                                  ids=list(ok_rows(manifest)["image_id"]), store=ActivationStore(str(root / "store")))


def run_sharded(config: dict, partition: str = PARTITION) -> tuple[bool, list, dict]:
    """One run of the job (executor config from $PRECOMPUTE_DASK_SCHEDULER): success, events, shard outputs."""
    ops = {op: {"config": {**config, "shards": 2}} for op in ("plan_shards", "compute_shard")}
    with dg.DagsterInstance.get() as instance:
        with dg.execute_job(dg.reconstructable(dask_sharded_job), instance, tags={"dagster/partition": partition},
                            run_config={"ops": ops}, raise_on_error=False) as result:
            outputs = dict(result.output_for_node("compute_shard")) if result.success else {}
            # the run's event log, which has what a killed worker wrote too (result.all_events does not)
            events = [r.dagster_event for r in instance.all_logs(result.run_id) if r.dagster_event]
            return result.success, events, outputs


def step_pids(events, event_type: str) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    for e in events:
        if e.event_type_value == event_type and e.step_key:
            pids.setdefault(e.step_key, []).append(e.pid)
    return pids


def test_two_dask_shards_equal_one(dask):
    config = {"size": 32, "chunk_rows": 4}
    ok, events, outputs = run_sharded(config)
    assert ok, [e.message for e in events if e.event_type_value in ("STEP_FAILURE", "ENGINE_EVENT")]
    # the shards ran in the cluster's two worker processes, not in this one (no silent fallback)
    workers = dask.client.run(os.getpid)  # worker address -> pid
    shard_pids = {step: pids for step, pids in step_pids(events, "STEP_START").items() if step in SHARD_STEPS}
    assert set(shard_pids) == set(SHARD_STEPS)
    pids = [p for ps in shard_pids.values() for p in ps]
    assert len(pids) == len(set(pids)) == 2 and set(pids) <= set(workers.values()) and os.getpid() not in pids
    started = [e for e in events if e.event_type_value == "STEP_WORKER_STARTED" and e.step_key in SHARD_STEPS]
    assert {e.event_specific_data.metadata["dask_worker"].value for e in started} == set(workers)
    assert all(r["computed"] > 0 for r in outputs.values())
    assert sum(r["computed"] for r in outputs.values()) == len(set(dask.ids))

    single = single_run(dask.manifest, dask.root / "single32", size=32, chunk_rows=4)
    assert_same_entry(dask.store.entry(single.key), single, dask.ids)


class SlowCommits(WorkerPlugin):
    """Sleeps before each chunk's commit record in the worker, so a kill lands mid-shard."""

    name = "slow-commits"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def setup(self, worker):
        from precompute.store.entry import Entry

        put, seconds = Entry._put, self.seconds

        def slow_put(entry, rel, data, durable=True):
            if rel.startswith("commits/"):
                time.sleep(seconds)
            put(entry, rel, data, durable)

        Entry._original_put, Entry._put = put, slow_put

    def teardown(self, worker):
        from precompute.store.entry import Entry

        Entry._put = getattr(Entry, "_original_put", Entry._put)


def test_killed_worker_mid_shard(dask):
    """SIGKILL the worker computing a shard after its first commit: Dask reruns the step on a live
    worker, which keeps the committed chunks; a rerun computes nothing; the entry verifies."""
    config = {"size": 32, "chunk_rows": 1, "batch_size": 1}
    partition = "tf_efficientnet_lite0|1"  # cut 1: an entry of its own, not the one the other test filled
    single = single_run(dask.manifest, dask.root / "single_cut1", size=32, chunk_rows=1, xtra_cut=1)
    commits = Path(dask.store.entry(single.key).path) / "commits"
    dask.client.register_plugin(SlowCommits(0.2))
    killed: dict = {}

    def kill_after_first_commit():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            records = sorted(commits.glob("*.json")) if commits.is_dir() else []
            if records:
                entry = dask.store.entry(single.key)
                entry.index(refresh=True)
                committed = [sum(in_shard(i, k, 2) for r in entry.records.values() for i in r["ids"]) for k in (0, 1)]
                shard = 0 if committed[0] else 1
                # the worker whose task is that shard's step
                for address, keys in dask.client.processing().items():
                    if any(str(key).startswith(f"compute_shard[shard_{shard}]") for key in keys):
                        pid = dask.client.run(os.getpid, workers=[address])[address]
                        os.kill(pid, signal.SIGKILL)
                        killed.update(step=f"compute_shard[shard_{shard}]", pid=pid, committed=committed[shard])
                        return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_first_commit, daemon=True)
    killer.start()
    try:
        ok, events, outputs = run_sharded(config, partition)
    finally:
        killer.join(timeout=5)
        dask.client.unregister_worker_plugin(SlowCommits.name)
    assert killed, "the killer found no shard step to kill"
    step = killed["step"]
    assert ok, [e.message for e in events if e.event_type_value in ("STEP_FAILURE", "ENGINE_EVENT")]
    # the step ran twice: first in the killed worker, then in another one, which succeeded
    started = step_pids(events, "STEP_WORKER_STARTED")[step]
    assert len(started) == 2 and started[0] == killed["pid"] and started[1] != killed["pid"]
    assert step_pids(events, "STEP_SUCCESS")[step] == started[1:]
    second = [e.message for e in events if e.event_type_value == "STEP_WORKER_STARTED" and e.step_key == step][1]
    assert "started before on Dask worker(s) " in second and f"(pid {killed['pid']})" in second  # the log says why
    # the retry kept what was committed before the kill and computed only the rest
    shard = outputs[step.split("[")[1].rstrip("]")]
    n_shard = sum(in_shard(i, int(step[-2]), 2) for i in set(dask.ids))
    assert shard["reused"] >= killed["committed"] >= 1 and shard["reused"] + shard["computed"] == n_shard
    assert shard["computed"] >= 1  # the kill came before the shard was done

    dask.client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed one
    ok, events, outputs = run_sharded(config, partition)  # a rerun: every row is there, nothing is computed
    assert ok and sum(r["computed"] for r in outputs.values()) == 0
    assert sum(r["reused"] for r in outputs.values()) == len(set(dask.ids))
    entry = dask.store.entry(single.key)
    report = entry.verify()
    assert report.ok and report.damaged == {} and len(report.verified) == len(entry.records)
    # rows and per-element values as a clean run's; no mean bound: at cut 1 (earlier features) two
    # float paths (batch 1 vs 32, or 1 vs 2 threads) differ by a mean of 1e-6 to 3e-6
    assert_same_entry(entry, single, dask.ids, mean_atol=None)


def test_dask_without_scheduler_says_what_to_set(tmp_path, tiny_tree, monkeypatch):
    for var, value in {"PRECOMPUTE_HOME": tmp_path / "home", "PRECOMPUTE_DATA": tiny_tree,
                       "PRECOMPUTE_STORE": tmp_path / "store", "PRECOMPUTE_EXECUTOR": "dask"}.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("PRECOMPUTE_DASK_SCHEDULER", raising=False)
    (tmp_path / "dh").mkdir()
    with dg.DagsterInstance.local_temp(str(tmp_path / "dh")) as instance:
        with dg.execute_job(dg.reconstructable(dask_sharded_job), instance, tags={"dagster/partition": PARTITION},
                            raise_on_error=False) as result:
            assert not result.success
            (failure,) = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
            assert "PRECOMPUTE_DASK_SCHEDULER=tcp://HOST:8786" in failure.dagster_event.event_specific_data.error.message
            assert not instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_START)  # nothing ran
