"""The CUDA path, measured and checked against the CPU path in one command (a few minutes on one GPU):

    python benchmarks/gpu_check.py [--data FOLDER] [--out FILE.md] [--archs a,b] [--images N]

Without a CUDA device it says so and exits 0 (the test suite runs it that way). On CUDA, per arch
(tf_efficientnet_lite0 and resnet34 at 224 px; an arch whose weights are not on this machine is
skipped, and said so):

1. precompute of the reference set (dogscats, or synthetic JPEGs when it is missing) on the CPU
   (PIL decoding): the reference rows and the CPU's img/s;
2. the same on the GPU with PIL decoding in DataLoader workers (pinned, overlapped copies), with
   nvjpeg decoding on the GPU, and into a bfloat16 entry;
3. precompute img/s on a larger derived set (``--images``, default 2000) on the GPU, PIL and nvjpeg;
4. the head on each cache (``train_head_on_cache``: epoch seconds, valid accuracy);
5. one fine-tune epoch on images (every group unfrozen) on the GPU with bf16 autocast, and on the CPU.

Checks against the CPU path (relative error = ||gpu row - cpu row|| / ||cpu row||, per image):
- GPU, PIL decoding: max relative error <= 1e-2 (same pixels; cuDNN's kernels and TF32 convolutions);
- GPU, nvjpeg: median <= 5e-2 and max <= 0.2 (another JPEG decoder: IDCT and chroma upsampling differ);
- bfloat16 storage against the GPU's float32 rows: max relative error <= 4e-3 (bfloat16 keeps 8 bits);
- heads on the GPU caches: valid accuracy within 0.03 of the head on the CPU cache;
- fine-tune epoch: valid accuracy within 0.05 and valid loss within 0.1 of the CPU epoch.
Exit status 1 when a check fails; the tables are printed (and written to ``--out``) either way.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = ("tf_efficientnet_lite0", "resnet34")
GPU, ON_GPU_DECODER = "cuda", "nvjpeg"  # --cpu-dry-run: "cpu" and "pil", to try the script's logic anywhere
SIZE = 224
HEAD = {"ps": None, "xtra_fc": [512], "custom": None}  # precompute.heads.HeadConfig's fields
TOL = {"gpu_pil_max": 1e-2, "nvjpeg_median": 5e-2, "nvjpeg_max": 0.2, "bf16_max": 4e-3, "head_acc": 0.03,
       "finetune_acc": 0.05, "finetune_loss": 0.1}


def skip_without_cuda() -> None:
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda or 'none'}): skipped. Run it on a machine with an NVIDIA GPU.")
        sys.exit(0)


def synthetic_set(folder: Path, n: int) -> Path:
    """Two classes of 320x256 JPEGs (stripes one way or the other, with noise): when dogscats is missing."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        label = i % 2
        split = "valid" if i % 5 == 0 else "train"
        yy, xx = np.mgrid[0:256, 0:320]
        wave = np.sin((xx if label else yy) / rng.uniform(4, 12) + rng.uniform(0, 6.3))
        rgb = (127 + 90 * wave[..., None] * rng.uniform(0.3, 1, 3) + rng.normal(0, 20, (256, 320, 3))).clip(0, 255)
        path = folder / split / f"class{label}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb.astype(np.uint8)).save(path, quality=90)
    return folder


def data_sets(args, tmp: Path) -> tuple[Path, Path, str]:
    """(reference folder, throughput folder, what they are)."""
    import _images  # beside this script

    ref = Path(args.data) if args.data else _images.DOGSCATS
    if ref.is_dir() and any(ref.glob("*/*/*.jpg")):
        if ref == _images.DOGSCATS:
            return ref, _images.image_set(args.images), f"dogscats ({ref}) and {args.images} JPEGs derived from it"
        return ref, ref, str(ref)
    print(f"no photos under {ref}: using synthetic JPEGs (accuracy then says little; speed and values still do)")
    return synthetic_set(tmp / "ref", 400), synthetic_set(tmp / "bulk", args.images), "synthetic JPEGs"


def rel_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)


