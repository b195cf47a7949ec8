"""Run ``compute_activations`` in its own process, for the durability tests.

Run by path from a subprocess (``python tests/_precompute_worker.py --store ... --images ...``);
the test modules also import the shared pieces (``make_key``, ``SlowBody``, ``write_images``)
so the worker and the test compute the very same entry with the very same weights.

Options that exist only to make crashes and races reproducible:
  --sleep-per-batch S   the body sleeps S seconds per batch (a slow GPU, in short)
  --commit-delay S      sleep S seconds between a chunk's data and its commit record, i.e.
                        widen the crash window that the atomic commit must survive
  --pause-while F       after its first batch the body waits while file F exists: holds a
                        writer mid-write (lease taken, rows half done) for as long as a test needs
  --ready F / --go F    touch F when everything is imported and the entry opened, then wait
                        until file --go exists: lines several workers up on one start signal
The last line on stdout is the ``PrecomputeStats`` as JSON.

``--serve`` keeps one process for several jobs (one JSON list of arguments per stdin line, one
JSON result per stdout line), so tests pay torch's import once per worker, not once per job.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from precompute.manifest import build_manifest, ok_rows
from precompute.store import CODE_VERSION, ActivationStore, CacheKey
from precompute.transforms import TransformSpec, eval_transform

IMAGE_SIZE = 48  # network input; the photos are bigger and get resized + center-cropped
TRANSFORM = TransformSpec(size=IMAGE_SIZE)


def make_key(**changes) -> CacheKey:
    # versions are fixed here (not library_versions()) so the worker need not import timm
    key = CacheKey(arch="counting-body", weights_id="seed:0", xtra_cut=0, cut_index=2,
                   transform=TRANSFORM, pooled=True, dtype="float32",
                   versions={"torch": torch.__version__, "precompute_code": CODE_VERSION})
    return dataclasses.replace(key, **changes)


def manifest_of(images: str | Path):
    return ok_rows(build_manifest(images))


class SlowBody(nn.Module):
    """The CountingBody of test_store.py, seeded identically in every process, optionally slow."""

    def __init__(self, sleep_per_batch: float = 0.0, pause_while: str | None = None):
        super().__init__()
        self.pause_while = pause_while
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2))
        self.sleep_per_batch = sleep_per_batch
        self.seen = 0

    def forward(self, x):
        if self.seen and self.pause_while:
            deadline = time.monotonic() + 300
            while os.path.exists(self.pause_while) and time.monotonic() < deadline:
                time.sleep(0.01)
        self.seen += len(x)
        if self.sleep_per_batch:
            time.sleep(self.sleep_per_batch)
        return self.net(x)


def write_images(folder: Path, n: int, seed: int = 0, px: int = 64, prefix: str = "img") -> list[Path]:
    """``n`` distinct random-noise PNGs in an ImageNet-style tree (two classes, one split)."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    paths = []
    for i in range(n):
        out = folder / "train" / ("a" if i % 2 == 0 else "b") / f"{prefix}{i:03d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(out)
        paths.append(out)
    return paths


def main(argv: list[str] | None = None) -> None:
    from precompute.features import compute_activations

    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--chunk-rows", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--sleep-per-batch", type=float, default=0.0)
    p.add_argument("--commit-delay", type=float, default=0.0)
    p.add_argument("--pause-while")
    p.add_argument("--ready")
    p.add_argument("--go")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    manifest = manifest_of(args.images)
    entry = ActivationStore(args.store).entry(make_key())
    if args.commit_delay:
        put = entry._put

        def put_record_late(rel: str, data: bytes, durable: bool = True) -> None:
            if rel.startswith("commits/"):  # the commit record: written last
                time.sleep(args.commit_delay)
            put(rel, data, durable)

        entry._put = put_record_late
    if args.ready:
        Path(args.ready).touch()
    if args.go:
        deadline = time.monotonic() + 300
        while not os.path.exists(args.go):
            if time.monotonic() > deadline:
                sys.exit("no go signal")
            time.sleep(0.005)
    body = SlowBody(args.sleep_per_batch, args.pause_while)
    stats = compute_activations(body, manifest, eval_transform(TRANSFORM), entry,
                                batch_size=args.batch_size, chunk_rows=args.chunk_rows)
    print(json.dumps({**stats.as_dict(), "seen": body.seen}), flush=True)


def serve() -> None:
    print(json.dumps({"serving": os.getpid()}), flush=True)
    for line in sys.stdin:
        try:
            main(json.loads(line))
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported to the test as a result
            print(json.dumps({"error": repr(exc)}), flush=True)


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main()
