"""ImageNet-1k's size, end to end, on this machine: every stage timed, with every process's peak memory.

N synthetic JPEGs (``--n``; ImageNet-1k has 1,281,167 training images) in 1,000 classes, 32 px,
generated deterministically into ``benchmarks/out/imagenet-<N>/{train,valid}/c<class>/`` (10% of each
class in valid) and reused. A class is a background colour x a square's colour x a stripe pattern
(10 x 10 x 10), drawn with a random offset, brightness and noise per image: a linear head on the
frozen body's pooled features can learn it, so the accuracy means something (chance is 0.1%).

Stages, each in its own subprocess (the parent polls the RSS of it and of every child process it
starts, e.g. the Dask workers, at 5 Hz; the child also reports its own ``ru_maxrss``):

1. cold scan: ``build_manifest`` through a new scan index (every file hashed and decoded once);
2. warm scan: nothing changed (every file stat'ed, none opened);
3. +1% new images written into the folder, then a scan (only they are read);
4. precompute: the ``precompute_sharded`` job (pipelines/sharding.py) in this process, its 2 shards
   as tasks on a 2-worker Dask LocalCluster (1 thread each), tf_efficientnet_lite0 at 32 px, pooled,
   float16, 256-row chunks; the step's scan reads nothing (warm index);
5. one head epoch on the cache (``head_stage.train_head_on_cache``, linear head, one_cycle, memory budget 0:
   rows streamed chunk by chunk in shuffled chunk order through a 512 MiB shuffle buffer);
6. the evaluation of that head on the valid split from the cache (``inference.evaluate_on_cache``);
7. the sensor tick (pipelines/sensors.py) on the unchanged folder, after a first tick set its cursor.

Reported per stage: wall seconds, images/s, peak RSS of every process, the store's bytes and objects,
the manifest's rows and bytes (in memory, and pickled as Dagster's IO manager keeps it) and the scan
index's size. Figures at sizes not run are projected from the measured ones and marked so.

    .venv/bin/python benchmarks/imagenet_scale.py --n 128000        # writes the imagenet_scale section
    .venv/bin/python benchmarks/imagenet_scale.py --n 5000 --no-write

Not part of `make test`; tests/test_imagenet_scale.py runs it at 2,000 images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from _images import OUT, write_section  # noqa: E402

CLASSES, PX, VALID_EVERY, NEW_FRACTION = 1000, 32, 10, 0.01
IMAGENET_1K = 1_281_167
ARCH, SIZE, DTYPE, CHUNK_ROWS, BATCH = "tf_efficientnet_lite0", 32, "float16", 256, 64
PARTITION = f"{ARCH}|0"
_RECIPE = 1  # bump when the way images are generated changes


# --------------------------------------------------------------------------- images

def _palette(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (10, 3))


BACKGROUNDS, SQUARES = _palette(1), _palette(2)


def set_classes(n: int) -> None:
    global CLASSES
    CLASSES = n


def class_of(i: int) -> int:
    return i % CLASSES


def split_of(i: int) -> str:
    """Every 10th image of a class is in valid, rotated by class: at 2 images a class, some classes have one
    in valid, and every class has one in train."""
    return "valid" if (i // CLASSES + class_of(i)) % VALID_EVERY == VALID_EVERY - 1 else "train"


def render(i: int, seed: int = 0) -> bytes:
    """Image ``i``: its class's background, square and stripes, with its own offset, brightness and noise."""
    c = class_of(i)
    bg, fg, stripes = BACKGROUNDS[c % 10], SQUARES[(c // 10) % 10], (c // 100) % 10
    rng = np.random.default_rng([seed, i])
    img = np.empty((PX, PX, 3), np.float32)
    img[:] = bg
    yy, xx = np.mgrid[:PX, :PX]
    period, vertical = 3 + stripes // 2, stripes % 2
    band = ((xx if vertical else yy) + rng.integers(0, period)) % period < (period + 1) // 2
    img[band] = img[band] * 0.6 + 255 * 0.4
    s, (x, y) = PX // 2, rng.integers(2, PX - PX // 2 - 2, 2)
    img[y:y + s, x:x + s] = fg
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 6, img.shape)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def image_path(folder: Path, i: int) -> Path:
    return folder / split_of(i) / f"c{class_of(i):03d}" / f"{i:07d}.jpg"


def generate(folder: Path, start: int, stop: int) -> int:
    """Images ``start..stop-1`` into ``folder`` (those already there are kept); returns how many were written."""
    written = 0
    for i in range(start, stop):
        path = image_path(folder, i)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(render(i))
            os.replace(tmp, path)
            written += 1
    return written


# --------------------------------------------------------------------------- stages (in a child process)

def _rss_now() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


_AT_START: list = []


def _start() -> float:
    """The timer of a stage's work; the RSS then (imports done, nothing read yet) is its starting point."""
    if not _AT_START:
        _AT_START.append(_rss_now())
    return time.perf_counter()


def _max_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux


def _tree_bytes(root: Path) -> tuple[int, int]:
    size = objects = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            size += os.path.getsize(os.path.join(dirpath, f))
            objects += 1
    return size, objects


def _scan(folder: Path, work: Path) -> dict:
    from precompute.manifest import build_manifest
    from precompute.scan_index import Scan, ScanIndex

    scan = Scan(index=ScanIndex(work / "index"))
    t = _start()
    manifest = build_manifest(folder, scan=scan)
    seconds = time.perf_counter() - t
    blob = pickle.dumps(manifest, protocol=pickle.HIGHEST_PROTOCOL)  # measured only: what Dagster's IO manager keeps
    manifest.to_parquet(work / "manifest.parquet")  # what the later stages read back (no pickle loads)
    index = Path(scan.stats["index"])
    return {"seconds": seconds, "images": len(manifest), "read": scan.stats["read"],
            "ok": int((manifest["status"] == "ok").sum()), "manifest_bytes": int(manifest.memory_usage(deep=True).sum()),
            "manifest_pickle_bytes": len(blob), "index_bytes": index.stat().st_size}


def _resources(folder: Path, work: Path, dask=None) -> dict:
    from resources import ActivationStoreResource, ComputeDevice, DaskCluster, ImageSource

    return {"images": ImageSource(source=str(folder), scan_index=str(work / "index")),
            "store": ActivationStoreResource(root=str(work / "store")),
            "compute": ComputeDevice(device="cpu", num_threads=1), "dask": dask or DaskCluster(local_workers=2)}


def _entry(work: Path):
    from precompute.backbone import load_backbone, transform_for
    from precompute.stages.cache_fill import activation_key
    from precompute.store import ActivationStore

    bb = load_backbone(ARCH)
    ts = transform_for(bb.spec, SIZE)
    return bb, ts, ActivationStore(str(work / "store")).entry(activation_key(bb, ts, True, DTYPE))


def _manifest(work: Path):
    import pandas as pd

    return pd.read_parquet(work / "manifest.parquet")


def stage(name: str, folder: Path, work: Path, n: int) -> dict:
    import logging

    logging.getLogger("precompute").setLevel(logging.ERROR)
    if name == "generate":
        t = _start()
        written = generate(folder, 0, n)
        out = {"seconds": time.perf_counter() - t, "images": n, "written": written}
        if written:  # a file written less than a second before a scan is not trusted by the index (RACY_NS):
            time.sleep(1.1)  # without this wait the warm scan reads the last ones again on a fast machine
    elif name in ("cold_scan", "warm_scan"):
        out = _scan(folder, work)
    elif name == "new_images":
        n_new = max(1, round(n * NEW_FRACTION))
        t = _start()
        generate(folder, n, n + n_new)
        time.sleep(1.1)  # a file written less than a second before a scan is not trusted by the index (RACY_NS)
        written_s = time.perf_counter() - t
        out = {**_scan(folder, work), "written_seconds": written_s, "new": n_new}
    elif name == "precompute":
        import dagster as dg

        from pipelines.sharding import precompute_sharded

        import pandas  # noqa: F401 - imports before the timer, as a warm code location has them

        config = {"size": SIZE, "dtype": DTYPE, "chunk_rows": CHUNK_ROWS, "batch_size": BATCH, "shards": 2}
        t = _start()
        with dg.DagsterInstance.ephemeral() as instance:
            result = precompute_sharded.execute_in_process(
                run_config={"ops": {"precompute_shards": {"config": config}}}, resources=_resources(folder, work),
                partition_key=PARTITION, instance=instance)
            seconds = time.perf_counter() - t
            summary = result.output_for_node("precompute_shards")
            worker_lines = [r.user_message for r in instance.all_logs(result.run_id) if "on Dask worker" in r.user_message]
        size, objects = _tree_bytes(work / "store")
        out = {"seconds": seconds, "images": summary["images"], "computed": summary["computed"],
               "reused": summary["reused"], "shard_images_per_s": [s["images_per_s"] for s in summary["shards"]],
               "store_bytes": size, "store_objects": objects, "worker_log_lines": len(worker_lines)}
    elif name == "head_epoch":
        import torch

        from precompute.heads import HeadConfig
        from precompute.stages.head_stage import train_head_on_cache
        from precompute.train import Schedule

        manifest = _manifest(work)
        bb, ts, entry = _entry(work)
        t = _start()
        record = train_head_on_cache(entry, manifest, bb, ts, HeadConfig(xtra_fc=[]), lr=3e-2, batch_size=256,
                                     memory_budget=0, schedule=Schedule("one_cycle", epochs=1))
        seconds = time.perf_counter() - t
        torch.save(record.to_dict(), work / "head.pt")
        train = int(((manifest["split"] == "train") & (manifest["status"] == "ok")).sum())
        out = {"seconds": seconds, "images": train, "streamed": bool(record.streamed),
               "valid_accuracy": float(record.history[-1]["valid_accuracy"])}
    elif name == "evaluation":
        import torch

        from precompute.inference import evaluate_on_cache
        from precompute.records import checked_record

        manifest = _manifest(work)
        _, _, entry = _entry(work)
        record = checked_record(torch.load(work / "head.pt", weights_only=True), "head.pt")
        t = _start()
        probs, y = evaluate_on_cache(record, entry, manifest)
        seconds = time.perf_counter() - t
        out = {"seconds": seconds, "images": len(y), "accuracy": float((probs.argmax(1) == y).mean())}
    elif name in ("sensor_first", "sensor_unchanged"):
        import dagster as dg

        from pipelines.definitions import defs
        from pipelines.sensors import new_images_sensor

        cursor_file = work / "sensor_cursor.json"
        cursor = json.loads(cursor_file.read_text()) if name == "sensor_unchanged" else None
        ctx = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), cursor=cursor,
                                      repository_def=defs.get_repository_def(),
                                      resources={"images": _resources(folder, work)["images"]})
        t = _start()
        result = new_images_sensor.evaluate_tick(ctx)
        seconds = time.perf_counter() - t
        cursor_file.write_text(json.dumps(result.cursor))
        out = {"seconds": seconds, "images": n + max(1, round(n * NEW_FRACTION)), "runs": len(result.run_requests or []),
               "skip": (result.skip_message or "").replace(str(folder), "the folder")[:120]}
    else:
        raise SystemExit(f"unknown stage {name!r}")
    return {**out, "rss_at_start": _AT_START[0] if _AT_START else None, "peak_rss": _max_rss()}


