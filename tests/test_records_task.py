"""Typed stage records and tasks: a record survives a file (weights-only) and a pickle, an old flat
dict still loads, and a Task decides loss, activation, decoding and metrics for its kind."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from precompute.records import StageRecord, checked_record
from precompute.stages.head_stage import HeadStage
from precompute.stages.image_stage import ImageStage
from precompute.task import MultiLabel, SingleLabel, Task
from precompute.train import (ArrayRows, ConfigError, FitOptions, Schedule, _optimizer, evaluate_batches, fit,
                              predict_proba)
from precompute.transforms import TransformSpec


def make_record(task: Task) -> StageRecord:
    return StageRecord(stage="finetuned", arch="resnet18", xtra_cut=0, task=task,
                       head_config={"ps": None, "xtra_fc": [8], "custom": None}, transform=TransformSpec(size=32),
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
    pickled = copy.deepcopy(record)  # the pickle protocol Dagster's default IO manager uses
    assert pickled.task == task and pickled.schedule == record.schedule and pickled.history == record.history
    assert torch.equal(pickled.state_dict["1.w"], record.state_dict["1.w"])
    assert StageRecord.coerce(record) is record


def test_old_flat_dict_records_still_load():
    old = {"stage": "finetuned", "arch": "resnet18", "xtra_cut": 0, "classes": ["a", "b", "c"], "multilabel": True,
           "label_delim": " ", "thresholds": [0.2, 0.5, 0.9], "head_config": {"ps": None, "xtra_fc": [8], "custom": None},
           "transform": TransformSpec(size=32).key(), "weights_id": "random", "state_dict": {}, "history": [],
           "schedule": {"kind": "one_cycle", "epochs": 2, "cycles": 1, "cycle_len": 1, "cycle_mult": 1,
                        "warmup": 0.05, "pct_start": 0.25}, "mlflow_run_id": "r1", "lr": 1e-3, "streamed": False}
    record = checked_record(old, "old file")
    assert isinstance(record.task, MultiLabel) and record.thresholds == (0.2, 0.5, 0.9)
    assert record.schedule.epochs == 2 and record.mlflow_run_id == "r1" and record.lr == 1e-3
    single = StageRecord.from_dict({**old, "multilabel": False, "label_delim": None, "thresholds": None})
    assert isinstance(single.task, SingleLabel) and single.thresholds is None
    with pytest.raises(ValueError, match="is not a stage record"):
        checked_record({"arch": "resnet18"}, "half a file")


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
    assert m["accuracy"] == pytest.approx(2 / 3) and m["n"] == 3
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
    assert tuned.metrics(probs, y)["exact_match"] == 1.0 and task.metrics(probs, y)["exact_match"] == 0.25
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
        HeadStage({"ps": None, "xtra_fc": [8], "custom": None}, precompute=False)
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
    for bad, says in [(dict(optimizer="adam"), "choose adamw or sgd"), (dict(momentum=1.0), "momentum 1.0"),
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
