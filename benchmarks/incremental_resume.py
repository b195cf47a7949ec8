"""What the cache's row addressing buys: absorbing new images, and finishing a killed run.

tf_efficientnet_lite0 (pretrained), pooled float32, 64 px, batch 32, 256-row chunks, on 4,000
distinct JPEGs derived from the dogscats photos (``_images.image_set``); every precompute runs
``compute_activations`` in its own subprocess (this file with ``--child``), as a Dagster step would.

- full: a fresh store, all 4,000 images.
- +5%: a store already holding 3,800 of them (filled once, copied for each repetition), then
  all 4,000: only the 200 new ones are computed. Target: <= 0.1x the full run.
- resume: a fresh store, all 4,000, SIGKILLed as soon as half of the 16 chunks are committed
  (the parent watches the commit records, as tests/test_store_durability.py does); then all
  4,000 again: only the chunks not committed are computed. Target: <= 0.6x the full run.

Times are the child's ``PrecomputeStats.seconds`` (the whole ``compute_activations`` call: index
check, decode, body, commits; not the interpreter start and model load, which are the same for
every run and listed apart). Repetitions alternate the order of the runs. The manifest scan
(hashing every file, ``build_manifest``) that finding the new images needs is timed once and
shown beside, with the ratios it gives when it is counted in both runs; and again through the
scan index (precompute/scan_index.py), as the pipeline scans now: the full run's scan reads every
file either way, the +5% run's is a warm one that reads only the 200 new files (one CSV, listing
the 3,800 old images for a cold scan that writes the index, then all 4,000).

    .venv/bin/python benchmarks/incremental_resume.py            # 15-40 min on 2 shared cores, by load

Writes its table to the "incremental_resume" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _images import OUT, image_set, write_section

N_IMAGES, NEW_FRACTION, IMAGE_PX, ARCH, CHUNK = 4000, 0.05, 64, "tf_efficientnet_lite0", 256
TARGET_INC, TARGET_RESUME = 0.10, 0.60


def indexed_scans(folder: Path, rows, old_rows, tmp: Path) -> tuple[float, float]:
    """(cold, +5%) seconds of manifest scans through a scan index, as the pipeline runs them."""
    from precompute.manifest import build_manifest
    from precompute.scan_index import Scan, ScanIndex

    index, listing = ScanIndex(tmp / "scan_index"), tmp / "scan" / "labels.csv"
    listing.parent.mkdir()

    def scan(paths) -> float:
        listing.write_text("path,label\n" + "".join(f"{p},{Path(p).parent.name}\n" for p in paths))
        t = time.perf_counter()
        build_manifest(listing, root=folder, scan=Scan(index=index))
        return time.perf_counter() - t

    time.sleep(1.1)  # files written less than a second before a scan are read again next time (RACY_NS)
    return scan(old_rows["path"]), scan(rows["path"])


def child(store_root: str, rows_csv: str) -> None:
    t0 = time.perf_counter()
    import pandas as pd

    from precompute.backbone import load_backbone, transform_for
    from precompute.features import compute_activations
    from precompute.stages.cache_fill import activation_key
    from precompute.store import ActivationStore
    from precompute.transforms import eval_transform

    bb = load_backbone(ARCH)
    ts = transform_for(bb.spec, IMAGE_PX)
    entry = ActivationStore(store_root).entry(activation_key(bb, ts))
    rows = pd.read_csv(rows_csv)
    startup = time.perf_counter() - t0
    cpu = os.times()
    stats = compute_activations(bb.body, rows, eval_transform(ts), entry, chunk_rows=CHUNK)
    cpu = sum(os.times()[:2]) - sum(cpu[:2])  # user + system, every thread of this process
    print(json.dumps({**stats.as_dict(), "startup": startup, "cpu": cpu}), flush=True)


def commits(store_root: Path) -> int:
    return len(list(store_root.glob("*/cut=*/*/commits/*.json")))


def run_child(store_root: Path, rows_csv: Path, kill_at_commits: int | None = None) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(store_root), str(rows_csv)],
                            stdout=subprocess.PIPE, text=True)
    if kill_at_commits is None:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"child failed ({proc.returncode})")
        return json.loads(out.strip().splitlines()[-1])
    while proc.poll() is None and commits(store_root) < kill_at_commits:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"child finished before it was killed ({proc.returncode})")
    return {"committed_chunks": commits(store_root)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    t0 = time.perf_counter()
    from precompute.manifest import build_manifest, ok_rows

    folder = image_set(N_IMAGES)
    t = time.perf_counter()
    rows = ok_rows(build_manifest(folder)).drop_duplicates("image_id")[["image_id", "path"]]
    scan = time.perf_counter() - t
    assert len(rows) == N_IMAGES, len(rows)
    n_new = int(round(NEW_FRACTION * N_IMAGES))
    new = np.random.default_rng(0).choice(len(rows), n_new, replace=False)
    old_rows = rows.drop(rows.index[new])
    n_chunks = -(-N_IMAGES // CHUNK)
    times: dict[str, list[float]] = {"full": [], "inc": [], "resume": []}
    cpu: dict[str, list[float]] = {"full": [], "inc": [], "resume": []}
    startups, killed_at = [], []
    with tempfile.TemporaryDirectory(dir=OUT, prefix="incremental-") as tmp:
        tmp = Path(tmp)
        all_csv, old_csv = tmp / "all.csv", tmp / "old.csv"
        rows.to_csv(all_csv, index=False)
        old_rows.to_csv(old_csv, index=False)
        scan_cold, scan_inc = indexed_scans(folder, rows, old_rows, tmp)
        print(f"manifest scans through the scan index: cold {scan_cold:.2f} s, +5% new {scan_inc:.2f} s", flush=True)
        prefilled = tmp / "prefilled"
        r = run_child(prefilled, old_csv)
        print(f"prefilled {r['computed']} images ({r['seconds']:.0f} s)", flush=True)

        def full(rep: int) -> None:
            store = tmp / f"full-{rep}"
            r = run_child(store, all_csv)
            assert r["computed"] == N_IMAGES, r
            times["full"].append(r["seconds"])
            cpu["full"].append(r["cpu"])
            startups.append(r["startup"])
            print(f"  rep {rep + 1} full: {r['computed']} computed in {r['seconds']:.1f} s ({r['cpu']:.1f} s CPU, "
                  f"load average {os.getloadavg()[0]:.1f})", flush=True)

        def inc(rep: int) -> None:
            store = tmp / f"inc-{rep}"
            shutil.copytree(prefilled, store)
            r = run_child(store, all_csv)
            assert r["computed"] == n_new and r["reused"] == N_IMAGES - n_new, r
            times["inc"].append(r["seconds"])
            cpu["inc"].append(r["cpu"])
            print(f"  rep {rep + 1} +5%: {r['computed']} computed, {r['reused']} reused in {r['seconds']:.1f} s "
                  f"({r['cpu']:.1f} s CPU, load average {os.getloadavg()[0]:.1f})", flush=True)

        def resume(rep: int) -> None:
            store = tmp / f"resume-{rep}"
            k = run_child(store, all_csv, kill_at_commits=n_chunks // 2)
            killed_at.append(k["committed_chunks"])
            r = run_child(store, all_csv)
            assert r["computed"] + r["reused"] == N_IMAGES and r["reused"] >= (n_chunks // 2) * CHUNK, r
            times["resume"].append(r["seconds"])
            cpu["resume"].append(r["cpu"])
            print(f"  rep {rep + 1} resume: killed with {k['committed_chunks']}/{n_chunks} chunks committed; rerun "
                  f"computed {r['computed']}, reused {r['reused']} in {r['seconds']:.1f} s ({r['cpu']:.1f} s CPU, "
                  f"load average {os.getloadavg()[0]:.1f})", flush=True)

        for rep in range(args.reps):
            for step in ((full, resume, inc) if rep % 2 == 0 else (inc, resume, full)):
                step(rep)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    r_inc, r_res = best["inc"] / best["full"], best["resume"] / best["full"]
    r_inc_scan, r_res_scan = (best["inc"] + scan) / (best["full"] + scan), (best["resume"] + scan) / (best["full"] + scan)
    r_inc_index = (best["inc"] + scan_inc) / (best["full"] + scan)  # the full run's scan reads every file anyway
    c = {k: min(v) for k, v in cpu.items()}
    lines = ["| run | images computed | best s | median s | x full run | x full run, CPU s | x full run, manifest scan "
             "counted | x full run, scan counted, scan index |", "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| full precompute (fresh store) | {N_IMAGES:,} | {best['full']:.1f} | {med['full']:.1f} | 1 | 1 | 1 | 1 |",
             f"| +5% new images (store holds {N_IMAGES - n_new:,}) | {n_new} | {best['inc']:.1f} | {med['inc']:.1f} "
             f"| **{r_inc:.3f}** | {c['inc'] / c['full']:.3f} | {r_inc_scan:.3f} | **{r_inc_index:.3f}** |",
             f"| rerun after SIGKILL at {min(killed_at)}-{max(killed_at)}/{n_chunks} chunks | "
             f"{N_IMAGES - min(killed_at) * CHUNK:,} | {best['resume']:.1f} | {med['resume']:.1f} | **{r_res:.3f}** "
             f"| {c['resume'] / c['full']:.3f} | {r_res_scan:.3f} | |"]
    verdicts = [f"+5% images: {r_inc:.3f}x the full run (target <= {TARGET_INC}): {'PASS' if r_inc <= TARGET_INC else 'MISS'}",
                f"+5% images, manifest scan counted, through the scan index: {r_inc_index:.3f}x the full run "
                f"(target <= {TARGET_INC}): {'PASS' if r_inc_index <= TARGET_INC else 'MISS'}",
                f"resume after a kill at 50%: {r_res:.3f}x the full run (target <= {TARGET_RESUME}): "
                f"{'PASS' if r_res <= TARGET_RESUME else 'MISS'}"]
    notes = (f"{ARCH} (pretrained), pooled float32, {IMAGE_PX} px (small, to keep the runtime reasonable), batch 32, "
             f"{CHUNK}-row chunks, num_workers=0, CPU; {N_IMAGES:,} derived JPEGs; each precompute in its own subprocess, "
             f"{args.reps} repetition(s), best of each. Seconds = the child's compute_activations call (wall; CPU s = its "
             "user + system time, less sensitive to other processes on a shared machine); interpreter start and model load "
             f"(median {statistics.median(startups):.1f} s) are the same for every run and not counted. Manifest scan "
             f"(build_manifest over the {N_IMAGES:,} files) = {scan:.1f} s, needed before either run; through the scan "
             f"index {scan_cold:.2f} s cold over the {N_IMAGES - n_new:,} old files and then {scan_inc:.2f} s over all "
             f"{N_IMAGES:,} with the {n_new} new ones (the +5% run's scan; the full run's is the one above).")
    table = "\n".join(lines)
    write_section("incremental_resume", f"{notes}\n\n{table}\n\n" + "  \n".join(verdicts))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n\n{table}\n\n" + "\n".join(verdicts))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:4])
    else:
        main()
