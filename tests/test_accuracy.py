"""The pretrained default's cached activations are good features on real photos (the issue's bar: 97%)."""

import pytest

from precompute.backbone import load_backbone, transform_for
from precompute.heads import HeadConfig
from precompute.manifest import build_manifest
from precompute.stages.cache_fill import precompute
from precompute.stages.head_stage import train_head_on_cache
from precompute.store import ActivationStore


@pytest.mark.slow
def test_head_on_cached_lite0_activations_reaches_97_percent_on_dogscats(tmp_path, dogscats):
    manifest = build_manifest(dogscats)
    bb = load_backbone("tf_efficientnet_lite0")
    ts = transform_for(bb.spec)  # 224 px, mean = std = 0.5 from the arch record
    entry, stats, _ = precompute(manifest, ActivationStore(str(tmp_path / "store")), bb, ts, batch_size=32)
    assert stats.computed == 560
    record = train_head_on_cache(entry, manifest, bb, ts, HeadConfig(),
                                 epochs=5, lr=3e-3, batch_size=64, seed=0)
    accuracy = record.history[-1]["valid_accuracy"]
    print(f"dogscats valid accuracy, head on cached lite0 activations: {accuracy:.4f}")
    assert accuracy >= 0.97