# --------------------------------------------------------------------------- the parent

STAGES = ("generate", "cold_scan", "warm_scan", "new_images", "precompute", "head_epoch", "evaluation",
          "sensor_first", "sensor_unchanged")


def _role(proc, stage_pid: int) -> str:
    if proc.pid == stage_pid:
        return "stage"
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone
        return "child"
    if "resource_tracker" in cmd:
        return "resource tracker"
    if "forkserver" in cmd:
        return "forkserver"
    if "multiprocessing" in cmd or "spawn" in cmd:
        return "dask worker"
    return "child"


def _peaks(peaks: dict, roles: dict) -> list:
    return sorted(((roles[pid], peaks[pid] / 2**20) for pid in peaks if peaks[pid] > 40 * 2**20),
                  key=lambda r: (r[0] != "stage", r[0], -r[1]))


def _merge_peaks(attempts: list[list]) -> list:
    """Per role, the attempt with the highest peaks (each process of it)."""
    best: dict = {}
    for processes in attempts:
        for role in {r for r, _ in processes}:
            mine = sorted((m for r, m in processes if r == role), reverse=True)
            if sum(mine) > sum(best.get(role, [])):
                best[role] = mine
    return sorted(((r, m) for r, ms in best.items() for m in ms), key=lambda r: (r[0] != "stage", r[0], -r[1]))


