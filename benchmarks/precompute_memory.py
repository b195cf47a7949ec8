"""Precompute's peak memory does not grow with the dataset.

Runs the real precompute (tf_efficientnet_lite0, pooled float32, 64 px, default batch 32 and
256-row chunks) over 1,000 and then 4,000 distinct JPEGs derived from the dogscats photos, each
size in its own fresh subprocess and into a fresh store. The child reports its kernel peak RSS
(``ru_maxrss``) right after the model is loaded (baseline) and at the end (peak), and its RSS as each
chunk is committed; the parent also polls the child's RSS with psutil at 20 Hz as a cross-check.
growth = peak - baseline is what running over the data costs. Nearly all of it (~100 MiB) is set
during the first chunk (torch/oneDNN warm-up, first batches), and the peak varies by ~+-10 MiB
from run to run, so the pass test is peak(4k)/peak(1k) <= 1.10; the growth ratio and the KiB per
extra image are printed beside it, and the per-chunk RSS shows whether anything accumulates.

    .venv/bin/python benchmarks/precompute_memory.py            # 3-5 min on 2 free cores (11 min under heavy load); images cached

Writes its table to the "precompute_memory" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

import psutil

from _images import OUT, image_set, write_section

SIZES, IMAGE_PX, ARCH, FLAT = (1000, 4000), 64, "tf_efficientnet_lite0", 1.10


def child(folder: str, store_root: str) -> None:
    import os
    import resource

    from precompute.backbone import load_backbone, transform_for
    from precompute.manifest import build_manifest
    from precompute.stages.cache_fill import precompute
    from precompute.store import ActivationStore

    max_rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    now_rss = lambda: psutil.Process().memory_info().rss / 2**20
    bb = load_backbone(ARCH)
    baseline, per_chunk = max_rss(), []
    manifest = build_manifest(folder)
    _, stats, _ = precompute(manifest, ActivationStore(store_root), bb, transform_for(bb.spec, IMAGE_PX),
                             on_progress=lambda done, total: per_chunk.append(now_rss()))
    print(json.dumps({"baseline": baseline, "peak": max_rss(), "per_chunk": per_chunk, **stats.as_dict()}), flush=True)
    os._exit(0)  # skip interpreter teardown: it briefly adds ~100 MiB RSS that is not precompute's


def run(n: int) -> dict:
    folder = image_set(n)
    with tempfile.TemporaryDirectory(dir=OUT, prefix="store-") as store_root:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(folder), store_root], stdout=subprocess.PIPE, text=True)
        ps, polled = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                polled = max(polled, ps.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        out = proc.stdout.read()
        if proc.returncode:
            raise SystemExit(f"child for {n} images failed ({proc.returncode})")
    r = json.loads(out.strip().splitlines()[-1])
    r.update(polled=polled / 2**20, wall=time.perf_counter() - start)
    assert r["images"] == r["computed"] == n, r
    print(f"{n} images: peak {r['peak']:.0f} MiB (psutil polled {r['polled']:.0f}), baseline {r['baseline']:.0f} MiB, "
          f"{r['images_per_s']:.1f} img/s, {r['chunks']} chunks, {r['wall']:.0f} s in the child; RSS after each chunk: "
          + " ".join(f"{x:.0f}" for x in r["per_chunk"]), flush=True)
    return r


def main() -> None:
    t0 = time.perf_counter()
    runs = {n: run(n) for n in SIZES}
    lo, hi = runs[SIZES[0]], runs[SIZES[-1]]
    growth = lambda r: r["peak"] - r["baseline"]
    peak_ratio, growth_ratio = hi["peak"] / lo["peak"], growth(hi) / growth(lo)
    slope = (growth(hi) - growth(lo)) * 1024 / (hi["images"] - lo["images"])  # KiB per extra image
    flat = peak_ratio <= FLAT
    rows = ["| images | peak RSS MiB | baseline MiB | growth MiB | images/s | chunks | RSS after 1st / last chunk MiB |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {n:,} | {r['peak']:.0f} | {r['baseline']:.0f} | {growth(r):.0f} | {r['images_per_s']:.1f} | {r['chunks']} "
             f"| {r['per_chunk'][0]:.0f} / {r['per_chunk'][-1]:.0f} |" for n, r in runs.items()]
    verdict = (f"peak({hi['images']:,}) / peak({lo['images']:,}) = {peak_ratio:.3f}: {'FLAT' if flat else 'NOT FLAT'} "
               f"(threshold {FLAT:.2f}). growth ratio = {growth_ratio:.2f}, i.e. {slope:+.1f} KiB per extra image "
               f"(keeping one pooled row per image would be +10 KiB, one 64 px input tensor +48 KiB).")
    notes = (f"{ARCH}, pooled float32, {IMAGE_PX} px, batch 32, 256 rows per chunk, num_workers=0, CPU; one fresh "
             "subprocess and store per size. Peak and baseline are the child's ru_maxrss at the end and right "
             "after the model load; growth = peak - baseline. The last column is the current RSS when the first "
             "and the last chunk are committed.")
    table = "\n".join(rows)
    write_section("precompute_memory", f"{notes}\n\n{table}\n\n{verdict}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n\n{table}\n\n{verdict}")
    sys.exit(0 if flat else 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:4])
    else:
        main()
