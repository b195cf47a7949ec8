"""precompute.Learner on real photos and the real offline backbone (tf_efficientnet_lite0, 128 px)."""

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from precompute import Learner
from precompute.cli import main as cli
from precompute.stages.head_stage import train_head_on_cache
from precompute.train import ConfigError, FitOptions, Schedule
from tests.conftest import copy_tree

ARCH, SIZE, BS = "tf_efficientnet_lite0", 128, 16


@pytest.fixture(scope="module")
def tree(tmp_path_factory, dogscats):
    return copy_tree(dogscats, tmp_path_factory.mktemp("learner") / "images", {"train": 16, "valid": 8})


@pytest.fixture(scope="module")
def store(tree):
    return tree.parent / "store"


def new_learner(tree, store, **kw) -> Learner:
    return Learner.pretrained(ARCH, tree, size=SIZE, store=store, bs=BS, verbose=False, **kw)


@pytest.fixture(scope="module")
def learn(tree, store):
    """The first Learner on this store: it computes every row, then trains its head on the cache."""
    learn = new_learner(tree, store)
    assert (learn.precompute_stats.computed, learn.precompute_stats.reused) == (48, 0)
    learn.fit(3e-3, 3)
    return learn


def test_head_trains_on_the_cache_and_the_body_never_runs(learn, tree, store):
    assert learn.validate().accuracy >= 0.75  # 16 validation photos, chance is 0.5
    again = new_learner(tree, store)
    assert (again.precompute_stats.computed, again.precompute_stats.reused) == (0, 48)  # read back, not recomputed
    calls = []
    hook = again.backbone.body.register_forward_hook(lambda *_: calls.append(1))
    try:
        again.fit(3e-3, 3)
    finally:
        hook.remove()
    assert calls == [] and again.record.stage == "head_on_cache"
    # the same numbers as the recipe function the Dagster asset calls
    same = train_head_on_cache(again._entry, again.manifest, again.backbone, again.transform,
                               again.head_config, lr=3e-3, batch_size=BS, seed=0,
                               schedule=Schedule("constant", epochs=3))
    assert [r["valid_loss"] for r in again.record.history] == [r["valid_loss"] for r in same.history]


def test_fit_follows_fastai_schedules(tree, store):
    learn = new_learner(tree, store)
    learn.fit(1e-3, 2, cycle_len=1, cycle_mult=2)  # SGDR: cycles of 1 and 2 epochs
    assert len(learn.record.history) == 3 and learn.record.schedule.kind == "sgdr"
    learn.fit(1e-3, 2)  # no cycle_len: constant rate, n_cycle epochs
    assert len(learn.record.history) == 2 and learn.record.schedule.kind == "constant"
    learn.fit_one_cycle(2, 1e-3)
    assert learn.record.schedule.kind == "one_cycle"
    assert [h["stage"] for h in learn.history] == ["head_on_cache"] * 7
    learn.fit_options = FitOptions("sgd", momentum=0.9, weight_decay=0.0)  # fastai 0.7's optimizer, for every fit
    learn.fit(1e-2, 1)
    assert learn.record.fit_options.optimizer == "sgd" and len(learn.history) == 8
    with pytest.raises(ConfigError, match="cycle_mult needs cycle_len"):
        learn.fit(1e-3, 2, cycle_mult=2)


def test_unfreeze_switches_precompute_off_and_says_so(tree, store, caplog):
    learn = new_learner(tree, store)
    learn.freeze_to(-1)  # the head only: the cache still serves
    assert learn.precompute and not [r for r in caplog.records if r.name == "precompute.learner"]
    with caplog.at_level(logging.WARNING, logger="precompute.learner"):
        learn.freeze_to(1)
    assert not learn.precompute and learn.frozen == 1
    assert "precompute is now False" in caplog.text and "groups 1..2 now train" in caplog.text
    assert "groups 1, 2 train" in repr(learn) and "inputs: images" in repr(learn)
    with pytest.raises(ConfigError, match=r"learn\.freeze\(\)"):
        learn.precompute = True
    learn.freeze()
    learn.precompute = True  # the body is still the pretrained one: back to the cache
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="precompute.learner"):
        learn.unfreeze()
    assert not learn.precompute and learn.frozen == 0 and "precompute is now False" in caplog.text


def test_augmentation_with_precompute_is_an_error_naming_both(tree, store, tmp_path):
    with pytest.raises(ConfigError, match=r"aug_tfms.*precompute=True") as err:
        Learner.pretrained(ARCH, tree, precompute=True, aug_tfms="side_on", store=tmp_path / "s", size=SIZE)
    assert "precompute = False" in str(err.value) and not (tmp_path / "s").exists()  # nothing done
    learn = new_learner(tree, store)
    with pytest.raises(ConfigError, match=r"aug_tfms.*precompute=True"):
        learn.aug_tfms = "side_on"
    with pytest.raises(ConfigError, match="basic, side_on, top_down"):
        learn.aug_tfms = "sideways"
    learn.precompute = False
    learn.aug_tfms = {"preset": "top_down", "max_zoom": 1.2}
    with pytest.raises(ConfigError, match=r"aug_tfms.*precompute=True"):
        learn.precompute = True
    assert not learn.precompute and "preset=top_down, max_zoom=1.2" in repr(learn)


