"""The fastai recipe's parts: schedules, learning rates per group, lr_find, TTA, predict, reproducibility."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from precompute.backbone import load_backbone, transform_for
from precompute.inference import evaluate_on_images, rebuild
from precompute.records import ActivationsRef, save_model
from precompute.rows import image_loader, labelled_split
from precompute.stages.cache_fill import open_entry, precompute
from precompute.stages.head_stage import head_on_cache_cached, lr_find_on_cache, train_head_on_cache
from precompute.stages.image_stage import stage_lrs, train_on_images
from precompute.transforms import eval_transform
from precompute.archs import freeze_to
from precompute.cli import main as cli
from precompute.manifest import build_manifest
from precompute.heads import HeadConfig
from precompute.predict import load_model, predict_folder
from precompute.store import ActivationStore
from precompute.lr_find import lr_find
from precompute.train import ConfigError, Schedule, group_lrs


def lrs_over(schedule: Schedule, steps_per_epoch: int, base: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    sched = schedule.build(opt, steps_per_epoch)
    out = []
    for _ in range(steps_per_epoch * schedule.total_epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_one_cycle_follows_its_definition():
    lrs = lrs_over(Schedule("one_cycle", epochs=2), steps_per_epoch=50, base=0.1)
    peak = int(0.25 * 100) - 1
    assert lrs[0] == pytest.approx(0.1 / 25)           # starts at max_lr / div_factor
    assert lrs[peak] == pytest.approx(0.1)             # reaches max_lr after pct_start
    assert max(lrs) == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4, rel=0.05)  # ends near max_lr / (div * final_div)


def test_sgdr_warms_up_then_restarts_with_longer_cycles():
    s = Schedule("sgdr", cycles=3, cycle_len=1, cycle_mult=2, warmup=0.1)
    assert s.total_epochs == 1 + 2 + 4                 # fastai: fit(lr, 3, cycle_len=1, cycle_mult=2)
    lrs = lrs_over(s, steps_per_epoch=20, base=1.0)
    warm, t0 = 2, 20
    assert lrs[:warm] == pytest.approx([0.01] * warm)  # fastai 0.7's warm-up at lr/100
    for t in (0, 5, 10, 19):                           # cosine from the base within the first cycle
        assert lrs[warm + t] == pytest.approx(0.5 * (1 + math.cos(math.pi * t / t0)))
    assert lrs[warm + t0] == pytest.approx(1.0)        # restart
    for t in (10, 20, 39):                             # second cycle twice as long
        assert lrs[warm + t0 + t] == pytest.approx(0.5 * (1 + math.cos(math.pi * t / (2 * t0))))
    assert lrs[warm + 3 * t0] == pytest.approx(1.0)    # third restart


def test_schedule_errors():
    with pytest.raises(ConfigError, match="schedule 'linear': choose one of one_cycle, sgdr, constant"):
        Schedule("linear")
    with pytest.raises(ConfigError, match="cycle_mult 0: use 1 or more"):
        Schedule("sgdr", cycle_mult=0)


def test_group_learning_rates_in_every_form():
    assert group_lrs(0.01, 3) == [0.01] * 3
    assert group_lrs([1e-4, 1e-3, 1e-2], 3) == [1e-4, 1e-3, 1e-2]
    assert group_lrs("1e-4:1e-2", 3) == pytest.approx([1e-4, 1e-3, 1e-2])   # geometric, like fastai's slice
    assert group_lrs(slice(1e-4, 1e-2), 3, frozen=1) == pytest.approx([0.0, 1e-4, 1e-2])
    assert stage_lrs(9e-3, 3, freeze=0) == pytest.approx([1e-3, 3e-3, 9e-3])
    assert stage_lrs(9e-3, 3, freeze=2) == pytest.approx([0.0, 0.0, 9e-3])
    with pytest.raises(ConfigError, match="exactly 3"):
        group_lrs([1e-3, 1e-2], 3)
    with pytest.raises(ConfigError, match="must look like"):
        group_lrs("fast", 3)


def test_freeze_to_and_train_bn():
    groups = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(4, 4, 3)), nn.Linear(4, 2)]
    freeze_to(groups, 1)
    assert [all(p.requires_grad for p in g.parameters()) for g in groups] == [False, True, True]
    freeze_to(groups, 2, train_bn=True)
    assert not groups[0][0].weight.requires_grad and groups[0][1].weight.requires_grad
    assert not any(p.requires_grad for p in groups[1].parameters()) and groups[2].weight.requires_grad
    freeze_to(groups, -1)
    assert [any(p.requires_grad for p in g.parameters()) for g in groups] == [False, False, True]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dogscats):
    from tests.conftest import copy_tree

    root = tmp_path_factory.mktemp("stages")
    tree = copy_tree(dogscats, root / "images", {"train": 8, "valid": 4})
    manifest = build_manifest(tree)
    bb = load_backbone("tf_efficientnet_lite0")
    ts = transform_for(bb.spec, 64)
    entry, _, _ = precompute(manifest, ActivationStore(str(root / "store")), bb, ts)
    head = train_head_on_cache(entry, manifest, bb, ts, HeadConfig(xtra_fc=[32]),
                               epochs=2, lr=1e-2, batch_size=8)
    return root, tree, manifest, bb, ts, entry, head


def test_same_configuration_twice_gives_the_same_metrics(trained):
    _, _, manifest, bb, ts, entry, head = trained
    again = train_head_on_cache(entry, manifest, bb, ts, head.head, epochs=2, lr=1e-2, batch_size=8)
    assert [r["valid_loss"] for r in again.history] == [r["valid_loss"] for r in head.history]
    runs = [train_on_images(head, manifest, "finetuned", Schedule("one_cycle", epochs=1), 1e-3, freeze=0,
                            batch_size=8, seed=5, augmentation={"preset": "side_on"}) for _ in range(2)]
    assert runs[0].history[0]["train_loss"] == runs[1].history[0]["train_loss"]
    assert runs[0].history[0]["valid_loss"] == runs[1].history[0]["valid_loss"]
    assert len(runs[0].history[0]["lr_steps"]) == 2  # 16 images / batch 8: the lr of every step


def test_lr_find_suggests_a_rate_and_restores_the_model(trained):
    _, _, manifest, bb, ts, entry, head = trained
    result = lr_find_on_cache(entry, manifest, bb, ts, head.head, batch_size=4, num_it=40)
    assert 1e-7 <= result.suggestion <= 10 and len(result.lrs) == len(result.losses) > 5
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:]))  # exponential sweep
    _, model, groups = rebuild(head, ts.size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = labelled_split(manifest, head.classes, "train")
    lr_find(model, groups, [0.0, 0.0, 1.0], lambda gen: image_loader(rows, eval_transform(ts), 8, True, gen),
            num_it=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_tta_shapes_and_predict_matches_evaluation(trained, tmp_path):
    root, tree, manifest, bb, ts, entry, head = trained
    probs, targets, tta = evaluate_on_images(head, manifest, tta=3, augmentation={"preset": "side_on"})
    assert probs.shape == tta.shape == (8, 2) and targets.shape == (8,)
    assert np.allclose(tta.sum(1), 1) and not np.allclose(tta, probs)
    # predict on the validation folder with the saved model: the same classes as evaluation
    path = save_model(head, "test", str(tmp_path))
    (tree / "valid" / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    table = predict_folder(load_model(path), tree / "valid")
    bad = table[table["status"] != "ok"]
    assert list(bad["path"].str.endswith("broken.jpg")) == [True] and bad["reason"].iloc[0]
    ok = table[table["status"] == "ok"].set_index("path")
    valid = labelled_split(manifest, head.classes, "valid")
    expected = [head.classes[i] for i in probs.argmax(1)]
    assert list(ok.loc[list(valid["path"]), "predicted"]) == expected
    assert np.allclose(ok.loc[list(valid["path"]), [f"prob_{c}" for c in head.classes]].to_numpy(), probs, atol=1e-5)
    out = tmp_path / "preds.csv"
    assert cli(["predict", "--model", path, "--images", str(tree / "valid"), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 9
    (tree / "valid" / "cats" / "broken.jpg").unlink()


def test_progressive_resizing_continues_from_the_same_weights(trained):
    _, _, manifest, bb, ts, entry, head = trained
    bigger = train_on_images(head, manifest, "finetuned", Schedule("constant", epochs=1), 0.0, freeze=0,
                             batch_size=8, size=96)
    assert bigger.transform.size == 96 and head.transform.size == 64
    # lr 0 changes nothing: the weights carried over are the previous stage's
    assert all(torch.equal(head.state_dict[k], v) for k, v in bigger.state_dict.items()
               if "running" not in k and "num_batches" not in k)


def test_activations_ref_round_trips_and_opens_its_entry(trained):
    import copy

    root, _, _, bb, ts, entry, _ = trained
    ref = ActivationsRef.of(entry, "view-1", failed=[["img-9", "a/b.jpg", "truncated"]])
    assert ref.failed_images == (("img-9", "a/b.jpg", "truncated"),)
    d = ref.to_dict()
    assert d["failed_images"] == [["img-9", "a/b.jpg", "truncated"]] and d["key"] == entry.key.parts()
    # deepcopy: the pickle protocol Dagster's IO manager uses
    assert ActivationsRef.from_dict(d) == ref == copy.deepcopy(ref)
    with pytest.raises(Exception):
        ref.view_key = "other"  # frozen
    store = ActivationStore(str(root / "store"))
    assert open_entry(store, ref).rel == entry.rel
    with pytest.raises(TypeError, match="python -m precompute.migrate"):
        open_entry(store, d)  # a dict is what an earlier version stored: migrated once, never read as is
    assert ref.key.transform == ts.resolved() and ref.key == entry.key and ref.backbone().weights_id == bb.weights_id


def test_head_on_cache_cached_trains_once_per_fingerprint(trained):
    _, _, _, _, _, entry, head = trained
    calls = []

    def train():
        calls.append(1)
        return dataclasses.replace(head, mlflow_run_id="run-1")

    record, reused = head_on_cache_cached(entry, "fp-test-cached", train)
    assert not reused and len(calls) == 1
    again, reused = head_on_cache_cached(entry, "fp-test-cached", train)
    assert reused and len(calls) == 1 and again.mlflow_run_id == "run-1"
    _, reused = head_on_cache_cached(entry, "fp-test-cached", train, reuse=False)
    assert not reused and len(calls) == 2


def test_evaluation_streamed_from_the_cache_equals_in_memory_and_keeps_the_manifest_order(trained, tmp_path):
    """Over its memory budget the evaluation reads the valid rows chunk by chunk (issue 21: memory flat at
    ImageNet size); the store's chunk order then differs from the manifest's, and the result is put back."""
    from precompute.inference import evaluate_on_cache
    from precompute.rows import cached_rows

    _, _, manifest, bb, ts, _, head = trained
    valid = manifest[manifest.split == "valid"]
    store = ActivationStore(str(tmp_path / "store"))
    precompute(valid.iloc[::2], store, bb, ts)  # every other valid image in one chunk, then the rest:
    entry, _, _ = precompute(manifest, store, bb, ts)  # the store's order interleaves the manifest's
    streamed = cached_rows(entry, manifest, head.task, "valid", memory_budget=0)
    assert list(streamed.order()) != sorted(streamed.order())  # the streaming order is not the manifest's
    in_memory = evaluate_on_cache(head, entry, manifest)
    probs, y = evaluate_on_cache(head, entry, manifest, memory_budget=0)
    np.testing.assert_allclose(probs, in_memory[0], rtol=1e-5, atol=1e-6)
    assert y.tolist() == in_memory[1].tolist()
    assert in_memory[1].tolist() == [head.classes.index(c) for c in
                                     manifest[(manifest.split == "valid") & (manifest.status == "ok")]["label"]]
