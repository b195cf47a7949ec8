"""Manifest scans at scale: what the scan index saves, side by side in one run.

N small JPEGs (32x32 random noise, ~1.5 KB; ``--n``, default 100,000) in the folder layout, 10
classes, 80/20 train/valid, generated once into ``benchmarks/out/manifest-<N>/`` and reused, plus
5% more in a staging folder that is moved in and out for the "+5% new files" scans. Measured:

- cold scan, no index: ``build_manifest(folder)``, what main did on every run (hash + decode every file);
- cold scan, index: the same plus recording every file's result (the first scan with the index);
- warm scan, nothing changed: every file stat'ed, none opened (target <= 0.05x the cold scan);
- warm scan, 5% new files: only the new ones read (target <= 0.1x the cold scan);
- the sensor tick (pipelines/sensors.py): unchanged source (stat fingerprint only), and after 5% new
  files with the default read budget (launches, reads nothing) and with a budget that covers them
  (reads the new files through the index, so the run it launches reads none);
- memory: the manifest DataFrame at N rows (deep), and the peak Python allocation of a warm scan
  (tracemalloc, index table and rows included); the index file's size;
- on moto's S3 server (in this process; times are not S3's latency, request counts are what
  matter) at ``--s3-n`` images: requests per scan by operation, counted with a botocore hook on
  the scan's own s3fs client: a warm scan must GET no unchanged object.

Cold scans run ``--cold-reps`` times each, alternating (they dominate the runtime), warm ones
``--reps`` times; the table shows best and median.
Times are wall seconds on a shared machine; the load average is printed with each.

    .venv/bin/python benchmarks/manifest_scale.py                 # ~10 min at 100,000 on 2 cores
    .venv/bin/python benchmarks/manifest_scale.py --n 20000       # smaller, if 100k does not fit

Writes the "manifest_scale" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from _images import OUT, write_section

CLASSES, PX, NEW_FRACTION = 10, 32, 0.05
TARGET_WARM, TARGET_NEW = 0.05, 0.10
_RECIPE = 1  # bump when the way images are generated changes


def generate(folder: Path, n: int, seed: int, start: int = 0) -> Path:
    """``n`` distinct random 32x32 JPEGs (reused when already there)."""
    stamp = {"n": n, "seed": seed, "start": start, "recipe": _RECIPE}
    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text()) == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    for split in ("train", "valid"):
        for c in range(CLASSES):
            (folder / split / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (PX, PX, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        split = "valid" if i % 5 == 4 else "train"
        with open(folder / split / f"class{(i // 5) % CLASSES}" / f"{i:08d}.jpg", "wb") as f:
            f.write(buf.getvalue())
    done.write_text(json.dumps(stamp))
    print(f"generated {n:,} JPEGs in {folder} ({time.perf_counter() - t:.0f} s)", flush=True)
    return folder


def move_all(src: Path, dst: Path) -> list[str]:
    moved = []
    for p in sorted(src.glob("*/*/*.jpg")):
        rel = p.relative_to(src)
        p.rename(dst / rel)
        moved.append(str(rel))
    return moved


def move_back(rels: list[str], src: Path, dst: Path) -> None:
    for rel in rels:
        (src / rel).rename(dst / rel)


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def summary(xs: list[float]) -> tuple[float, float]:
    return min(xs), statistics.median(xs)


# --------------------------------------------------------------------------- S3 (moto)


class Requests:
    """S3 operations the scan's s3fs client sends (botocore hook on fsspec's cached instance)."""

    def __init__(self, url: str, options: dict):
        from precompute import sources

        fs, _ = sources.filesystem(url, options)
        fs.connect()
        self.calls: list[tuple[str, str | None]] = []
        fs.s3.meta.events.register("before-parameter-build.s3",
                                   lambda params, model, **_: self.calls.append((model.name, params.get("Key"))))

    def take(self) -> list[tuple[str, str | None]]:
        calls, self.calls = self.calls, []
        return calls


def s3_part(folder: Path, new: Path, n: int) -> dict:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import boto3
    from moto.server import ThreadedMotoServer

    from precompute.manifest import build_manifest
    from precompute.scan_index import Scan, ScanIndex

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        files = sorted(folder.glob("*/*/*.jpg"))[:n]
        extra = sorted(new.glob("*/*/*.jpg"))[: max(1, int(n * NEW_FRACTION))]
        t = time.perf_counter()
        for p in files:
            client.put_object(Bucket=bucket, Key=f"images/{p.relative_to(folder).as_posix()}", Body=p.read_bytes())
        print(f"uploaded {len(files):,} objects to moto in {time.perf_counter() - t:.0f} s", flush=True)
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        url = f"s3://{bucket}/images/"
        requests = Requests(url, options)
        index = ScanIndex.beside_store(f"s3://{bucket}/acts", options)
        out = {}

        def run(label: str) -> None:
            scan = Scan(index=index)
            seconds, manifest = timed(lambda: build_manifest(url, storage_options=options, scan=scan))
            calls = requests.take()
            ops = Counter(op for op, _ in calls)
            image_gets = sum(1 for op, k in calls if op == "GetObject" and k.startswith("images/"))
            out[label] = {"seconds": seconds, "rows": len(manifest), "ops": dict(ops), "image_gets": image_gets,
                          "object_reads": scan.stats["object_reads"]}
            print(f"  s3 {label}: {seconds:.2f} s, {dict(ops)}, image GETs {image_gets}", flush=True)

        run("cold")
        run("warm")
        for p in extra:
            client.put_object(Bucket=bucket, Key=f"images/{p.relative_to(new).as_posix()}", Body=p.read_bytes())
        run("+5% new")
        run("warm again")
        out["n"], out["new"] = len(files), len(extra)
        assert out["warm"]["image_gets"] == 0 and out["warm again"]["image_gets"] == 0, out
        assert out["+5% new"]["image_gets"] == len(extra), out
        return out
    finally:
        server.stop()


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--s3-n", type=int, default=2_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cold-reps", type=int, default=2)
    args = p.parse_args()
    t_start = time.perf_counter()
    import logging

    logging.getLogger("precompute").setLevel(logging.ERROR)  # per-row warnings would flood the output
    from precompute.manifest import build_manifest
    from precompute.scan_index import Scan, ScanIndex

    n, n_new = args.n, int(round(args.n * NEW_FRACTION))
    folder = generate(OUT / f"manifest-{n}", n, seed=0)
    new = generate(OUT / f"manifest-{n}-new", n_new, seed=1, start=n)
    time.sleep(1.1)  # a file written less than a second before a scan is not trusted by the index (RACY_NS)

    work = Path(tempfile.mkdtemp(dir=OUT, prefix="manifest-scale-"))
    results: dict = {}
    try:
        index = ScanIndex(work / "index")

        def scan(**kw):
            s = Scan(index=index, **kw)
            seconds, manifest = timed(lambda: build_manifest(folder, scan=s))
            return seconds, manifest, s.stats

        plain_runs, cold_runs = [], []
        for rep in range(args.cold_reps):  # alternating, best of each: the machine is shared
            seconds, plain = timed(lambda: build_manifest(folder))
            plain_runs.append(seconds)
            print(f"cold, no index: {seconds:.1f} s (load {load()})", flush=True)
            shutil.rmtree(work / "index", ignore_errors=True)
            seconds, cold, cold_stats = scan()
            cold_runs.append(seconds)
            print(f"cold, index:    {seconds:.1f} s, {cold_stats['read']:,} read (load {load()})", flush=True)
            assert cold.equals(plain) and cold_stats["read"] == n
        plain_s, cold_s = min(plain_runs), min(cold_runs)
        index_file = Path(cold_stats["index"])
        index_bytes = index_file.stat().st_size
        saved_index = work / "index-after-cold"
        shutil.copy(index_file, saved_index)

        warm, new_scans = [], []
        for rep in range(args.reps):
            seconds, manifest, stats = scan()
            assert stats["read"] == 0 and manifest.equals(plain), stats
            warm.append(seconds)
            print(f"  warm, unchanged: {seconds:.2f} s (load {load()})", flush=True)
            moved = move_all(new, folder)
            try:
                seconds, manifest, stats = scan()
                assert stats["read"] == n_new and len(manifest) == n + n_new, stats
                new_scans.append(seconds)
                print(f"  warm, +5% new:   {seconds:.2f} s, {stats['read']:,} read (load {load()})", flush=True)
            finally:
                move_back(moved, folder, new)
                shutil.copy(saved_index, index_file)  # back to the state after the cold scan

        # the sensor tick, through the same index
        import dagster as dg

        from pipelines.definitions import defs
        from pipelines.sensors import new_images_sensor
        from resources import ImageSource

        images = ImageSource(source=str(folder), scan_index=str(index.location))
        instance = dg.DagsterInstance.ephemeral()
        repo = defs.get_repository_def()

        def tick(cursor):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=repo,
                                          resources={"images": images})
            return timed(lambda: new_images_sensor.evaluate_tick(ctx))

        first_s, first = tick(None)
        assert first.run_requests
        same = [tick(first.cursor) for _ in range(args.reps)]
        assert all(not r.run_requests for _, r in same)
        moved = move_all(new, folder)
        try:
            os.environ["PRECOMPUTE_SENSOR_READ_BUDGET"] = str(n_new // 2)
            over_s, over = tick(first.cursor)
            assert over.run_requests and json.loads(over.cursor)["digest"] is None
            os.environ["PRECOMPUTE_SENSOR_READ_BUDGET"] = str(2 * n_new)
            read_s, read = tick(first.cursor)
            assert read.run_requests and json.loads(read.cursor)["digest"]
        finally:
            os.environ.pop("PRECOMPUTE_SENSOR_READ_BUDGET", None)
            move_back(moved, folder, new)
            shutil.copy(saved_index, index_file)
        ticks = {"first (index warm)": first_s, "unchanged": min(s for s, _ in same),
                 f"+5% new, read budget {n_new // 2:,} (launches on the fingerprint, reads none)": over_s,
                 f"+5% new, budget {2 * n_new:,} (reads the {n_new:,} new files)": read_s}
        print(f"sensor ticks: {ticks}", flush=True)

        # memory
        frame_bytes = int(plain.memory_usage(deep=True).sum())
        tracemalloc.start()
        build_manifest(folder, scan=Scan(index=index))
        _, warm_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del plain, cold, manifest

        s3 = s3_part(folder, new, args.s3_n) if args.s3_n else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    warm_best, warm_med = summary(warm)
    new_best, new_med = summary(new_scans)
    r_warm, r_new = warm_best / plain_s, new_best / plain_s
    lines = [
        f"| scan of {n:,} files | files read | best s | median s | x cold scan (no index) |",
        "|---|---:|---:|---:|---:|",
        f"| cold, no index (main before the index) | {n:,} | {plain_s:.2f} | {statistics.median(plain_runs):.2f} | 1 |",
        f"| cold, index written | {n:,} | {cold_s:.2f} | {statistics.median(cold_runs):.2f} | {cold_s / plain_s:.3f} |",
        f"| warm, nothing changed | 0 | {warm_best:.2f} | {warm_med:.2f} | **{r_warm:.3f}** |",
        f"| warm, +5% new files ({n_new:,}) | {n_new:,} | {new_best:.2f} | {new_med:.2f} | **{r_new:.3f}** |",
    ]
    tick_lines = ["| sensor tick | s |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in ticks.items()]
    mem = (f"Memory at {n:,} rows: the manifest DataFrame {frame_bytes / 2**20:.1f} MiB (deep, "
           f"{frame_bytes / n:.0f} B/row); peak Python allocation of a warm scan {warm_peak / 2**20:.1f} MiB "
           f"(tracemalloc: index columns, row dicts and the DataFrame; {warm_peak / n:.0f} B/row). "
           f"Index file {index_bytes / 2**20:.2f} MiB ({index_bytes / n:.0f} B/row, Parquet + zstd).")
    per_file = {"cold_ms": plain_s / n * 1e3, "warm_us": warm_best / n * 1e6,
                "new_ms": (new_best - warm_best) / max(n_new, 1) * 1e3}
    s3_lines = []
    if s3:
        s3_lines = [f"On moto's S3 server (in this process), {s3['n']:,} objects, index on the same bucket "
                    "(beside a store): requests per scan, counted on the scan's s3fs client.", "",
                    "| S3 scan | s | ListObjectsV2 | GetObject (images) | GetObject (index) | HeadObject | PutObject |",
                    "|---|---:|---:|---:|---:|---:|---:|"]
        for label in ("cold", "warm", "+5% new", "warm again"):
            r = s3[label]
            ops = r["ops"]
            s3_lines.append(f"| {label} | {r['seconds']:.2f} | {ops.get('ListObjectsV2', 0)} | {r['image_gets']} | "
                            f"{ops.get('GetObject', 0) - r['image_gets']} | {ops.get('HeadObject', 0)} | "
                            f"{ops.get('PutObject', 0)} |")
        s3_lines += ["", f"Warm scans GET no image object (asserted): {s3['warm']['image_gets']} and "
                         f"{s3['warm again']['image_gets']}; +5% new GETs exactly the {s3['new']} new ones."]
    m_warm, m_new = warm_med / statistics.median(plain_runs), new_med / statistics.median(plain_runs)
    verdicts = [f"warm, nothing changed: {r_warm:.3f}x the cold scan, best of each ({m_warm:.3f}x by medians; "
                f"target <= {TARGET_WARM}): {'PASS' if r_warm <= TARGET_WARM else 'MISS'}",
                f"warm, +5% new files: {r_new:.3f}x the cold scan, best of each ({m_new:.3f}x by medians; "
                f"target <= {TARGET_NEW}): {'PASS' if r_new <= TARGET_NEW else 'MISS'}"]
    notes = (f"{n:,} random 32x32 JPEGs (~1.5 KB), folder layout, 10 classes, local disk, warm page cache; "
             f"cold scans best of {args.cold_reps} (alternating), warm scans best of {args.reps}; load average at "
             f"the end {load()} on "
             f"{os.cpu_count()} CPUs shared with other work. Per file: cold {per_file['cold_ms']:.3f} ms, "
             f"warm {per_file['warm_us']:.1f} us, a new file on a warm scan {per_file['new_ms']:.3f} ms. "
             f"Total runtime {time.perf_counter() - t_start:.0f} s.")
    per_row = {**per_file, "index_bytes_per_row": index_bytes / n, "frame_bytes_per_row": frame_bytes / n,
               "warm_peak_per_row": warm_peak / n}  # what the README's projections multiply by N
    body = "\n".join([notes, "", *lines, "", *tick_lines, "", mem, "", *s3_lines, "", "  \n".join(verdicts),
                      "", f"<!-- per_file {json.dumps(per_row)} -->"])
    write_section("manifest_scale", body)
    print("\n" + body)


if __name__ == "__main__":
    sys.exit(main())
