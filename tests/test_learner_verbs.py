"""fastai's verbs on the Learner (issue 20): model, get_preds, recorder, fine_tune, set_size, show_batch,
mixed precision, the progress bar inside an epoch, BatchNorm policy, lr_find's suggestion functions,
and one clear error when precompute comes back after fine-tuning. Real photos, the offline backbone."""

import io

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from precompute import Learner
from precompute.callbacks import ProgressBar
from precompute.lr_find import SUGGESTIONS, suggest
from precompute.rows import labelled_split
from precompute.stages.image_stage import ImageStage, stage_learner
from precompute.train import ConfigError
from tests.conftest import copy_tree

ARCH, SIZE, BS = "tf_efficientnet_lite0", 96, 16


@pytest.fixture(scope="module")
def tree(tmp_path_factory, dogscats):
    return copy_tree(dogscats, tmp_path_factory.mktemp("verbs") / "images", {"train": 16, "valid": 8})


def new_learner(tree, **kw) -> Learner:
    return Learner.pretrained(ARCH, tree, size=SIZE, store=tree.parent / "store", bs=BS, verbose=False, **kw)


@pytest.fixture(scope="module")
def learn(tree):
    learn = new_learner(tree)
    learn.fit_one_cycle(2, 3e-3)
    return learn


def test_model_get_preds_and_recorder(learn, tree):
    assert isinstance(learn.model, nn.Sequential) and learn.model[0] is learn.backbone.body  # nothing copied yet
    on_cache, y = learn.get_preds()
    assert on_cache.shape == (16, 2) and y.shape == (16,) and np.allclose(on_cache.sum(1), 1)
    # the recorder: every batch of the last fit (32 rows / 16 = 2 per epoch), one-cycle's rise and fall
    rec = learn.recorder
    assert len(rec.lrs) == len(rec.losses) == 4 and len(rec.valid_losses) == 2
    assert rec.lrs[0] < max(rec.lrs) and rec.lrs[-1] < max(rec.lrs)
    for fig in (rec.plot_loss(), rec.plot_lr()):
        assert isinstance(fig, Figure) and fig.axes[0].lines
    learn.precompute = False
    on_images, y2 = learn.get_preds()
    paths = list(labelled_split(learn.manifest, learn.task, "valid")["path"])
    assert np.array_equal(y, y2)
    assert np.allclose(on_images, learn.predict(paths), atol=1e-6)  # get_preds is predict on the valid split
    assert np.allclose(on_images, on_cache, atol=1e-3)  # the cache serves the same numbers as the images
    learn.precompute = True


def test_set_size_changes_the_cache_key_and_the_image_input_size(tree):
    learn = new_learner(tree)
    small = learn.entry.key
    learn.set_size(64)
    assert learn.entry.key.digest() != small.digest() and learn.transform.size == 64
    assert learn.precompute_stats.computed == 48  # a new entry: every image at the new size
    learn.fit(3e-3, 1)  # the head trains on the 64 px rows
    learn.precompute = False
    seen = []
    hook = learn.model.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        learn.aug_tfms = "side_on"
        record = learn.fit(1e-3, 1)
    finally:
        hook.remove()
    assert record.transform.size == 64 and set(seen) == {(64, 64)}
    # the pipeline's image stage takes its size the same way
    stage = ImageStage("head_augmented", -1, size=80)
    assert stage_learner(record, learn.manifest, stage).transform.size == 80


def test_fine_tune_runs_the_frozen_then_the_unfrozen_phase_and_precompute_cannot_come_back(tree):
    learn = new_learner(tree)
    learn.fine_tune(1, base_lr=2e-3, freeze_epochs=1)
    assert [h["stage"] for h in learn.history] == ["head_on_cache", "finetuned"]  # the frozen phase on the cache
    assert learn.frozen == 0 and not learn.precompute
    lo, hi = 2e-3 / 2 / 100, 2e-3 / 2  # fastai: base_lr halved, spread over the groups down to 1/lr_mult
    assert [g["lr"] for g in learn.record.groups] == pytest.approx([lo, (lo * hi) ** 0.5, hi])
    learn.aug_tfms = "side_on"  # even with augmentation on and every group training: one error, the real blocker
    with pytest.raises(ConfigError, match=r"body was trained on images \(stage finetuned\)") as err:
        learn.precompute = True
    assert "would not help" in str(err.value) and "Learner.pretrained" in str(err.value)


