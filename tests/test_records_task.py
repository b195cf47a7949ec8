"""Typed stage records and tasks: a record survives a file (weights-only) and a pickle, an old flat
dict still loads, and a Task decides loss, activation, decoding and metrics for its kind."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from precompute.heads import HeadConfig, UnknownHead
from precompute.records import StageRecord, checked_record
from precompute.stages.head_stage import HeadStage
from precompute.stages.image_stage import ImageStage
from precompute.task import MultiLabel, SingleLabel, Task
from precompute.train import (ArrayRows, ConfigError, FitOptions, Schedule, _optimizer, evaluate_batches, fit,
                              predict_proba)
from precompute.transforms import TransformSpec


def make_record(task: Task) -> StageRecord:
    return StageRecord(stage="finetuned", arch="resnet18", xtra_cut=0, task=task,
                       head=HeadConfig(xtra_fc=[8]), transform=TransformSpec(size=32),
                       weights_id="random", state_dict={"1.w": torch.arange(4.0)},
                       history=[{"epoch": 0, "valid_loss": 0.5, "valid_accuracy": 0.75}],
                       groups=[{"index": 0, "lr": 1e-3}], schedule=Schedule("sgdr", cycles=2, cycle_len=1, cycle_mult=2),
                       augmentation={"preset": "side_on"}, failed_images=[["id", "a.jpg", "truncated"]])


@pytest.mark.parametrize("task", [SingleLabel(["cats", "dogs"]), MultiLabel(["a", "b"], ";", [0.3, 0.7])])
def test_record_round_trips_through_a_weights_only_file_and_a_pickle(task, tmp_path):
    record = make_record(task)
    path = tmp_path / "model.pt"
    torch.save(record.to_dict(groups=False), path)
    back = StageRecord.from_dict(torch.load(path, weights_only=True))
    assert back.task == task and back.classes == list(task.classes) and back.groups is None
    assert back.transform.key() == record.transform.key() and back.schedule.total_epochs == 3
    assert torch.equal(back.state_dict["1.w"], record.state_dict["1.w"]) and back.failed_images == record.failed_images
    assert back.last_epoch["valid_accuracy"] == 0.75
    assert back.head == record.head == HeadConfig(None, (8,)) and isinstance(back.head, HeadConfig)
    # on disk the head keeps the name and form every version wrote, so files go both ways
    assert record.to_dict()["head_config"] == {"ps": None, "xtra_fc": [8], "custom": None} and "head" not in record.to_dict()
    pickled = copy.deepcopy(record)  # the pickle protocol Dagster's default IO manager uses
    assert pickled.task == task and pickled.schedule == record.schedule and pickled.history == record.history
    assert torch.equal(pickled.state_dict["1.w"], record.state_dict["1.w"])


def test_old_flat_dict_records_still_load():
    old = {"stage": "finetuned", "arch": "resnet18", "xtra_cut": 0, "classes": ["a", "b", "c"], "multilabel": True,
           "label_delim": " ", "thresholds": [0.2, 0.5, 0.9], "head_config": {"ps": None, "xtra_fc": [8], "custom": None},
           "transform": TransformSpec(size=32).key(), "weights_id": "random", "state_dict": {}, "history": [],
           "schedule": {"kind": "one_cycle", "epochs": 2, "cycles": 1, "cycle_len": 1, "cycle_mult": 1,
                        "warmup": 0.05, "pct_start": 0.25}, "mlflow_run_id": "r1", "lr": 1e-3, "streamed": False}
    record = checked_record(old, "old file")
    assert isinstance(record.task, MultiLabel) and record.thresholds == (0.2, 0.5, 0.9)
    assert record.schedule.epochs == 2 and record.mlflow_run_id == "r1" and record.lr == 1e-3
    assert record.head == HeadConfig(xtra_fc=(8,))
    single = StageRecord.from_dict({**old, "multilabel": False, "label_delim": None, "thresholds": None})
    assert isinstance(single.task, SingleLabel) and single.thresholds is None
    with pytest.raises(ValueError, match="is not a stage record"):
        checked_record({"arch": "resnet18"}, "half a file")


def test_pickles_of_the_earlier_layout_migrate_when_loaded():
    """Dagster's IO manager pickles what an asset returns: a record pickled when its head was a
    ``head_config`` dict, and a ref whose key was a dict of parts, load as the typed objects
    (``copy.deepcopy`` goes through the same pickle protocol, __reduce_ex__ and __setstate__)."""
    from precompute.records import ActivationsRef
    from precompute.store import CacheKey

    record = make_record(SingleLabel(["a", "b"]))
    current = copy.deepcopy(record)
    record.__dict__["head_config"] = record.__dict__.pop("head").as_dict()  # the layout before
    migrated = copy.deepcopy(record)
    assert migrated.head == HeadConfig(xtra_fc=(8,)) and "head_config" not in vars(migrated)
    assert current.head == migrated.head
    record.__dict__["head_config"] = {"ps": None, "xtra_fc": [8], "custom": "this:s"}
    with pytest.raises(UnknownHead, match="refused, nothing was imported"):
        copy.deepcopy(record)  # a pickled name is checked as a file's is

    key = CacheKey("resnet18", "random", 0, 8, TransformSpec(size=32), versions={})
    ref = ActivationsRef("/store", key.rel(), key, "view-1")
    object.__setattr__(ref, "key", key.parts())  # the layout before
    back = copy.deepcopy(ref)
    assert back.key == key and back == ActivationsRef("/store", key.rel(), key, "view-1")
    with pytest.raises(TypeError, match="is a CacheKey"):
        ActivationsRef("/store", key.rel(), key.parts(), "view-1")
    with pytest.raises(TypeError, match="is a precompute.heads.HeadConfig"):
        StageRecord(**{**vars(make_record(SingleLabel(["a", "b"]))), "head": {"xtra_fc": [8]}})



def test_single_label_task():
    task = SingleLabel(["cats", "dogs"])
    assert task.encode(["dogs", "cats"]).tolist() == [1, 0] and task.knows("cats") and not task.knows("birds")
    out, y = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1, 1])
    assert task.correct(out, y) == 2
    right = torch.tensor([0, 1, 0])  # all right: smoothing raises the loss (soft targets)
    assert task.loss(0.1)(out, right).item() > task.loss()(out, right).item()
    assert torch.allclose(task.activation(out).sum(1), torch.ones(3))
    probs = task.activation(out).numpy()
    assert task.decode(probs) == ["cats", "dogs", "cats"]
    m = task.metrics(probs, y.numpy())
    assert m.accuracy == pytest.approx(2 / 3) and m.n == 3 and m.exact_match is None
    assert m.to_dict() == {"accuracy": m.accuracy, "loss": m.loss, "n": 3}  # plain numbers, the unmeasured left out
    tta = m.with_tta(task.metrics(probs[:2], y.numpy()[:2]))
    assert tta.accuracy == m.accuracy and tta.tta_accuracy == 1.0 and set(tta.to_dict()) == {"accuracy", "loss", "n",
                                                                                              "tta_accuracy", "tta_loss"}
    assert task.tuned(probs, y.numpy()) is task


def test_multi_label_task_tunes_thresholds_and_decodes_with_them():
    task = MultiLabel(["a", "b"], ";")
    assert task.encode(["a;b", "b", ""]).tolist() == [[1, 1], [0, 1], [0, 0]] and not task.knows("a;z")
    probs = np.array([[0.9, 0.3], [0.2, 0.35], [0.1, 0.2], [0.8, 0.4]], np.float32)
    y = np.array([[1, 1], [0, 1], [0, 0], [1, 1]], np.float32)
    assert task.decode(probs) == ["a", "", "", "a"]  # 0.5 for every label before tuning
    tuned = task.tuned(probs, y)
    assert tuned.thresholds[0] > 0.2 and tuned.thresholds[1] <= 0.3  # "b" is rare above 0.5: its threshold drops
    assert tuned.decode(probs) == ["a;b", "b", "", "a;b"]
    assert tuned.metrics(probs, y).exact_match == 1.0 and task.metrics(probs, y).exact_match == 0.25
    out = torch.logit(torch.tensor(probs))
    assert torch.allclose(tuned.activation(out), torch.tensor(probs), atol=1e-5)
    assert task.loss(0.1)(out, torch.tensor(y)).item() == pytest.approx(task.loss()(out, torch.tensor(y)).item())
    assert Task.from_dict(tuned.to_dict()) == tuned


def test_task_from_the_manifest_and_the_train_loop_take_it():
    rows = pd.DataFrame({"label": ["a b", "b", "a"], "status": "ok", "split": "train"})
    rows.attrs["label_delim"] = " "
    task = Task.from_manifest(rows)
    assert isinstance(task, MultiLabel) and task.classes == ("a", "b")
    single = pd.DataFrame({"label": ["x", "y", "x"], "status": "ok", "split": "train"})
    assert Task.from_manifest(single) == SingleLabel(["x", "y"])
    model = torch.nn.Linear(3, 2)
    x = torch.randn(6, 3)
    y = torch.tensor(task.encode(["a b", "b", "a", "a", "b", "a b"]))
    probs, targets = predict_proba(model, [(x, y)], task=task)
    assert probs.shape == (6, 2) and not np.allclose(probs.sum(1), 1)  # sigmoids, not a softmax
    loss, acc = evaluate_batches(model, [(x, y)], task=task)
    assert np.isfinite(loss) and 0 <= acc <= 1


def test_stage_settings_are_checked_where_they_are_made():
    with pytest.raises(ConfigError, match="precompute=True with augment=True"):
        ImageStage("finetuned", 0, precompute=True, augment=True)
    with pytest.raises(ConfigError, match="batch_size 1"):
        ImageStage("finetuned", 0, batch_size=1)
    with pytest.raises(ConfigError, match="max_zoom 0.9"):
        ImageStage("finetuned", 0, augmentation={"preset": "side_on", "max_zoom": 0.9})
    with pytest.raises(ConfigError, match="head_on_cache trains on the cache"):
        HeadStage(HeadConfig(xtra_fc=[8]), precompute=False)
    stage = ImageStage("head_augmented", -1, size=48)
    assert stage.frozen(3) == 2 and ImageStage("finetuned", 0).frozen(3) == 0
    assert stage.transform(make_record(SingleLabel(["a", "b"]))).size == 48


def test_stage_params_log_the_real_size_and_epochs():
    stage = ImageStage("head_augmented", -1, Schedule("sgdr", cycles=2, cycle_len=1, cycle_mult=2),
                       options=FitOptions("sgd", momentum=0.8))
    logged = stage.logged_params(make_record(SingleLabel(["a", "b"])), {"epochs": 1, "size": None})
    assert logged["epochs"] == 3 and logged["size"] == 32  # 1 + 2 SGDR epochs; the previous stage's 32 px
    assert logged["optimizer"] == "sgd" and logged["momentum"] == 0.8 and logged["early_stopping_patience"] is None
    assert logged["warmup"] == 0.05 and logged["pct_start"] == 0.0  # SGDR's warm-up at lr/100, as it runs


def test_fit_options_choose_the_optimizer_and_are_checked():
    model = torch.nn.Linear(2, 2)
    sgd = _optimizer([model], [0.1], FitOptions("sgd", momentum=0.5, weight_decay=1e-3))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    assert sgd.param_groups[0]["weight_decay"] == 1e-3
    assert isinstance(_optimizer([model], [0.1], FitOptions()), torch.optim.AdamW)
    for bad, says in [(dict(optimizer="adam"), "optimizer .adam.: choose one of adamw, sgd"), (dict(momentum=1.0), "momentum 1.0"),
                      (dict(weight_decay=-1.0), "weight_decay -1.0"), (dict(label_smoothing=1.0), "label_smoothing"),
                      (dict(early_stopping_patience=0), "early_stopping_patience 0")]:
        with pytest.raises(ConfigError, match=says):
            FitOptions(**bad)
    record = make_record(SingleLabel(["a", "b"]))
    record.fit_options = FitOptions("sgd", early_stopping_patience=2)
    assert StageRecord.from_dict(record.to_dict()).fit_options == record.fit_options


def test_early_stopping_keeps_the_best_epochs_weights():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=gen)
    train = ArrayRows(x.numpy(), (x[:, 0] > 0).long().numpy())
    valid = ArrayRows(x.numpy(), (x[:, 0] <= 0).long().numpy())  # the opposite rule: every epoch makes it worse
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    history = fit(model, [model], [0.5], lambda g: train.batches(16, g), lambda: valid.batches(64), 4,
                  Schedule("constant", epochs=8), options=FitOptions(early_stopping_patience=2))
    losses = [h["valid_loss"] for h in history]
    best = int(np.argmin(losses))
    assert len(history) == best + 3 < 8  # stopped two epochs after the best one
    assert evaluate_batches(model, valid.batches(64))[0] == pytest.approx(losses[best])  # the best weights kept
    other = torch.nn.Linear(2, 2)
    assert len(fit(other, [other], [0.5], lambda g: train.batches(16, g), lambda: valid.batches(64), 4,
                   Schedule("constant", epochs=8))) == 8  # without it every epoch runs


def test_stored_dict_materializations_migrate_once_with_a_real_dagster_storage(tmp_path):
    """What Dagster's default IO manager stored before the typed records (dicts; typed pickles of the
    earlier layout) is rewritten once by ``python -m precompute.migrate``; after that a downstream
    asset reads typed records, and before it a dict is refused with that command, never read as is."""
    import pickle

    import dagster as dg

    from precompute.migrate import main as migrate_main
    from precompute.migrate import migrate_materializations
    from precompute.records import ActivationsRef, require_typed
    from precompute.store import CacheKey

    key = CacheKey("resnet18", "random", 0, 8, TransformSpec(size=32), versions={})
    old_ref = {"store": "/store", "entry": key.rel(), "key": key.parts(), "view_key": "v1", "weights": "pretrained",
               "weights_path": None, "failed_images": []}
    old_record = make_record(SingleLabel(["a", "b"])).to_dict()

    @dg.asset
    def activations():
        return old_ref

    @dg.asset
    def finetuned():
        return old_record

    @dg.asset
    def image_manifest():
        return ["not", "a", "record"]

    @dg.asset
    def report(activations, finetuned):
        return {"ref": require_typed(activations, ActivationsRef, "activations").view_key,
                "head": require_typed(finetuned, StageRecord, "finetuned").head}

    storage, home = tmp_path / "storage", tmp_path / "home"
    home.mkdir()
    resources = {"io_manager": dg.FilesystemIOManager(base_dir=str(storage))}
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        assert dg.materialize([activations, finetuned, image_manifest], instance=instance, resources=resources).success
        (storage / "compute.out").write_text("a log, not a pickle")

        class Opens:  # a pickle that would run code (create a file) when loaded: never run, left alone
            def __reduce__(self):
                return open, (str(tmp_path / "ran"), "w")

        (storage / "crafted").write_bytes(pickle.dumps(Opens()))
        with pytest.raises(TypeError, match="stored as a dict by an earlier version; run `python -m precompute.migrate"):
            dg.materialize([report, activations.to_source_asset(), finetuned.to_source_asset()], instance=instance,
                           resources=resources, selection=[report])

        stored = {p.name: p.read_bytes() for p in storage.iterdir()}
        assert migrate_main([str(storage), "--dry-run"]) == 0
        assert {p.name: p.read_bytes() for p in storage.iterdir()} == stored  # a dry run changes nothing
        changed = dict(migrate_materializations(storage))
        assert changed == {str(storage / "activations"): "ActivationsRef (was a dict)",
                           str(storage / "finetuned"): "StageRecord (was a dict)"}
        assert migrate_materializations(storage) == []  # once: nothing left to migrate
        assert (storage / "image_manifest").read_bytes() == stored["image_manifest"]  # not a record: left alone
        assert (storage / "compute.out").read_bytes() == stored["compute.out"]
        assert (storage / "crafted").read_bytes() == stored["crafted"] and not (tmp_path / "ran").exists()

        result = dg.materialize([report, activations.to_source_asset(), finetuned.to_source_asset()],
                                instance=instance, resources=resources, selection=[report])
        assert result.output_for_node("report") == {"ref": "v1", "head": HeadConfig(xtra_fc=(8,))}

    # a typed pickle of the earlier layout is rewritten in this one
    ref = ActivationsRef("/store", key.rel(), key, "v1")
    object.__setattr__(ref, "key", key.parts())
    (storage / "activations").write_bytes(pickle.dumps(ref))
    assert migrate_materializations(storage) == [(str(storage / "activations"),
                                                  "ActivationsRef (was the layout with a dict key)")]
    assert b"CacheKey" in (storage / "activations").read_bytes() and migrate_materializations(storage) == []