def precompute(manifest, bb, ts, device: str, decoder: str = "pil", dtype: str = "float32", workers: int = 0):
    from precompute.stages import cache_fill
    from precompute.store import ActivationStore

    store = ActivationStore(tempfile.mkdtemp(prefix="gpu_check-store-"))
    entry, stats, _ = cache_fill.precompute(manifest, store, bb, ts, True, dtype, batch_size=64, chunk_rows=1024,
                                            num_workers=workers, device=device, decoder=decoder)
    if device == "cuda":
        torch.cuda.synchronize()
    if stats.failed:
        print(f"  {len(stats.failed)} image(s) failed: {stats.failed[:3]}")
    return entry, stats


def warm_up(bb, ts) -> None:
    """cuDNN's algorithm choice and nvjpeg's start-up happen once, outside the timed runs."""
    from torchvision.io import decode_jpeg, encode_jpeg

    body = bb.body.to("cuda").eval()
    with torch.inference_mode():
        body(torch.zeros(64, 3, ts.size, ts.size, device="cuda").contiguous(memory_format=torch.channels_last))
    decode_jpeg([encode_jpeg(torch.zeros(3, 64, 64, dtype=torch.uint8))], device="cuda")
    torch.cuda.synchronize()
    bb.body.to("cpu")


def check(results: list, name: str, value: float, limit: float) -> None:
    ok = bool(np.isfinite(value) and value <= limit)
    results.append((name, value, limit, ok))