def test_show_batch_shows_what_the_next_fit_sees(learn):
    fig = learn.show_batch(4)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 4 and {ax.get_title() for ax in shown} <= {"cats", "dogs"}
    assert shown[0].images[0].get_array().shape == (SIZE, SIZE, 3)


def test_to_bf16_trains_under_autocast_on_the_cpu(tree):
    learn = new_learner(tree).to_bf16()
    dtypes = []
    hook = learn.model[1].register_forward_hook(lambda m, i, out: dtypes.append((m.training, out.dtype)))
    try:
        learn.fit(3e-3, 1)
    finally:
        hook.remove()
    assert (True, torch.bfloat16) in dtypes and (False, torch.float32) in dtypes  # train in bf16, validate in fp32
    assert np.isfinite(learn.record.history[-1]["valid_loss"])
    assert learn.to_fp16().precision == "fp16" and learn.to_fp32().precision is None


def test_progress_bar_moves_inside_each_epoch(tree, capsys):
    learn = new_learner(tree)
    learn.progress = True  # verbose Learners show it
    learn.fit(3e-3, 1)
    assert "head_on_cache epoch 0" in capsys.readouterr().err
    learn.progress = False
    drawn = io.StringIO()
    learn.fit(3e-3, 1, cbs=[ProgressBar("head", file=drawn, mininterval=0)])  # every batch drawn
    assert "head epoch 0:  50%" in drawn.getvalue() and "2/2" in drawn.getvalue() and "loss=" in drawn.getvalue()


@pytest.mark.parametrize("freeze_bn_stats", [True, False])
def test_batchnorm_policy_is_the_pipelines_setting(tree, freeze_bn_stats):
    learn = new_learner(tree, precompute=False)
    learn.unfreeze()
    learn.freeze_bn_stats = freeze_bn_stats
    bns = lambda: [m for m in learn.model[0].modules() if isinstance(m, nn.BatchNorm2d)]  # noqa: E731
    before = [bn.running_mean.clone() for bn in bns()]
    learn.fit(1e-4, 1)
    changed = sum(not torch.equal(bn.running_mean, m) for bn, m in zip(bns(), before))
    assert changed == (0 if freeze_bn_stats else len(before))  # fastai's rule (False) trains every one
    assert learn.record.freeze_bn_stats is freeze_bn_stats
    stage = ImageStage("finetuned", 0, freeze_bn_stats=freeze_bn_stats, train_bn=True)
    staged = stage_learner(learn.record, learn.manifest, stage)
    assert (staged.freeze_bn_stats, staged.train_bn) == (freeze_bn_stats, True)


def test_lr_find_offers_fastais_suggestion_functions(learn):
    fresh = Learner.pretrained(ARCH, learn.manifest, size=SIZE, store=learn.store, bs=BS, verbose=False)
    result = fresh.lr_find(num_it=40)
    assert result.method == "valley" and set(result.suggestions) == set(SUGGESTIONS)
    assert all(result.lrs[0] <= lr <= result.lrs[-1] for lr in result.suggestions.values())
    assert result.suggestion == result.suggestions["valley"]
    assert fresh.lr_find(num_it=40, suggest="steep").suggestion == pytest.approx(result.suggestions["steep"])


def test_suggestion_functions_on_a_known_curve():
    lrs = list(np.geomspace(1e-6, 1, 60))
    x = np.log10(lrs)
    losses = list(1 / (1 + np.exp(4 * (x + 3))) + np.where(x > -1, (x + 1) ** 2 * 4, 0))  # falls near 1e-3, rises past 0.1
    result = suggest(lrs, losses)
    steep = result.suggestions["steep"]
    assert 3e-4 < steep < 3e-3  # the sigmoid's steepest point is 1e-3
    assert result.suggestions["minimum"] == pytest.approx(lrs[int(np.argmin(losses[6:-5])) + 6] / 10)
    assert 1e-5 < result.suggestions["valley"] < 1e-1
    flat = suggest(lrs, list(np.linspace(1, 2, 60)))  # the loss never fell: no suggestion at all
    assert flat.suggestion is None and all(v is None for v in flat.suggestions.values())
    with pytest.raises(ConfigError, match="valley, slide, minimum, steep"):
        suggest(lrs, losses, "fastest")
