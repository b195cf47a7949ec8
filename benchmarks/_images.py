"""Shared by the benchmarks: derived image sets, and the machine stamp + sections of RESULTS.md.

``image_set(n)`` writes ``n`` distinct JPEGs derived from the 560 dogscats photos (random crop,
flip, small resize, JPEG quality; one seeded RNG per file) into ``benchmarks/out/images-<n>/``
in the ``<split>/<class>/`` layout ``build_manifest`` reads, and reuses the folder next time.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"  # git-ignored
DOGSCATS = ROOT.parent / "shared" / "data" / "dogscats"
RESULTS = HERE / "RESULTS.md"
_RECIPE = 1  # bump when the way images are derived changes: cached sets are then rebuilt


def photos() -> list[Path]:
    found = sorted(DOGSCATS.glob("*/*/*.jpg"))
    if not found:
        raise SystemExit(f"no photos under {DOGSCATS}/<split>/<class>/*.jpg")
    return found


def _derive(src: Path, rng: np.random.Generator) -> bytes:
    with Image.open(src) as img:
        img = img.convert("RGB")
    w, h = img.size
    area, aspect = rng.uniform(0.45, 1.0), np.exp(rng.uniform(-0.25, 0.25))  # crop: 45-100% area
    cw, ch = min(w, int(w * np.sqrt(area * aspect))), min(h, int(h * np.sqrt(area / aspect)))
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    img = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = rng.uniform(0.75, 1.1)
    img = img.resize((max(32, int(cw * scale)), max(32, int(ch * scale))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
    return buf.getvalue()


def image_set(n: int, seed: int = 0) -> Path:
    """A folder of ``n`` distinct derived JPEGs (built once, then reused)."""
    folder = OUT / f"images-{n}"
    stamp = {"n": n, "seed": seed, "recipe": _RECIPE}
    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text()) == stamp:
        return folder
    sources, seen = photos(), set()
    print(f"generating {n} images into {folder} ...", flush=True)
    for i in range(n):
        src = sources[i % len(sources)]
        split, label = src.parent.parent.name, src.parent.name
        for attempt in range(100):  # a byte-identical twin would be one cache row, not two: reroll
            data = _derive(src, np.random.default_rng([seed, n, i, attempt]))
            digest = hashlib.sha256(data).digest()
            if digest not in seen:
                break
        seen.add(digest)
        path = folder / split / label / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    done.write_text(json.dumps(stamp))
    return folder


# --------------------------------------------------------------------------- RESULTS.md


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    u = platform.uname()
    return f"{os.cpu_count()} CPUs ({_cpu_model()}), {u.system} {u.release} {u.machine}, Python {platform.python_version()}"


def commit() -> str:
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
    sha = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    dirty = git("diff", "--quiet", "HEAD").returncode != 0  # tracked files only
    return sha + (" + uncommitted changes" if dirty else "")


def stamp() -> str:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"Date: {now}  \nMachine: {machine()}  \nCommit: {commit()}"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md, keeping every other section."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    section = f"{begin}\n## {name}\n\n{stamp()}\n\n{body.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in this folder; each owns one section.\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")
    print(f"wrote section {name!r} of {RESULTS}")