def test_learning_rates_in_fastai_forms(tree, store):
    learn = new_learner(tree, store, precompute=False)
    assert learn.lrs_for(1e-2) == [0.0, 0.0, 1e-2]  # a new Learner trains the head only
    learn.unfreeze()
    assert learn.lrs_for(1e-2) == [1e-2] * 3
    assert learn.lrs_for([1e-4, 1e-3, 1e-2]) == [1e-4, 1e-3, 1e-2]
    assert learn.lrs_for(np.array([1e-4, 1e-3, 1e-2])) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert learn.lrs_for(slice(1e-4, 1e-2)) == pytest.approx([1e-4, 1e-3, 1e-2])  # geometric
    assert learn.lrs_for(slice(1e-2)) == pytest.approx([1e-3, 1e-3, 1e-2])  # fastai v1's slice(hi)
    learn.freeze_to(1)
    assert learn.lrs_for(slice(1e-4, 1e-2)) == pytest.approx([0.0, 1e-4, 1e-2])
    with pytest.raises(ConfigError, match="exactly 3"):
        learn.lrs_for([1e-3, 1e-2])


def test_repr_states_what_trains_and_where_inputs_come_from(learn):
    text = repr(learn)
    assert "inputs: cached activations: the body does not run" in text
    assert "group 2 train, 2 frozen" in text
    rows = [line for line in text.splitlines() if " params " in line]
    assert [r.split()[1] for r in rows] == ["body", "body", "head"]
    assert ["trains" if "trains" in r else "frozen" for r in rows] == ["frozen", "frozen", "trains"]
    assert "stage: head_on_cache, epochs: 3" in text


def test_lr_find_tta_and_interpret(learn, tree, store):
    finder = new_learner(tree, store).lr_find(num_it=30)  # a new head, as in the lesson: the loss falls
    assert finder.suggestion is not None and len(finder.lrs) == len(finder.losses) > 5
    fig = finder.plot()
    assert isinstance(fig, Figure) and fig.axes[0].get_xscale() == "log"
    probs, y = learn.tta(n_aug=2)
    assert probs.shape == (16, 2) and np.allclose(probs.sum(1), 1) and y.shape == (16,)
    interp = learn.interpret()
    cm = interp.confusion_matrix()
    assert cm.shape == (2, 2) and cm.sum() == 16 and np.trace(cm) / 16 == interp.accuracy
    assert sum(n for _, _, n in interp.most_confused()) == 16 - np.trace(cm)
    worst = interp.top_losses(3)
    assert list(worst.columns) == ["path", "actual", "predicted", "probability", "loss"] and len(worst) == 3
    assert worst["loss"].is_monotonic_decreasing
    assert isinstance(interp.plot_confusion_matrix(), Figure) and isinstance(interp.plot_top_losses(2), Figure)


def test_images_continue_from_the_cache_head_then_unfreeze_trains_every_group(learn):
    on_cache = learn.validate()
    learn.precompute = False  # the same network, now fed from images: the same validation numbers
    on_images = learn.validate()
    assert on_images.accuracy == on_cache.accuracy
    assert on_images.loss == pytest.approx(on_cache.loss, rel=1e-3)
    learn.aug_tfms = "side_on"
    learn.fit(1e-3, 1)
    assert learn.record.stage == "head_augmented" and learn.record.augment
    assert [g["lr"] for g in learn.record.groups] == [0.0, 0.0, 1e-3]
    learn.unfreeze()
    learn.fit(slice(1e-5, 1e-4), 1, cycle_len=1)
    assert learn.record.stage == "finetuned" and learn.record.freeze == 0
    assert [g["lr"] for g in learn.record.groups] == pytest.approx([1e-5, 10 ** -4.5, 1e-4])
    learn.freeze()
    learn.aug_tfms = None
    with pytest.raises(ConfigError, match="body was trained"):  # the cache holds another body's activations
        learn.precompute = True


def test_export_predict_and_save_load_round_trip(learn, tree, store, tmp_path):
    paths = sorted(str(p) for p in (tree / "valid").rglob("*.jpg"))
    probs = learn.predict(paths)
    assert probs.shape == (16, 2)
    model = learn.export(tmp_path / "model.pt")
    assert torch.load(model, weights_only=True)["classes"] == ["cats", "dogs"]
    # the CLI reads the exported file (precompute.predict.load_model -> predict_folder)
    assert cli(["predict", "--model", str(model), "--images", str(tree / "valid"),
                "--out", str(tmp_path / "preds.csv")]) == 0
    table = pd.read_csv(tmp_path / "preds.csv").set_index("path")
    assert np.allclose(table.loc[paths, ["prob_cats", "prob_dogs"]].to_numpy(), probs, atol=1e-5)
    saved = learn.save(tmp_path / "learner.pt")
    other = new_learner(tree, store, precompute=False)
    other.load(saved)
    assert other.frozen == learn.frozen and other.precompute == learn.precompute
    assert other.aug_tfms == learn.aug_tfms and other.record.stage == learn.record.stage
    assert np.allclose(other.predict(paths), probs, atol=1e-6)
    smaller = torch.load(saved, weights_only=True)
    smaller["transform"]["size"] = 96
    torch.save(smaller, tmp_path / "smaller.pt")
    with pytest.raises(ConfigError, match="transform is"):
        other.load(tmp_path / "smaller.pt")