def run_arch(arch: str, ref_manifest, bulk_manifest, workers: int, results: list, rows: list) -> None:
    from precompute.backbone import load_backbone, transform_for
    from precompute.heads import HeadConfig
    from precompute.manifest import ok_rows
    from precompute.stages.head_stage import train_head_on_cache
    from precompute.stages.image_stage import train_on_images
    from precompute.train import Schedule
    from precompute.weights import WeightsUnavailable

    try:
        bb = load_backbone(arch)
    except WeightsUnavailable as exc:
        print(f"{arch}: weights not on this machine, skipped ({str(exc).splitlines()[0]})")
        return
    ts = transform_for(bb.spec, SIZE)
    if GPU == "cuda":
        warm_up(bb, ts)
    ids = list(ok_rows(ref_manifest)["image_id"].drop_duplicates())
    n_cpu = torch.get_num_threads()

    print(f"{arch}: precompute, {len(ids)} reference images at {SIZE} px")
    runs = {"cpu": precompute(ref_manifest, bb, ts, "cpu", workers=workers),
            "gpu_pil": precompute(ref_manifest, bb, ts, GPU, workers=workers),
            "gpu_nvjpeg": precompute(ref_manifest, bb, ts, GPU, ON_GPU_DECODER, workers=workers),
            "gpu_bf16": precompute(ref_manifest, bb, ts, GPU, dtype="bfloat16", workers=workers)}
    vals = {k: e.read(ids) for k, (e, _) in runs.items()}
    err_pil, err_nv = rel_errors(vals["gpu_pil"], vals["cpu"]), rel_errors(vals["gpu_nvjpeg"], vals["cpu"])
    err_bf16 = rel_errors(vals["gpu_bf16"], vals["gpu_pil"])
    check(results, f"{arch}: GPU/PIL rows vs CPU, max rel. error", float(err_pil.max()), TOL["gpu_pil_max"])
    check(results, f"{arch}: GPU/nvjpeg rows vs CPU, median rel. error", float(np.median(err_nv)), TOL["nvjpeg_median"])
    check(results, f"{arch}: GPU/nvjpeg rows vs CPU, max rel. error", float(err_nv.max()), TOL["nvjpeg_max"])
    check(results, f"{arch}: bfloat16 rows vs float32, max rel. error", float(err_bf16.max()), TOL["bf16_max"])

    print(f"{arch}: precompute throughput, {bulk_manifest['image_id'].nunique()} images on the GPU")
    bulk = {k: precompute(bulk_manifest, bb, ts, GPU, dec, workers=workers)[1]
            for k, dec in (("gpu_pil", "pil"), ("gpu_nvjpeg", ON_GPU_DECODER))}
    rows.append((arch, f"precompute, CPU ({n_cpu} threads, PIL)", runs["cpu"][1].images_per_s, len(ids)))
    rows.append((arch, f"precompute, GPU, PIL decoding ({workers} workers)", bulk["gpu_pil"].images_per_s,
                 bulk["gpu_pil"].computed))
    rows.append((arch, "precompute, GPU, nvjpeg decoding", bulk["gpu_nvjpeg"].images_per_s, bulk["gpu_nvjpeg"].computed))

    heads = {}
    for k in ("cpu", "gpu_pil", "gpu_nvjpeg"):
        rec = train_head_on_cache(runs[k][0], ref_manifest, bb, ts, HeadConfig(**HEAD), epochs=3, lr=3e-3,
                                  batch_size=64)
        heads[k] = rec
        last = rec.history[-1]
        n_train = int((ok_rows(ref_manifest, "train")).shape[0])
        rows.append((arch, f"head on cache ({k} rows), 3 epochs: acc {last['valid_accuracy']:.4f}",
                     n_train / np.mean([h["seconds"] for h in rec.history]), n_train))
    for k in ("gpu_pil", "gpu_nvjpeg"):
        diff = abs(heads[k].history[-1]["valid_accuracy"] - heads["cpu"].history[-1]["valid_accuracy"])
        check(results, f"{arch}: head on {k} rows, valid accuracy vs CPU rows", diff, TOL["head_acc"])

    n_imgs = len(ok_rows(ref_manifest, "train")) + len(ok_rows(ref_manifest, "valid"))
    tuned = {}
    for device in (GPU, "cpu"):
        rec = train_on_images(heads["cpu"], ref_manifest, "finetuned", Schedule("one_cycle", epochs=1), 1e-4,
                              freeze=0, batch_size=32, seed=0, num_workers=workers, device=device,
                              augmentation={"preset": "side_on"})
        last = tuned[device] = rec.history[-1]
        what = "GPU, bf16 autocast" if device != "cpu" else f"CPU ({n_cpu} threads)"
        rows.append((arch, f"fine-tune epoch, {what}: acc {last['valid_accuracy']:.4f} loss {last['valid_loss']:.4f}",
                     n_imgs / last["seconds"], n_imgs))
    check(results, f"{arch}: fine-tune epoch, valid accuracy GPU vs CPU",
          abs(tuned[GPU]["valid_accuracy"] - tuned["cpu"]["valid_accuracy"]), TOL["finetune_acc"])
    check(results, f"{arch}: fine-tune epoch, valid loss GPU vs CPU",
          abs(tuned[GPU]["valid_loss"] - tuned["cpu"]["valid_loss"]), TOL["finetune_loss"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an image folder (<split>/<class>/*.jpg) as the reference set")
    parser.add_argument("--out", help="also write the tables to this Markdown file")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--images", type=int, default=2000, help="images in the throughput set")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every step with the CPU standing in for the GPU (PIL for nvjpeg): tries the "
                             "script's logic without a GPU; its figures mean nothing")
    args = parser.parse_args()
    if args.cpu_dry_run:
        global GPU, ON_GPU_DECODER
        GPU, ON_GPU_DECODER = "cpu", "pil"
    else:
        skip_without_cuda()

    from precompute.manifest import build_manifest

    start = time.perf_counter()
    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ref, bulk, what = data_sets(args, Path(tmp))
        ref_manifest, bulk_manifest = build_manifest(ref), build_manifest(bulk)
        results, rows = [], []
        for arch in args.archs.split(","):
            run_arch(arch.strip(), ref_manifest, bulk_manifest, workers, results, rows)
    gpu = torch.cuda.get_device_name(0) if GPU == "cuda" else "the CPU (dry run: no GPU figures)"
    lines = [f"gpu_check on {gpu}, torch {torch.__version__}, {os.cpu_count()} CPU cores; data: {what}; "
             f"{time.perf_counter() - start:.0f} s", "",
             "| arch | run | images/s | images |", "|---|---|---:|---:|",
             *[f"| {a} | {r} | {v:.1f} | {n} |" for a, r, v, n in rows], "",
             "| check | value | limit | ok |", "|---|---:|---:|---|",
             *[f"| {n} | {v:.4g} | {lim:g} | {'yes' if ok else '**NO**'} |" for n, v, lim, ok in results]]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not rows:
        print("gpu_check: no arch could be measured")
        return 1
    return 0 if all(ok for *_, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
