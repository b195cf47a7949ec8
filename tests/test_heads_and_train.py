import numpy as np
import pytest
import torch
from torch import nn

from precompute.heads import Head, build_head
from precompute.train import (ArrayRows, ConfigError, check_precompute_augment, differential_lrs,
                              fit_head_on_cache, group_lrs)


def test_head_takes_spatial_maps_and_pooled_vectors():
    head = Head(16, 3).eval()
    fmap = torch.randn(4, 16, 5, 5)
    pooled = torch.cat([fmap.amax((2, 3)), fmap.mean((2, 3))], 1)
    assert torch.allclose(head(fmap), head(pooled), atol=1e-6)
    linears = [m for m in head.classifier if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(32, 512), (512, 3)]
    drops = [m.p for m in head.classifier if isinstance(m, nn.Dropout)]
    assert drops == [0.25, 0.5]  # fastai 0.7's defaults


def test_head_options_and_errors():
    head = Head(8, 2, ps=0.1, xtra_fc=[64, 32])
    assert [m.out_features for m in head.classifier if isinstance(m, nn.Linear)] == [64, 32, 2]
    with pytest.raises(ValueError, match="one dropout per block"):
        Head(8, 2, ps=[0.1], xtra_fc=[64])
    custom = build_head(8, 2, custom=lambda n_in, n_out: nn.Linear(n_in, n_out))
    assert isinstance(custom.classifier, nn.Linear) and custom.classifier.in_features == 16
    with pytest.raises(ValueError, match="package.module:function"):
        build_head(8, 2, custom="no_colon_here")


def test_precompute_with_augment_is_a_config_error():
    with pytest.raises(ConfigError, match="augment=False"):
        check_precompute_augment(precompute=True, augment=True)
    check_precompute_augment(precompute=True, augment=False)
    check_precompute_augment(precompute=False, augment=True)


def test_group_learning_rates():
    assert group_lrs(0.01, 3) == [0.01, 0.01, 0.01]
    assert group_lrs([1e-4, 1e-3, 1e-2], 3) == [1e-4, 1e-3, 1e-2]
    with pytest.raises(ConfigError, match="exactly 3"):
        group_lrs([1e-3, 1e-2], 3)
    assert differential_lrs(0.09, 3) == pytest.approx([0.01, 0.03, 0.09])


def _blobs(seed, n=200, d=20):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = rng.normal(0, 3, (3, d))
    return (centers[y] + rng.normal(0, 1, (n, d))).astype("float32"), y


def test_head_on_cache_learns_and_is_reproducible():
    x, y = _blobs(0)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        head = Head(10, 3)
        runs.append(fit_head_on_cache(head, ArrayRows(x[:150], y[:150]), ArrayRows(x[150:], y[150:]),
                                      epochs=4, lr=1e-2, seed=3))
    assert runs[0][-1]["valid_accuracy"] > 0.9
    assert [r["valid_loss"] for r in runs[0]] == [r["valid_loss"] for r in runs[1]]
