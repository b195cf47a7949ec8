"""fastai's claim: a head trains ~100x faster on cached activations than through the frozen body.

resnet34 (random weights: pretrained ones are not on this machine, and the cost of a forward pass
does not depend on the values), cut as fastai cut it, 128 px, on the 400 dogscats training photos.

- cached: ``cache_fill.precompute`` once (pooled float32), then ``fit_head_on_cache`` on ``ArrayRows``
  read back from the store: fastai's ``precompute=True``.
- frozen body: the same head (same seed) on ``nn.Sequential(body, head)``, body parameters frozen
  and its BatchNorm in eval mode (``set_frozen_bn_eval``, what ``fit`` does for a frozen group),
  images decoded and transformed every epoch by a DataLoader (``rows.image_loader``,
  num_workers=0 as the recipe's default): fastai's ``precompute=False`` without augmentation.

Both go through ``precompute.train.fit`` (AdamW, one-cycle, batch 64) and the time is the training
part of an epoch as ``fit`` records it (no validation pass in either). The physical bound is what
the frozen body must cost: the body's forward pass over the 400 already-decoded tensors per epoch
over the head's epoch on the cache; decoding is shown beside it. Rounds interleave the four
measurements so load from other processes lands on all of them; best and median per measurement.
Target: frozen-body epoch / cached epoch >= 100.

    .venv/bin/python benchmarks/head_vs_frozen_body.py        # ~5 min on 2 busy cores

Writes its table to the "head_vs_frozen_body" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from torch import nn

from _images import DOGSCATS, OUT, write_section
from precompute.backbone import load_backbone, transform_for
from precompute.heads import build_head
from precompute.images import load_rgb
from precompute.labels import class_names
from precompute.manifest import build_manifest
from precompute.rows import image_loader, labelled_split
from precompute.stages.cache_fill import precompute
from precompute.store import ActivationStore
from precompute.train import ArrayRows, Schedule, fit, fit_head_on_cache
from precompute.transforms import eval_transform

ARCH, SIZE, BATCH, LR, TARGET = "resnet34", 128, 64, 1e-3, 100.0
CACHED_EPOCHS = 20  # per round: one cached epoch is tens of ms, so take the best of many


def new_head(n_features: int, n_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return build_head(n_features, n_classes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    bb = load_backbone(ARCH, weights="random")
    ts = transform_for(bb.spec, SIZE)
    manifest = build_manifest(DOGSCATS)
    classes = class_names(manifest)
    train = labelled_split(manifest, classes, "train")
    n = len(train)
    transform = eval_transform(ts)
    with tempfile.TemporaryDirectory(dir=OUT, prefix="store-") as root:
        entry, stats, _ = precompute(manifest, ActivationStore(root), bb, ts)
        rows = ArrayRows(entry.read(list(train["image_id"])), train["target"].to_numpy())
    print(f"precomputed {stats.computed} images once in {stats.seconds:.1f} s ({stats.images_per_s:.1f} img/s); "
          f"{n} training rows of {rows.x.shape[1]} features", flush=True)
    no_valid = ArrayRows(np.empty((0, rows.x.shape[1]), np.float32), np.empty(0, np.int64))
    n_features = rows.x.shape[1] // 2  # the head's input is the concat pool of C channels
    bb.body.requires_grad_(False)
    decoded = [transform(load_rgb(p)) for p in train["path"]]  # for the bound: the body alone
    steps = -(-n // BATCH)

    def cached_epochs() -> list[float]:
        hist = fit_head_on_cache(new_head(n_features, len(classes)), rows, no_valid, lr=LR, batch_size=BATCH,
                                 schedule=Schedule("one_cycle", epochs=CACHED_EPOCHS))
        return [h["seconds"] for h in hist[1:]]  # the first epoch warms the allocator

    def frozen_body_epoch() -> float:
        head = new_head(n_features, len(classes))
        model = nn.Sequential(bb.body, head)
        hist = fit(model, [bb.body, head], [0.0, LR],
                   lambda gen: image_loader(train, transform, BATCH, shuffle=True, seed=gen),
                   lambda: [], steps, Schedule("one_cycle", epochs=1), freeze_bn_stats=False)
        return hist[0]["seconds"]

    def decode_pass() -> float:
        t = time.perf_counter()
        for path in train["path"]:
            transform(load_rgb(path))
        return time.perf_counter() - t

    @torch.no_grad()
    def body_pass() -> float:
        bb.body.eval()
        t = time.perf_counter()
        for i in range(0, n, BATCH):
            bb.body(torch.stack(decoded[i:i + BATCH]))
        return time.perf_counter() - t

    body_pass()  # warm-up: oneDNN picks its kernels on the first batches
    times: dict[str, list[float]] = {"cached": [], "frozen": [], "decode": [], "body": []}
    for r in range(args.rounds):
        times["cached"] += cached_epochs()
        times["frozen"].append(frozen_body_epoch())
        times["decode"].append(decode_pass())
        times["body"].append(body_pass())
        print(f"  round {r + 1}/{args.rounds}: cached epoch best {min(times['cached']) * 1e3:.1f} ms, frozen-body epoch "
              f"{times['frozen'][-1]:.2f} s, decode {times['decode'][-1]:.2f} s, body forward {times['body'][-1]:.2f} s",
              flush=True)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio, ratio_med = best["frozen"] / best["cached"], med["frozen"] / med["cached"]
    bound = best["body"] / best["cached"]
    bound_dec = (best["body"] + best["decode"]) / best["cached"]
    lines = ["| per epoch (400 images) | best s | median s | x cached epoch (best) |", "|---|---:|---:|---:|",
             f"| head on the cache (fit_head_on_cache, {len(times['cached'])} epochs) | {best['cached']:.4f} "
             f"| {med['cached']:.4f} | 1 |",
             f"| head through the frozen body (images every epoch) | {best['frozen']:.2f} | {med['frozen']:.2f} "
             f"| **{ratio:.0f}** |",
             f"| bound: body forward alone, decoded tensors | {best['body']:.2f} | {med['body']:.2f} | {bound:.0f} |",
             f"| decode + eval_transform alone | {best['decode']:.2f} | {med['decode']:.2f} "
             f"| {best['decode'] / best['cached']:.0f} |"]
    verdict = (f"frozen-body epoch / cached epoch = {ratio:.0f}x best ({ratio_med:.0f}x median), target >= {TARGET:.0f}x: "
               f"{'PASS' if ratio >= TARGET else 'MISS'}. Physical bound (body forward / head epoch) = {bound:.0f}x; "
               f"with decoding {bound_dec:.0f}x; measured = {ratio / bound:.0%} of the body-only bound, "
               f"{ratio / bound_dec:.0%} of the bound with decoding.")
    notes = (f"{ARCH} (random weights; same cost as pretrained), cut at fastai's [8, 6], {SIZE} px, pooled float32 cache, "
             f"head = fastai's (concat pool -> BN/Dropout/Linear 1024-512-2), AdamW one-cycle, batch {BATCH}, "
             f"{torch.get_num_threads()} torch threads, CPU; {n} dogscats training photos, num_workers=0. Training part "
             f"of the epoch only. {args.rounds} interleaved rounds ({CACHED_EPOCHS - 1} timed cached epochs each). "
             f"The one-off precompute took {stats.seconds:.1f} s.")
    table = "\n".join(lines)
    write_section("head_vs_frozen_body", f"{notes}\n\n{table}\n\n{verdict}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n\n{table}\n\n{verdict}")


if __name__ == "__main__":
    main()
