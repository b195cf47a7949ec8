"""The head sweep: batched == one by one, the best config is picked, reuse holds, MLflow children exist."""

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from precompute import sweep
from precompute.task import SingleLabel
from precompute.train import ArrayRows, ConfigError

PARTITION = "tf_efficientnet_lite0|0"


def _rows(n: int, seed: int, n_classes: int = 3, dim: int = 24) -> ArrayRows:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[np.arange(n), y] += 6.0  # separable: class c lifts feature c
    return ArrayRows(x, y)


@pytest.fixture(scope="module")
def data():
    return _rows(100, 0), _rows(40, 1)


def test_batched_sweep_equals_each_config_alone(data):
    train, valid = data
    # two shapes x two epoch counts, dropout on and off, weight decay, label smoothing;
    # 100 rows in batches of 32 leave a short last batch
    configs = sweep.grid(lr=[3e-3, 3e-2], ps=[0.0, None], xtra_fc=[(8,), ()], epochs=[2, 3], wd=[0.0, 0.1],
                         label_smoothing=[0.0, 0.1])
    batched = sweep.head_sweep(train, valid, 3, configs, batch_size=32, seed=3)
    alone = sweep.head_sweep(train, valid, 3, configs, batch_size=32, seed=3, batched=False)
    assert len(batched.table) == len(configs) == 64
    # one typed row per config, its last epoch's numbers; the table is those rows as plain values
    assert [r.config for r in batched.rows] == configs and isinstance(batched.rows[0], sweep.SweepRow)
    assert batched.rows[5].valid_loss == batched.histories[5][-1]["valid_loss"] == batched.table["valid_loss"].iloc[5]
    cols = ["train_loss", "valid_loss", "valid_accuracy"]
    np.testing.assert_allclose(batched.table[cols].to_numpy(), alone.table[cols].to_numpy(), atol=1e-5)
    for hb, ha in zip(batched.histories, alone.histories):
        assert len(hb) == len(ha)
        for rb, ra in zip(hb, ha):
            assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-6)
            assert rb["valid_loss"] == pytest.approx(ra["valid_loss"], abs=1e-5)
    for sb, sa in zip(batched.state_dicts, alone.state_dicts):
        assert sb.keys() == sa.keys()
        for k in sb:
            torch.testing.assert_close(sb[k].float(), sa[k].float(), atol=1e-5, rtol=1e-4)
    assert batched.best_index == alone.best_index
    # the sweep learnt something and is deterministic
    assert batched.table["valid_accuracy"].max() > 0.6  # chance is 1/3; a dozen steps each
    again = sweep.head_sweep(train, valid, 3, configs, batch_size=32, seed=3)
    pd.testing.assert_frame_equal(again.table.drop(columns="seconds"), batched.table.drop(columns="seconds"))
    # a config's weights give back the head it is
    head = sweep.head_from_result(batched, batched.best_index, 3)
    with torch.no_grad():
        acc = (head(valid.x).argmax(1) == valid.y).float().mean().item()
    assert acc == pytest.approx(batched.table["valid_accuracy"].iloc[batched.best_index])


def test_best_is_highest_accuracy_then_lowest_loss():
    table = pd.DataFrame({"valid_accuracy": [0.5, 0.9, 0.9, 0.7], "valid_loss": [0.1, 0.4, 0.3, 0.2]})
    assert sweep.best_index(table) == 2
    assert sweep.best_index(table.assign(valid_loss=[0.1, 0.3, 0.3, 0.2])) == 1  # a full tie: the earlier


def test_configs_are_checked_and_searched():
    with pytest.raises(ConfigError):
        sweep.SweepConfig(lr=0)
    with pytest.raises(ConfigError):
        sweep.SweepConfig(ps=(0.1,), xtra_fc=(8,))  # two blocks, one rate
    assert len(sweep.grid(lr=[1, 2], ps=[None, 0.5], wd=[0, 1])) == 8
    a, b = sweep.random_search(10, seed=1), sweep.random_search(10, seed=1)
    assert a == b and len(set(a)) > 1 and all(1e-4 <= c.lr <= 3e-2 for c in a)
    with pytest.raises(ConfigError, match="multi-hot"):  # targets and task must agree
        sweep.head_sweep(ArrayRows(np.zeros((4, 6), np.float32), np.zeros((4, 2), np.float32)),
                         ArrayRows(np.zeros((2, 6), np.float32), np.zeros((2, 2), np.float32)), 2, [sweep.SweepConfig()],
                         task=SingleLabel(("a", "b")))


def test_multilabel_sweep_equals_each_config_alone():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 12)).astype(np.float32)
    y = (rng.random((120, 3)) < 0.4).astype(np.float32)
    x[:, :3] += 4 * y  # label j lifts feature j: any subset of the three tags per row
    train, valid = ArrayRows(x[:90], y[:90]), ArrayRows(x[90:], y[90:])
    configs = sweep.grid(lr=[3e-2, 1e-1], ps=[0.0, None], xtra_fc=[(8,)], epochs=[8])
    batched = sweep.head_sweep(train, valid, 3, configs, batch_size=32, seed=1)
    alone = sweep.head_sweep(train, valid, 3, configs, batch_size=32, seed=1, batched=False)
    cols = ["train_loss", "valid_loss", "valid_accuracy"]
    np.testing.assert_allclose(batched.table[cols].to_numpy(), alone.table[cols].to_numpy(), atol=1e-5)
    assert batched.table["valid_accuracy"].max() > 0.8  # per-label accuracy; chance is about 0.6


