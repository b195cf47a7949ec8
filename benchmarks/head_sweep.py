"""The payoff of the cache: 100 heads on it, batched, against one by one and against the frozen body.

tf_efficientnet_lite0 (pretrained, the default offline backbone: resnet34's pretrained weights are
not on this machine), 128 px, pooled float32 rows of the 560 dogscats photos (400 train, 160 valid),
computed once with ``cache_fill.precompute``. Then, side by side in one run:

- batched: ``precompute.sweep.head_sweep`` over 100 configurations x 5 epochs (lr 5 x ps 2 x
  xtra_fc 2 x wd 5), heads of one shape trained together as one stacked model;
- one by one: the same 100 configurations through ``train.fit_head_on_cache``
  (``head_sweep(batched=False)``), checked to give the same numbers;
- one frozen-body epoch: the default head on ``nn.Sequential(body, head)`` with the body frozen,
  images decoded and transformed every epoch (as ``head_vs_frozen_body.py`` measures it).

Goals (issue 15): the 100-config sweep < 3 frozen-body epochs of wall time; batched >= 3x faster
than one by one. Every timing includes the per-epoch validation pass of each head.

    .venv/bin/python benchmarks/head_sweep.py        # ~4 min on 2 busy cores

Writes its table to the "head_sweep" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from torch import nn

from _images import DOGSCATS, OUT, write_section
from precompute import sweep
from precompute.backbone import load_backbone, transform_for
from precompute.heads import build_head
from precompute.labels import class_names
from precompute.manifest import build_manifest
from precompute.rows import DEFAULT_MEMORY_BUDGET, cached_rows, image_loader, labelled_split
from precompute.stages.cache_fill import precompute
from precompute.store import ActivationStore
from precompute.train import Schedule, fit
from precompute.transforms import eval_transform

ARCH, SIZE, BATCH, EPOCHS = "tf_efficientnet_lite0", 128, 64, 5
GRID = dict(lr=[1e-3, 2e-3, 3e-3, 5e-3, 1e-2], ps=[None, 0.5], xtra_fc=[(512,), ()], epochs=[EPOCHS],
            wd=[0.0, 1e-3, 1e-2, 3e-2, 1e-1])


GOAL1_REASON = ("Goal 1 is out of reach for these heads on this CPU whatever the batching: one cached epoch of a 2560->512 head (lite0's 1280 channels, concat-pooled) costs about 1/17 of a lite0 128 px frozen-body epoch here (0.28 s vs 4.9 s), not the 1/265 measured for resnet34 (1024 features, a 6x costlier body) in head_vs_frozen_body, and 100 heads x 5 epochs are 500 head epochs; the goal needs each head epoch under 1/167 of a body epoch.")


def frozen_body_epoch(bb, train_rows, transform, n_classes: int, n_features: int) -> float:
    """One epoch of the default head through the frozen body, as head_vs_frozen_body.py runs it."""
    torch.manual_seed(0)
    head = build_head(n_features, n_classes)
    model = nn.Sequential(bb.body, head)
    steps = -(-len(train_rows) // BATCH)
    hist = fit(model, [bb.body, head], [0.0, 1e-3],
               lambda gen: image_loader(train_rows, transform, BATCH, shuffle=True, seed=gen),
               lambda: [], steps, Schedule("one_cycle", epochs=1), freeze_bn_stats=False)
    return hist[0]["seconds"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--body-epochs", type=int, default=2, help="frozen-body epochs timed (best taken)")
    args = p.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    bb = load_backbone(ARCH)
    ts = transform_for(bb.spec, SIZE)
    manifest = build_manifest(DOGSCATS)
    classes = class_names(manifest)
    with tempfile.TemporaryDirectory(dir=OUT, prefix="store-") as root:
        entry, stats, _ = precompute(manifest, ActivationStore(root), bb, ts)
        train = cached_rows(entry, manifest, classes, "train", DEFAULT_MEMORY_BUDGET)
        valid = cached_rows(entry, manifest, classes, "valid", DEFAULT_MEMORY_BUDGET)
    n_features = train.x.shape[1] // 2
    print(f"precomputed {stats.computed} images in {stats.seconds:.1f} s; {len(train)} train / {len(valid)} valid rows "
          f"of {train.x.shape[1]} features", flush=True)
    configs = sweep.grid(**GRID)
    assert len(configs) == 100

    batched = sweep.head_sweep(train, valid, len(classes), configs, BATCH, seed=0)
    print(f"batched sweep: {batched.seconds:.1f} s", flush=True)
    alone = sweep.head_sweep(train, valid, len(classes), configs, BATCH, seed=0, batched=False)
    print(f"one by one: {alone.seconds:.1f} s", flush=True)
    cols = ["train_loss", "valid_loss", "valid_accuracy"]
    diff = np.abs(batched.table[cols].to_numpy() - alone.table[cols].to_numpy()).max()

    train_rows = labelled_split(manifest, classes, "train")
    bb.body.requires_grad_(False)
    body = [frozen_body_epoch(bb, train_rows, eval_transform(ts), len(classes), n_features)
            for _ in range(args.body_epochs)]
    print(f"frozen-body epoch: {', '.join(f'{s:.1f}' for s in body)} s", flush=True)
    body_epoch = min(body)

    def by_shape(result: sweep.SweepResult) -> dict[str, float]:
        return result.table.groupby("xtra_fc")["seconds"].sum().to_dict()

    shapes_b, shapes_a = by_shape(batched), by_shape(alone)
    speedup = alone.seconds / batched.seconds
    vs_body = batched.seconds / body_epoch
    best = batched.table.iloc[batched.best_index]
    lines = ["| 100 heads x 5 epochs, or one frozen-body epoch | wall s | per head s | x frozen-body epoch |",
             "|---|---:|---:|---:|",
             f"| batched sweep (`head_sweep`) | {batched.seconds:.1f} | {batched.seconds / 100:.3f} | {vs_body:.2f} |",
             f"| one by one (`fit_head_on_cache`) | {alone.seconds:.1f} | {alone.seconds / 100:.3f} "
             f"| {alone.seconds / body_epoch:.2f} |",
             f"| one frozen-body epoch (images decoded, body forward, default head; best of {len(body)}) "
             f"| {body_epoch:.1f} | | 1 |"]
    lines += ["", "| head shape (50 configs each) | batched s | one by one s | speed-up |", "|---|---:|---:|---:|"]
    lines += [f"| xtra_fc={k} | {shapes_b[k]:.1f} | {shapes_a[k]:.1f} | {shapes_a[k] / shapes_b[k]:.2f}x |"
              for k in sorted(shapes_b)]
    goal1 = batched.seconds < 3 * body_epoch
    goal2 = speedup >= 3
    verdict = (
        f"Goal 1, sweep < 3 frozen-body epochs: {batched.seconds:.1f} s vs {3 * body_epoch:.1f} s: "
        f"{'MET' if goal1 else 'MISSED'}. Goal 2, batched >= 3x one by one: {speedup:.2f}x: "
        f"{'MET' if goal2 else 'MISSED'}. Batched and one by one agree (max |diff| of final train/valid loss and "
        f"accuracy over the 100 heads = {diff:.1e}). Best config: lr {best['lr']:.0e}, ps {best['ps']}, "
        f"xtra_fc {best['xtra_fc']}, wd {best['wd']:g}: valid accuracy {best['valid_accuracy']:.4f}, "
        f"valid loss {best['valid_loss']:.4f}.")
    reason = (
        "Why the speed-up is what it is, on this CPU: batching removes per-head Python and dispatch overhead and "
        "computes the first BatchNorm once, but every head still does its own arithmetic (each has its own weights "
        "and dropout masks), and on a CPU the 2560x512 heads' matmuls, AdamW update (1.3 M parameters per head, "
        "memory-bound) and dropout random numbers already run at full speed one head at a time. So the gain is "
        "large only where overhead dominates (the linear heads) and small where arithmetic does. On a GPU one small "
        "head leaves the device mostly idle and the stacked model fills it; that is where the 3x goal is meant "
        "to be reached (not measured here: no GPU). "
        + GOAL1_REASON)
    notes = (f"{ARCH} (pretrained; resnet34's pretrained weights are not available offline here, so the issue's resnet34 "
             f"is replaced by the default offline backbone), {SIZE} px, pooled float32 cache of {stats.computed} dogscats "
             f"photos (precompute {stats.seconds:.1f} s, once); {len(train)} train / {len(valid)} valid rows. 100 configs: "
             f"lr {GRID['lr']} x ps [fastai default, 0.5] x xtra_fc [[512], []] x wd {GRID['wd']}, {EPOCHS} epochs "
             f"one-cycle, AdamW, batch {BATCH}, seed 0, validation after every epoch. {torch.get_num_threads()} torch "
             f"threads, CPU, shared with other work; one run each (the sweep), best of {len(body)} frozen-body epochs.")
    table = "\n".join(lines)
    write_section("head_sweep", f"{notes}\n\n{table}\n\n{verdict}\n\n{reason}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n\n{table}\n\n{verdict}")


if __name__ == "__main__":
    main()
