"""A sensor that launches the recipe when the images change.

Each tick looks in two steps, the cheap one first:

1. A stat fingerprint: relative path, size and mtime of every image file of the source (for a CSV
   also the CSV's bytes; for a URL source each object's key, size and ETag from one listing),
   hashed. No image is read. An unchanged fingerprint launches nothing.
2. When the fingerprint moved, the content: a manifest scan through the scan index (the one the
   runs use, beside the store) reads only the files whose signature changed, and the manifest's
   digest, which is the ``image_manifest`` asset's data version, decides. A new, removed or
   replaced image (or a changed label) launches one recipe run per configured arch|cut partition
   (with its run config from precompute.yaml; a partition whose weights are not available is skipped); a
   file that was only touched or copied over with the same bytes launches nothing. The scan also
   brings the index up to date, so the run it launches reads nothing again. When more files
   changed than ``$PRECOMPUTE_SENSOR_READ_BUDGET`` (default 2,000: a tick must stay well inside
   Dagster's sensor timeout), the tick launches on the fingerprint alone and the run does the reading.
   So it does when the source holds more than ``$PRECOMPUTE_SENSOR_SCAN_MAX_FILES`` files (default
   250,000): even reading nothing, the scan rebuilds the whole manifest (about 4x the fingerprint's
   time, ~50 s at ImageNet-1k's 1,281,167 on 2 cores, too near the 60 s timeout); a file only touched
   then launches a run that computes nothing.

The cursor holds both: ``{"stat": <fingerprint>, "digest": <manifest digest or null>}``. Runs are
cheap either way, because the activations asset computes only new or changed images.

Created STOPPED: switch it on under Automation in the Dagster UI (`make ui`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
from pathlib import Path
from typing import Optional

import dagster as dg

from pipelines.schedules import RECIPE_JOB, recipe_requests, runnable_partitions
from precompute import sources
from precompute.paths import ManifestError, is_image_name
from precompute.scan_index import ScanBudgetExceeded, manifest_digest
from resources import ImageSource

SENSOR_READ_BUDGET = 2000
SENSOR_SCAN_MAX_FILES = 250_000


def _stat_line(rel: str, path) -> str:
    try:
        st = os.stat(path)
    except OSError:  # listed but missing, or a broken link: part of the state too
        return f"{rel}\tmissing\n"
    return f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n"


def _csv_paths(data: bytes) -> list[str]:
    rows = csv.reader(data.decode("utf-8", errors="replace").splitlines())
    header = [c.strip().lower() for c in next(rows, [])]
    if "path" not in header:
        return []
    col = header.index("path")
    return [rel for rel in (row[col].strip() if len(row) > col else "" for row in rows)
            if rel and is_image_name(posixpath.basename(rel))]


def _remote_fingerprint(source: str, root: Optional[str], storage_options: Optional[dict]) -> tuple[str, int]:
    fs, path = sources.filesystem(source, storage_options)
    path = path.rstrip("/")
    h, n = hashlib.sha256(), 0
    if path.lower().endswith(".csv"):
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"image source {source} does not exist") from None
        h.update(hashlib.sha256(data).digest())
        base = fs._strip_protocol(root).rstrip("/") if root else posixpath.dirname(path)
        sources.forget_listings(fs, base)
        infos = fs.find(base, detail=True)
        for rel in _csv_paths(data):
            info = infos.get(posixpath.normpath(f"{base}/{rel}"))
            h.update((f"{rel}\t{sources.signature(info)}\n" if info else f"{rel}\tmissing\n").encode())
            n += 1
        return h.hexdigest(), n
    sources.forget_listings(fs, path)
    infos = fs.find(path, detail=True)
    if not infos:
        raise FileNotFoundError(f"image source {source} does not exist (no object under it)")
    for key in sorted(infos):
        parts = key[len(path) + 1:].split("/")
        if any(p.startswith(".") for p in parts[:-1]) or not is_image_name(parts[-1]):
            continue
        h.update(f"{'/'.join(parts)}\t{sources.signature(infos[key])}\n".encode())
        n += 1
    return h.hexdigest(), n


def source_fingerprint(source: str | Path, root: Optional[str | Path] = None,
                       storage_options: Optional[dict] = None) -> tuple[str, int]:
    """(sha256 hex, number of image files) of an image folder, a CSV of path,label[,split], or a URL of either.

    A folder: every image file under it (hidden files and folders skipped, as the manifest does).
    A CSV: its bytes plus every image file it lists, relative to ``root`` (default: its folder).
    A URL: the same from one listing (size and ETag or version id per object); nothing is fetched
    but a CSV. Raises FileNotFoundError when the source does not exist.
    """
    if sources.is_url(source):
        return _remote_fingerprint(str(source), None if root is None else str(root), storage_options)
    source = Path(sources.local_path(source)).expanduser()
    h, n = hashlib.sha256(), 0
    if source.is_dir():
        top = os.fspath(source)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, top).replace(os.sep, "/")
            prefix = "" if rel_dir == "." else rel_dir + "/"
            for name in sorted(filter(is_image_name, filenames)):  # strings, not Paths: ~1 s less per 100k files
                h.update(_stat_line(prefix + name, os.path.join(dirpath, name)).encode())
                n += 1
    elif source.is_file():
        data = source.read_bytes()
        h.update(hashlib.sha256(data).digest())
        base = Path(root).expanduser() if root is not None else source.parent
        for rel in _csv_paths(data):
            h.update(_stat_line(rel, base / Path(rel).expanduser()).encode())
            n += 1
    else:
        raise FileNotFoundError(f"image source {source} does not exist")
    return h.hexdigest(), n


def _content_digest(images: ImageSource, n: int) -> tuple[Optional[str], str]:
    """(the manifest's digest, how it was found), or (None, why not) when the read budget is exceeded."""
    budget = int(os.environ.get("PRECOMPUTE_SENSOR_READ_BUDGET", SENSOR_READ_BUDGET))
    scan = images.scan(max_reads=budget)
    try:
        return manifest_digest(images.manifest(scan)), f"{scan.stats['read']} of {n} files read"
    except ScanBudgetExceeded as e:
        return None, f"{e.to_read} of {n} files new or changed, over the read budget of {budget}: the run reads them"


def _parse_cursor(cursor: Optional[str]) -> dict:
    if not cursor:
        return {}
    try:
        value = json.loads(cursor)
    except json.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"stat": cursor}  # a cursor from before the content check