def test_head_sweep_asset_tracks_children_and_reuses(env):
    from assets import activations, head_on_cache, head_sweep, image_manifest, lr_find_head

    resources, instance, uri, _ = env
    grid = {"lr": [1e-3, 1e-2], "ps": [None, 0.0], "xtra_fc": [[16], []], "epochs": [2], "batch_size": 8}
    run_config = {"ops": {"activations": {"config": {"size": 64, "chunk_rows": 8}},
                          "head_sweep": {"config": grid}}}
    from_sweep = {"ops": {"head_on_cache": {"config": {"from_sweep": True}},
                          "lr_find_head": {"config": {"num_it": 5, "batch_size": 8}}}}

    # from_sweep before any sweep: a clear failure at head_on_cache, nothing trained
    early = dg.materialize([image_manifest, activations, lr_find_head, head_on_cache], partition_key=PARTITION,
                           resources=resources, instance=instance, raise_on_error=False,
                           run_config={"ops": {"activations": run_config["ops"]["activations"], **from_sweep["ops"]}})
    assert not early.success
    failure = [e for e in early.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure[0].step_key == "head_on_cache" and "materialize head_sweep first" in str(failure[0].event_specific_data.error)
    result = dg.materialize([image_manifest, activations, head_sweep], partition_key=PARTITION,
                            resources=resources, instance=instance, run_config=run_config)
    assert result.success
    out = result.output_for_node("head_sweep")
    assert len(out["table"]) == 8 and out["best"] == out["configs"][out["best_index"]]
    accs = [r["valid_accuracy"] for r in out["table"]]
    assert accs[out["best_index"]] == max(accs)
    meta = instance.get_latest_materialization_event(head_sweep.key).asset_materialization.metadata
    assert meta["reused"].value is False and meta["n_configs"].value == 8
    assert "(best)" in meta["table"].value and "data:image/png;base64," in meta["plot"].value

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("precompute-pipeline").experiment_id
    parent = client.get_run(out["mlflow_run_id"])
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 8 and {c.info.run_id for c in children} == set(out["child_run_ids"])
    child = client.get_run(out["child_run_ids"][out["best_index"]])
    assert child.data.params["lr"] == str(out["best"]["lr"]) and child.data.tags["stage"] == "head_sweep.config"
    assert len(client.get_metric_history(child.info.run_id, "valid_accuracy")) == 2  # one per epoch
    assert float(parent.data.metrics["best_valid_accuracy"]) == pytest.approx(max(accs))
    n_runs = len(client.search_runs([exp], ""))

    # the same cache, grid and seed: the earlier sweep, no training, no new MLflow run
    again = dg.materialize([image_manifest, activations, head_sweep], partition_key=PARTITION,
                           resources=resources, instance=instance, selection=[head_sweep],
                           run_config={"ops": {"head_sweep": {"config": grid}}})
    assert again.success
    meta = instance.get_latest_materialization_event(head_sweep.key).asset_materialization.metadata
    assert meta["reused"].value is True and meta["mlflow_run_id"].value == out["mlflow_run_id"]
    assert again.output_for_node("head_sweep")["table"] == out["table"]
    assert len(client.search_runs([exp], "")) == n_runs

    # a new seed is a new sweep
    seeded = {"ops": {"head_sweep": {"config": {**grid, "seed": 1}}}}
    assert dg.materialize([image_manifest, activations, head_sweep], partition_key=PARTITION, resources=resources,
                          instance=instance, run_config=seeded, selection=[head_sweep]).success
    meta = instance.get_latest_materialization_event(head_sweep.key).asset_materialization.metadata
    # a new pipeline parent run (new Dagster run), the sweep run and its 8 children
    assert meta["reused"].value is False and len(client.search_runs([exp], "")) == n_runs + 10

    # from_sweep: head_on_cache trains the latest sweep's best head again, as the sweep trained it
    best = instance.get_latest_materialization_event(head_sweep.key).asset_materialization.metadata
    sweep_out = dg.materialize([image_manifest, activations, head_sweep], partition_key=PARTITION,
                               resources=resources, instance=instance, selection=[head_sweep],
                               run_config=seeded).output_for_node("head_sweep")
    assert sweep_out["best"] == best["best_config"].value
    run = dg.materialize([image_manifest, activations, lr_find_head, head_on_cache], partition_key=PARTITION,
                         resources=resources, instance=instance, selection=[lr_find_head, head_on_cache],
                         run_config=from_sweep)
    assert run.success
    record = run.output_for_node("head_on_cache")
    row = sweep_out["table"][sweep_out["best_index"]]
    assert list(record.head.xtra_fc) == sweep_out["best"]["xtra_fc"] and record.seed == 1
    assert record.history[-1]["valid_loss"] == pytest.approx(row["valid_loss"], abs=1e-5)
    assert record.history[-1]["valid_accuracy"] == pytest.approx(row["valid_accuracy"])
    params = client.get_run(record.mlflow_run_id).data.params
    assert float(params["lr"]) == sweep_out["best"]["lr"] and params["from_sweep"] == "True"
