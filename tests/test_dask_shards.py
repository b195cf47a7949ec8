"""`precompute_sharded` against a running dask.distributed scheduler (the resource's scheduler_address).

The cluster is a LocalCluster on 127.0.0.1 with 2 worker processes behind nannies: the scheduler,
the task hand-off, Dask's rescheduling of a lost worker's task and the workers' events are the code
path a remote cluster (dask-kubernetes, dask-jobqueue) takes.
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

from precompute.features import in_shard
from precompute.manifest import build_manifest, ok_rows
from precompute.store import ActivationStore
from resources import DaskCluster
from tests.conftest import copy_tree
from tests.test_sharding import PARTITION, assert_same_entry, run_sharded, single_run


@pytest.fixture(scope="module")
def dask(tmp_path_factory, dogscats):
    """2 Dask worker processes (1 thread each) on loopback, and the resource pointed at their scheduler."""
    root = tmp_path_factory.mktemp("dask")
    images = copy_tree(dogscats, root / "images", {"train": 6, "valid": 3})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the workers are spawned with this env
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            manifest = build_manifest(images)
            yield SimpleNamespace(root=root, images=images, client=client, manifest=manifest,
                                  resource=DaskCluster(scheduler_address=cluster.scheduler_address),
                                  ids=list(ok_rows(manifest)["image_id"]), store=ActivationStore(str(root / "store")))


def messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [r.user_message for r in instance.all_logs(run_id)]


def test_two_dask_shards_equal_one_and_log_progress(dask):
    with dg.DagsterInstance.ephemeral() as instance:
        result = run_sharded(dask.images, dask.root / "store", dask.resource, {"size": 32, "chunk_rows": 4, "shards": 2},
                             instance=instance)
        assert result.success
        logged = messages(instance, result.run_id)
    shards = result.output_for_node("precompute_shards")["shards"]
    # the shards ran in the cluster's two worker processes, not in this one
    workers = dask.client.run(os.getpid)  # worker address -> pid
    assert {s["worker"] for s in shards} == set(workers) and {s["pid"] for s in shards} == set(workers.values())
    assert all(s["computed"] > 0 for s in shards)
    assert sum(s["computed"] for s in shards) == len(set(dask.ids))
    # the workers' events reached the Dagster log: where each shard started, its progress, its end
    for s in shards:
        k = s["shard"]
        assert f"shard {k}/2 started on Dask worker {s['worker']} (pid {s['pid']})" in logged
        n = sum(in_shard(i, k, 2) for i in set(dask.ids))
        assert any(m.startswith(f"shard {k}/2 on Dask worker {s['worker']}: {n}/{n} images") for m in logged)
        assert any(m.startswith(f"shard {k}/2 done on {s['worker']}: {s['computed']} computed") for m in logged)

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
    """SIGKILL the worker computing a shard after its first commit: the Dask scheduler reruns the task
    on the other worker, which keeps the committed chunks; a rerun computes nothing; the entry verifies."""
    config = {"size": 32, "chunk_rows": 1, "batch_size": 2, "shards": 2}
    partition = "tf_efficientnet_lite0|1"  # cut 1: an entry of its own, not the one the other test filled
    single = single_run(dask.manifest, dask.root / "single_cut1", size=32, chunk_rows=1, xtra_cut=1)
    commits = Path(dask.store.entry(single.key).path) / "commits"
    dask.client.register_plugin(SlowCommits(0.2))
    killed: dict = {}

    def kill_after_first_commit():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if commits.is_dir() and any(commits.glob("*.json")):
                entry = dask.store.entry(single.key)
                entry.index(refresh=True)
                committed = [sum(in_shard(i, k, 2) for r in entry.records.values() for i in r["ids"]) for k in (0, 1)]
                shard = 0 if committed[0] else 1
                for address, keys in dask.client.processing().items():  # the worker running that shard's task
                    if any(str(key).endswith(f"-shard-{shard}") for key in keys):
                        pid = dask.client.run(os.getpid, workers=[address])[address]
                        os.kill(pid, signal.SIGKILL)
                        killed.update(shard=shard, pid=pid, worker=address, committed=committed[shard])
                        return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_first_commit, daemon=True)
    killer.start()
    try:
        with dg.DagsterInstance.ephemeral() as instance:
            result = run_sharded(dask.images, dask.root / "store", dask.resource, config, partition, instance)
            logged = messages(instance, result.run_id)
    finally:
        killer.join(timeout=5)
        dask.client.unregister_worker_plugin(SlowCommits.name)
    assert killed, "the killer found no shard task to kill"
    assert result.success, [m for m in logged if "rror" in m]
    k = killed["shard"]
    shard = result.output_for_node("precompute_shards")["shards"][k]
    assert shard["pid"] != killed["pid"]  # finished in another worker process
    # the log says the shard started twice, and where it ran before
    starts = [m for m in logged if m.startswith(f"shard {k}/2 started on")]
    assert len(starts) == 2 and f"(pid {killed['pid']})" in starts[0]
    assert f"started before on {killed['worker']} (pid {killed['pid']}) (Dask runs it again" in starts[1]
    # the retry kept what was committed before the kill and computed only the rest
    n_shard = sum(in_shard(i, k, 2) for i in set(dask.ids))
    assert shard["reused"] >= killed["committed"] >= 1 and shard["reused"] + shard["computed"] == n_shard
    assert shard["computed"] >= 1  # the kill came before the shard was done

    dask.client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed one
    again = run_sharded(dask.images, dask.root / "store", dask.resource, config, partition)
    out = again.output_for_node("precompute_shards")  # a rerun: every row is there, nothing is computed
    assert again.success and out["computed"] == 0 and out["reused"] == len(set(dask.ids))
    entry = dask.store.entry(single.key)
    report = entry.verify()
    assert report.ok and report.damaged == {} and len(report.verified) == len(entry.records)
    # rows and per-element values as a clean run's; no mean bound: at cut 1 (earlier features) two
    # float paths (batch 1 vs 32, or 1 vs 2 threads) differ by a mean of 1e-6 to 3e-6
    assert_same_entry(entry, single, dask.ids, mean_atol=None)


def test_unreachable_scheduler_says_what_to_do(tmp_path, tiny_tree):
    with dg.DagsterInstance.ephemeral() as instance:
        result = run_sharded(tiny_tree, tmp_path / "store",
                             DaskCluster(scheduler_address="tcp://127.0.0.1:9", connect_timeout_s=2),
                             {"size": 32}, instance=instance)
        assert not result.success
        (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        message = failure.step_failure_data.error.message
    assert "no Dask scheduler answered at tcp://127.0.0.1:9" in message and "PRECOMPUTE_DASK_SCHEDULER" in message
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("commits/*.json"))