@dg.sensor(job_name=RECIPE_JOB, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Launches one recipe run per configured arch|cut partition when images in the source "
                       "folder, CSV or bucket are added, removed, replaced or relabelled (a stat fingerprint, then "
                       "the content of what changed, read through the scan index).")
def new_images_sensor(context: dg.SensorEvaluationContext, images: ImageSource):
    source = images.resolve()
    try:
        fingerprint, n = source_fingerprint(source, images.root, images.storage_options())
    except FileNotFoundError as e:
        return dg.SkipReason(f"{e}: set PRECOMPUTE_DATA to an image folder or CSV")
    last = _parse_cursor(context.cursor)
    if fingerprint == last.get("stat"):
        return dg.SkipReason(f"{n} image files in {source} unchanged since the last launch")
    max_files = int(os.environ.get("PRECOMPUTE_SENSOR_SCAN_MAX_FILES", SENSOR_SCAN_MAX_FILES))
    if n > max_files:
        digest, how = None, (f"{n} files, over the content check's limit of {max_files} "
                             "($PRECOMPUTE_SENSOR_SCAN_MAX_FILES): launched on the stat fingerprint, the run reads "
                             "what changed")
    else:
        try:
            digest, how = _content_digest(images, n)
        except ManifestError as e:
            return dg.SkipReason(f"{source} cannot be scanned: {e}")
    cursor = json.dumps({"stat": fingerprint, "digest": digest})
    if digest is not None and digest == last.get("digest"):
        return dg.SensorResult(skip_reason=f"{n} image files in {source} changed on disk but their content, labels "
                                           f"and splits did not ({how}): nothing to run", cursor=cursor)
    # The key names the transition, so a retried tick launches nothing twice.
    before = last.get("digest") or last.get("stat") or "none"
    change = f"{before[:12]}-{(digest or fingerprint)[:12]}-{fingerprint[:8]}"
    context.log.info(f"{n} image files in {source}: {how}; manifest {digest and digest[:12]} "
                     f"(was {last.get('digest')})")
    requests = recipe_requests(change, {"precompute/trigger": "new_images_sensor",
                                        "precompute/source_fingerprint": fingerprint[:12],
                                        "precompute/manifest_digest": (digest or "")[:12]}, context.log)
    if not requests:
        return dg.SensorResult(skip_reason="images changed, but no configured partition has its weights available "
                                           "here: " + "; ".join(f"{p}: {why}" for p, why in runnable_partitions()[1].items()),
                               cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)


SENSORS = [new_images_sensor]
