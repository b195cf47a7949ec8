"""A sensor that launches the recipe when the images change.

The fingerprint is cheap: relative path, size and mtime of every image file of the source (for a
CSV also the CSV's bytes), hashed; no image is read. It is the sensor's cursor: an unchanged source
launches nothing, a new, removed, replaced or touched image launches one recipe run per configured
arch|cut partition. That is cheap too, because the activations asset computes only new or changed
images and the rest of the cache is reused.

Created STOPPED: switch it on under Automation in the Dagster UI (`make ui`).
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Optional

import dagster as dg

from assets.partitions import arch_cut
from pipelines.schedules import RECIPE_JOB
from precompute.data import IMAGE_EXTENSIONS
from resources import ImageSource


def _is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _stat_line(rel: str, path: Path) -> str:
    try:
        st = path.stat()
    except OSError:  # listed but missing, or a broken link: part of the state too
        return f"{rel}\tmissing\n"
    return f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n"


def source_fingerprint(source: str | Path, root: Optional[str | Path] = None) -> tuple[str, int]:
    """(sha256 hex, number of image files) of an image folder or a CSV of path,label[,split].

    A folder: every image file under it (hidden files and folders skipped, as the manifest does).
    A CSV: its bytes plus every image file it lists, relative to ``root`` (default: its folder).
    Raises FileNotFoundError when the source does not exist.
    """
    source = Path(source).expanduser()
    h, n = hashlib.sha256(), 0
    if source.is_dir():
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            here = Path(dirpath)
            for name in sorted(filter(_is_image, filenames)):
                h.update(_stat_line((here / name).relative_to(source).as_posix(), here / name).encode())
                n += 1
    elif source.is_file():
        data = source.read_bytes()
        h.update(hashlib.sha256(data).digest())
        base = Path(root).expanduser() if root is not None else source.parent
        rows = csv.reader(data.decode("utf-8", errors="replace").splitlines())
        header = [c.strip().lower() for c in next(rows, [])]
        if "path" in header:
            col = header.index("path")
            for row in rows:
                rel = row[col].strip() if len(row) > col else ""
                if rel and _is_image(Path(rel).name):
                    h.update(_stat_line(rel, base / Path(rel).expanduser()).encode())
                    n += 1
    else:
        raise FileNotFoundError(f"image source {source} does not exist")
    return h.hexdigest(), n


@dg.sensor(job_name=RECIPE_JOB, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Launches one recipe run per configured arch|cut partition when images in the source "
                       "folder or CSV are added, removed or changed (path + size + mtime fingerprint).")
def new_images_sensor(context: dg.SensorEvaluationContext, images: ImageSource):
    source = images.resolve()
    try:
        fingerprint, n = source_fingerprint(source, images.root)
    except FileNotFoundError as e:
        return dg.SkipReason(f"{e}: set PRECOMPUTE_DATA to an image folder or CSV")
    if fingerprint == context.cursor:
        return dg.SkipReason(f"{n} image files in {source} unchanged since the last launch")
    # The key names the transition, so a retried tick launches nothing twice.
    change = f"{(context.cursor or 'none')[:12]}-{fingerprint[:12]}"
    context.log.info(f"{n} image files in {source}: fingerprint {fingerprint[:12]} (was {context.cursor})")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"{change}:{partition}", partition_key=partition,
                                    tags={"precompute/trigger": "new_images_sensor",
                                          "precompute/source_fingerprint": fingerprint[:12]})
                      for partition in arch_cut.get_partition_keys()],
        cursor=fingerprint)


SENSORS = [new_images_sensor]