def run_stage(name: str, folder: Path, work: Path, n: int) -> dict:
    """One stage in a fresh subprocess; the RSS of it and its children polled at 5 Hz."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1"}
    # output to files, not pipes: a stage that logs more than a pipe holds (the precompute step logs every
    # shard's progress) would block on a pipe nobody reads until it ends
    log_path, out_path = work / f"{name}.log", work / f"{name}.out"
    with open(log_path, "w") as log, open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--stage", name, "--folder", str(folder), "--work", str(work),
                                 "--n", str(n), "--classes", str(CLASSES)], stdout=out, stderr=log, text=True, env=env)
    root, peaks, roles = psutil.Process(proc.pid), {}, {}
    started, beat_at = time.perf_counter(), time.perf_counter()
    beat = work / f"{name}.heartbeat"
    with open(beat, "a") as f:
        f.write(json.dumps({"seconds": 0.0, "processes": []}) + "\n")
    while proc.poll() is None:
        if time.perf_counter() - beat_at >= 10:  # a cut-off attempt's time and memory, for --resume
            beat_at = time.perf_counter()
            lines = beat.read_text().splitlines()[:-1]
            lines.append(json.dumps({"seconds": beat_at - started, "processes": _peaks(peaks, roles)}))
            beat.write_text("\n".join(lines) + "\n")
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
            roles.setdefault(p.pid, _role(p, proc.pid))
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"stage {name} failed ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
    beat.unlink()
    result = json.loads(out_path.read_text().strip().splitlines()[-1])
    result["processes"] = _peaks(peaks, roles)
    shown = ", ".join(f"{role} {mib:.0f}" for role, mib in result["processes"])
    print(f"{name}: {result['seconds']:.1f} s, {result.get('images', 0):,} images, peak RSS MiB: {shown}  "
          + json.dumps({k: v for k, v in result.items() if k not in ('processes', 'seconds')}), flush=True)
    return result


def measure(n: int, folder: Path | None = None, work: Path | None = None, resume: bool = False) -> dict:
    """Every stage at ``n`` images. Each finished stage is saved at once (``imagenet_scale-<n>-c<classes>.json``
    beside a kept work folder); ``resume`` goes on from the first unfinished stage, in the same work folder:
    a precompute cut off (a session that ended, a crash) resumes on the resumable cache and its figures add
    up the attempts (each one's wall time and computed rows are kept)."""
    folder = folder or OUT / f"imagenet-{n}-c{CLASSES}-r{_RECIPE}"
    saved = (work or OUT) / f"imagenet_scale-{n}-c{CLASSES}.json"
    kept = (work or OUT) / f"imagenet-scale-work-{n}-c{CLASSES}"
    results = json.loads(saved.read_text()) if resume and saved.exists() else {"n": n, "stages": {}}
    if resume and all(name in results["stages"] for name in STAGES):
        return results  # finished before: nothing to run again
    if resume and kept.exists():
        work = kept
    else:
        shutil.rmtree(kept, ignore_errors=True)
        work = kept
        work.mkdir(parents=True)
        # the +1% images of an earlier run are removed, so every run starts from n images
        for i in range(n, n + max(1, round(n * NEW_FRACTION))):
            image_path(folder, i).unlink(missing_ok=True)
        results = {"n": n, "stages": {}}
    for name in STAGES:
        if name in results["stages"]:
            continue
        beat = work / f"{name}.heartbeat"  # written every 10 s while the stage runs
        earlier = [json.loads(line) for line in beat.read_text().splitlines()] if beat.exists() else []
        if name != "precompute":  # any other stage cut off runs again from its start: nothing of it is kept
            earlier = []
            beat.unlink(missing_ok=True)
        result = run_stage(name, folder, work, n)
        if earlier:  # a precompute cut off before: its rows were reused now, its time and memory count too
            result["attempts"] = [*earlier, {"seconds": result["seconds"], "computed": result["computed"]}]
            result["seconds"] += sum(a["seconds"] for a in earlier)
            result["computed"], result["reused"] = result["computed"] + result["reused"], 0
            result["processes"] = _merge_peaks([result["processes"], *(a["processes"] for a in earlier)])
        results["stages"][name] = result
        saved.write_text(json.dumps(results))
        print(f"results saved to {saved}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return results


def _fmt_n(x: float) -> str:
    return f"{x:,.0f}"


def _proc_cell(r: dict) -> str:
    start = f" (at start {r['rss_at_start']:,.0f})" if r.get("rss_at_start") else ""
    return "; ".join(f"{role} {mib:,.0f}" + (start if role == "stage" else "") for role, mib in r["processes"])


def table(res: dict, label: str) -> str:
    s = res["stages"]
    n = res["n"]
    rows = [f"**{n:,} images ({label})**", "",
            "| stage | wall s | images | images/s | peak RSS MiB per process | other figures |",
            "|---|---:|---:|---:|---|---|"]
    other = {
        "generate": lambda r: f"{r['written']:,} written (0 when reused)",
        "cold_scan": lambda r: f"{r['read']:,} read; manifest {r['manifest_bytes'] / 2**20:,.1f} MiB in pandas, "
                               f"{r['manifest_pickle_bytes'] / 2**20:,.1f} MiB pickled; scan index {r['index_bytes'] / 2**20:,.1f} MiB",
        "warm_scan": lambda r: f"{r['read']:,} read; scan index {r['index_bytes'] / 2**20:,.1f} MiB",
        "new_images": lambda r: f"{r['new']:,} new, {r['read']:,} read; manifest {r['manifest_bytes'] / 2**20:,.1f} MiB, "
                                f"scan index {r['index_bytes'] / 2**20:,.1f} MiB",
        "precompute": lambda r: f"{r['computed']:,} computed, {r['reused']:,} reused; shards "
                                + " + ".join(f"{x:,.0f}" for x in r["shard_images_per_s"]) + " img/s; store "
                                f"{r['store_bytes'] / 2**20:,.1f} MiB in {r['store_objects']:,} objects; "
                                f"{r['worker_log_lines']} worker log lines in Dagster"
                                + (f"; in {len(r['attempts'])} attempts, resumed on the cache (wall s "
                                   + " + ".join(f"{a['seconds']:,.0f}" for a in r["attempts"])
                                   + "; a cut-off attempt's time is the parent's to its last 10 s heartbeat)"
                                   if r.get("attempts") else ""),
        "head_epoch": lambda r: f"streamed: {r['streamed']}; valid accuracy after 1 epoch {r['valid_accuracy']:.1%}",
        "evaluation": lambda r: f"accuracy {r['accuracy']:.1%} (chance {1 / CLASSES:.1%})",
        "sensor_first": lambda r: f"{r['runs']} run(s) requested",
        "sensor_unchanged": lambda r: f"{r['runs']} run(s); {r['skip']}",
    }
    for name, r in s.items():
        rate = r["images"] / r["seconds"] if r["seconds"] > 0 and r.get("images") else 0
        note = f" ({r['note']})" if r.get("note") else ""
        rows.append(f"| {name.replace('_', ' ')} | {r['seconds']:,.2f} | {r.get('images', 0):,} | {_fmt_n(rate)} | "
                    f"{_proc_cell(r)} | {other[name](r)}{note} |")
    return "\n".join(rows)


def _peak(r: dict, role: str) -> float:
    return max((m for k, m in r["processes"] if k == role), default=0.0)


def projection(small: dict, big: dict, target: int) -> str:
    """Linear in the image count from the two measured sizes: time per image from the larger run; each
    process's peak RSS on the line through both (flat where they agree)."""
    ns, nb = small["n"], big["n"]
    rows = [f"**{target:,} images: projected from the {ns:,} and {nb:,} runs, not measured**", "",
            "| stage | wall s | peak RSS MiB, stage process | its growth MiB per 100,000 images | "
            "peak RSS MiB, each Dask worker |", "|---|---:|---:|---:|---:|"]
    for name in STAGES:
        a, b = small["stages"][name], big["stages"][name]
        cells = []
        for role in ("stage", "dask worker"):
            pa, pb = _peak(a, role), _peak(b, role)
            slope = (pb - pa) / (nb - ns)
            cells.append((pb + slope * (target - nb), slope * 1e5) if pb else None)
        worker = f"{cells[1][0]:,.0f}" if cells[1] else "-"
        rows.append(f"| {name.replace('_', ' ')} | {b['seconds'] * target / nb:,.0f} | {cells[0][0]:,.0f} | "
                    f"{cells[0][1]:+,.0f} | {worker} |")
    return "\n".join(rows)


def growth(small: dict, big: dict, flat_mib: float = 20.0) -> str:
    """Which processes held their peak memory flat (measured) from the smaller run to the larger one. A stage
    process counts from its RSS at start (imports done): runs whose imports differ compare fairly."""
    ns, nb = small["n"], big["n"]
    flat, grew = [], []
    for name in STAGES:
        for role in ("stage", "dask worker"):
            a, b = small["stages"][name], big["stages"][name]
            pa, pb = _peak(a, role), _peak(b, role)
            if pa and pb:
                sa, sb = (a.get("rss_at_start", 0.0), b.get("rss_at_start", 0.0)) if role == "stage" else (0.0, 0.0)
                more = (pb - sb) - (pa - sa)
                per = more / (nb - ns) * 2**20  # bytes per image
                over = " over its start" if sa or sb else ""
                label = (f"{name.replace('_', ' ')} ({role}{over}: {pa - sa:,.0f} -> {pb - sb:,.0f} MiB, "
                         f"{per / 1024:+,.1f} KiB an image)")
                (flat if more <= flat_mib else grew).append(label)
    return (f"Memory from {ns:,} to {nb:,} images (measured): flat (within {flat_mib:.0f} MiB) in "
            + "; ".join(flat) + ". **Not flat**: " + "; ".join(grew) + ".")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=128_000)
    p.add_argument("--small", type=int, default=5_000, help="the smaller run the growth is measured against")
    p.add_argument("--stage")
    p.add_argument("--folder")
    p.add_argument("--work")
    p.add_argument("--classes", type=int, default=CLASSES, help="1,000 as ImageNet-1k; fewer for a quick check")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--resume", action="store_true", help="go on from the first unfinished stage of a saved run")
    p.add_argument("--note", default="", help="a sentence for the section: why these sizes, what the machine was doing")
    p.add_argument("--render", nargs="*", help="write the section from saved results (benchmarks/out/imagenet_scale-*.json)")
    args = p.parse_args()
    set_classes(args.classes)
    if args.stage:
        print(json.dumps(stage(args.stage, Path(args.folder), Path(args.work), args.n)), flush=True)
        os._exit(0)  # interpreter teardown is not the stage's
    OUT.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    for path in args.render or ():  # tables again from saved results, nothing measured
        runs.append(json.loads(Path(path).read_text()))
    for n in () if args.render else sorted({args.small, args.n}):
        runs.append(measure(n, resume=args.resume))
    body = section(runs, args.note)
    print(f"\ntotal {time.perf_counter() - t0:,.0f} s\n\n{body}")
    if not args.no_write:
        write_section("imagenet_scale", body)


def section(runs: list[dict], note: str = "") -> str:
    notes = (f"Synthetic JPEGs ({PX} px, {CLASSES:,} classes, 10% valid), {ARCH} at {SIZE} px, pooled {DTYPE}, "
             f"{CHUNK_ROWS}-row chunks, batch {BATCH}; precompute = the `precompute_sharded` job, 2 shards on a "
             "2-worker Dask LocalCluster (1 thread each); head = linear, 1 epoch one_cycle, batch 256, streamed by "
             "chunk in shuffled chunk order through a 512 MiB shuffle buffer (precompute.train.SHUFFLE_BUFFER_BYTES). Every stage in a fresh process; peak RSS is polled at 5 Hz for the "
             "stage process and each of its children (the Dask workers), processes under 40 MiB left out. "
             "All figures in the measured tables are **measured** on this machine, which was shared with other "
             "jobs (wall times are not those of an idle machine).")
    def label(r: dict) -> str:
        todo = [name.replace("_", " ") for name in STAGES if name not in r["stages"]]
        return "measured" + (f"; not yet run: {', '.join(todo)}" if todo else "")

    parts = [notes + (" " + note if note else "")] + [table(r, label(r)) for r in runs]
    done = [r for r in runs if all(name in r["stages"] for name in STAGES)]
    if len(done) >= 2:
        parts.append(growth(done[0], done[-1]))
    if len(done) >= 2 and done[-1]["n"] < IMAGENET_1K:
        parts.append(projection(done[0], done[-1], IMAGENET_1K))
        big = [r for r in runs if r["n"] == IMAGENET_1K]
        parts.append(f"{IMAGENET_1K:,} images: " + (
            f"the stages in the table of {IMAGENET_1K:,} above are measured, the others only projected here."
            if big else "**not yet measured**; the table above is a projection."))
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
