"""lr_find as fastai's (smoothed, no early stop on a trained net, suggestion inside the sweep),
schedules that say what they run, and BatchNorm modes during image stages (issue 13, items 3-4)."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

from precompute.backbone import load_backbone, transform_for
from precompute.stages.cache_fill import precompute
from precompute.stages.head_stage import train_head_on_cache
from precompute.stages.image_stage import lr_find_on_images
from precompute.archs import freeze_to
from precompute.manifest import build_manifest
from precompute.heads import HeadConfig, build_head
from precompute.store import ActivationStore
from precompute.lr_find import LR_FIND_MIN_IT, lr_find
from precompute.train import ArrayRows, Schedule, fit, fit_head_on_cache


def separable(n: int = 256, d: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 4.0, -4.0)  # classes 8 standard deviations apart on one axis
    return x, y


@pytest.fixture(scope="module")
def trained_head():
    x, y = separable()
    train, valid = ArrayRows(x[:192], y[:192]), ArrayRows(x[192:], y[192:])
    torch.manual_seed(0)
    head = build_head(8, 2, xtra_fc=[32], ps=0.0)  # no dropout: the trained head's losses are near zero
    history = fit_head_on_cache(head, train, valid, epochs=5, lr=1e-2, batch_size=16)
    assert history[-1]["valid_accuracy"] == 1.0 and history[-1]["valid_loss"] < 0.25  # a trained head
    return head, train


def test_lr_find_on_a_trained_head_runs_the_sweep_and_suggests_inside_it(trained_head):
    head, train = trained_head
    before = {k: v.clone() for k, v in head.state_dict().items()}
    start, end = 1e-7, 10.0
    result = lr_find(head, [head], [1.0], lambda gen: train.batches(16, gen), start, end, num_it=50,
                     freeze_bn_stats=False)
    # the near-zero losses of the first iterations are no divergence: the sweep goes on well past them
    assert result.iterations == len(result.losses) >= 25
    assert result.lrs[-1] > 1e-3
    assert result.suggestion is not None and start <= result.suggestion <= end
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # model restored


def test_lr_find_does_not_stop_when_its_first_batch_happens_to_be_an_easy_one(trained_head):
    # what stopped lr_find_unfrozen after 2-3 of 50 iterations: on a trained head the first batch's
    # loss is near zero, the next ones are not, and the smoothed loss passes 4x that "best" at once
    head, train = trained_head
    with torch.no_grad():
        margin = head.eval()(train.x).softmax(1)[torch.arange(len(train.y)), train.y.long()]
    order = margin.argsort(descending=True)
    easy, rest = order[:16], order[16:][torch.randperm(len(order) - 16, generator=torch.Generator().manual_seed(0))]
    batches = [(train.x[easy], train.y[easy])] + [(train.x[rest[i:i + 16]], train.y[rest[i:i + 16]])
                                                   for i in range(0, len(rest), 16)]
    result = lr_find(head, [head], [1.0], lambda gen: batches, 1e-7, 10.0, num_it=50, freeze_bn_stats=False)
    assert result.iterations >= 40  # counting the best from the first iteration on stopped at 11
    assert result.suggestion is None or 1e-7 <= result.suggestion <= 10.0


def test_lr_find_smooths_with_bias_correction():
    x, y = separable(64)
    head = build_head(8, 2, xtra_fc=[8], ps=0.0)
    rows = ArrayRows(x, y)
    result = lr_find(head, [head], [1.0], lambda gen: rows.batches(64, gen), 1e-9, 1e-8, num_it=3,
                     freeze_bn_stats=False)
    # three near-identical raw losses at tiny rates: the bias-corrected average equals the raw loss
    # from the first point on (an uncorrected one would start at 2% of it)
    assert result.losses[0] == pytest.approx(result.losses[-1], rel=1e-3)


def test_lr_find_suggestion_never_leaves_the_sweep_when_the_loss_blows_up_at_once():
    x, y = separable(128)
    rows = ArrayRows(x, y)
    for seed in range(3):
        torch.manual_seed(seed)
        head = build_head(8, 2, xtra_fc=[32])
        start, end = 1e-1, 1e6  # diverges within a few steps
        result = lr_find(head, [head], [1.0], lambda gen: rows.batches(16, gen), start, end, num_it=50,
                         seed=seed, freeze_bn_stats=False, min_it=0)
        assert result.suggestion is None or start <= result.suggestion <= end


def test_lr_find_on_images_after_a_trained_head(tmp_path, tiny_tree):
    manifest = build_manifest(tiny_tree)
    bb = load_backbone("tf_efficientnet_lite0")
    ts = transform_for(bb.spec, 32)
    entry, _, _ = precompute(manifest, ActivationStore(str(tmp_path / "store")), bb, ts)
    head = train_head_on_cache(entry, manifest, bb, ts, HeadConfig(xtra_fc=[32]),
                               epochs=4, lr=1e-2, batch_size=8)
    num_it = LR_FIND_MIN_IT + 6
    result = lr_find_on_images(head, manifest, 0, batch_size=4, num_it=num_it,
                               augmentation={"preset": "side_on"})
    assert result.iterations > LR_FIND_MIN_IT  # no stop during the first iterations
    assert result.suggestion is None or 1e-7 <= result.suggestion <= 10.0
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:]))


def test_one_cycle_too_short_warns_and_says_what_it_runs(caplog):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with caplog.at_level(logging.WARNING, logger="precompute.train"):
        sched = Schedule("one_cycle", epochs=1).build(opt, 2)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    msg = warned[0].getMessage()
    assert "one_cycle" in msg and "2 step" in msg and "constant learning rate" in msg and "0.1" in msg
    lrs = []
    for _ in range(2):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.1, 0.1]  # what the warning says it runs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="precompute.train"):
        Schedule("one_cycle", epochs=1).build(opt, 4)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def _bn_model():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
    middle = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU())
    head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    return nn.Sequential(body, middle, head), [body, middle, head]


@pytest.mark.parametrize("freeze_bn_stats, head_learns", [(True, False), (False, True)])
def test_frozen_groups_bn_stats_stay_fixed_the_heads_learn_only_without_freeze_bn_stats(freeze_bn_stats,
                                                                                       head_learns):
    model, groups = _bn_model()
    freeze_to(groups, 2)  # body and middle frozen, the head trains
    x = torch.randn(16, 6) * 3 + 2
    y = torch.randint(0, 2, (16,))
    bns = [g[1] for g in groups]
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    fit(model, groups, [0.0, 0.0, 1e-2], lambda gen: [(x, y)], lambda: [(x, y)], 1,
        Schedule("constant", epochs=1), freeze_bn_stats=freeze_bn_stats)
    changed = [not torch.equal(bn.running_mean, m) or not torch.equal(bn.running_var, v)
               for bn, (m, v) in zip(bns, before)]
    assert changed == [False, False, head_learns]  # frozen groups' stats always fixed


def test_freeze_bn_stats_also_keeps_a_trainable_body_groups_stats():
    model, groups = _bn_model()
    freeze_to(groups, 1)  # the middle body group trains too (fine-tuning)
    x, y = torch.randn(16, 6) * 3 + 2, torch.randint(0, 2, (16,))
    bns = [g[1] for g in groups]
    before = [bn.running_mean.clone() for bn in bns]
    fit(model, groups, [0.0, 1e-3, 1e-2], lambda gen: [(x, y)], lambda: [(x, y)], 1,
        Schedule("constant", epochs=1), freeze_bn_stats=True)
    assert [not torch.equal(bn.running_mean, m) for bn, m in zip(bns, before)] == [False, False, False]
    model, groups = _bn_model()
    freeze_to(groups, 1)
    bns = [g[1] for g in groups]
    before = [bn.running_mean.clone() for bn in bns]
    fit(model, groups, [0.0, 1e-3, 1e-2], lambda gen: [(x, y)], lambda: [(x, y)], 1,
        Schedule("constant", epochs=1), freeze_bn_stats=False)
    assert [not torch.equal(bn.running_mean, m) for bn, m in zip(bns, before)] == [False, True, True]


def test_lr_find_head_sweeps_its_own_configured_head_and_head_on_cache_takes_only_a_matching_rate():
    """No asset reads another's config: lr_find_head declares the head it sweeps (head_on_cache's
    defaults), its result carries it, and head_on_cache refuses a suggested rate for another head."""
    from assets.training import HeadOnCacheConfig, LrFindHeadConfig
    from precompute.errors import ConfigError
    from precompute.lr_find import LRFindResult

    assert LrFindHeadConfig().head_config() == HeadOnCacheConfig().head_config() == HeadConfig(None, [512], None)
    head = HeadConfig([0.1, 0.2, 0.3], [64, 16], None)
    assert LrFindHeadConfig(ps=[0.1, 0.2, 0.3], xtra_fc=[64, 16], num_it=10).head_config() == head
    finder = LRFindResult([1e-4, 1e-3], [1.0, 0.5], {"valley": 2e-3}, head=head)
    same = HeadOnCacheConfig(ps=[0.1, 0.2, 0.3], xtra_fc=[64, 16], lr_from_finder=True)
    assert same.stage(finder).lr == 2e-3
    with pytest.raises(ConfigError, match="give lr_find_head the same ps, xtra_fc and custom_head"):
        HeadOnCacheConfig(lr_from_finder=True).stage(finder)  # the default head: not the one swept
    assert HeadOnCacheConfig(lr=1e-2).stage(finder).lr == 1e-2  # without lr_from_finder the finder is not used
