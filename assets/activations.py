import json
import time
from typing import Optional

import dagster as dg

from assets.partitions import arch_and_cut, arch_cut
from precompute import recipe
from precompute.store import CODE_VERSION
from precompute.train import ConfigError
from precompute.validate import check_store, validate_run
from resources import ActivationStoreResource, ComputeDevice


class ActivationsConfig(dg.Config):
    size: Optional[int] = None        # image size; None: the arch's input size
    pooled: bool = True               # concat max+avg pool vector (fastai); False: spatial maps
    dtype: str = "float32"            # storage dtype: float32 or float16
    batch_size: int = 32
    chunk_rows: int = 256             # rows per committed chunk: the most a crash can lose
    weights: str = "pretrained"       # or "random"
    weights_path: Optional[str] = None


CHECKS = {
    "rows_match_manifest": "every ok image of the manifest has a row in the entry",
    "finite_values": "no NaN or inf in the cached activations",
    "every_image_accounted_for": "every manifest image has a row or a recorded reason for skipping it",
    "blocks_verified": "every block read back passed its crc32c checksum (damaged chunks were dropped and recomputed)",
}


def progress_logger(context, prefix: str = "precompute"):
    """Dagster log lines with images/s and ETA (tqdm shows the same on a terminal)."""
    start = time.perf_counter()

    def log(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - start, 1e-9)
        context.log.info(f"{prefix} {done}/{total} images, {rate:.1f} img/s, ETA {(total - done) / max(rate, 1e-9):.0f}s")
    return log


@dg.asset(group_name="recipe", partitions_def=arch_cut, code_version=CODE_VERSION,
          tags={"precompute/cacheable": "true"},
          check_specs=[dg.AssetCheckSpec(name, asset="activations", description=d) for name, d in CHECKS.items()])
def activations(context: dg.AssetExecutionContext, config: ActivationsConfig, image_manifest,
                store: ActivationStoreResource, compute: ComputeDevice):
    """The frozen body's activations for every ok image, in the Zarr cache (computed once)."""
    arch, xtra_cut = arch_and_cut(context)
    try:  # before any work: nothing is created or loaded; an unreachable store fails within seconds
        validate_run(arch=arch, xtra_cut=xtra_cut, size=config.size, dtype=config.dtype, weights=config.weights,
                     weights_path=config.weights_path, manifest=image_manifest)
        writable = check_store(store.root, store.storage_options_json, read_only_ok=True)
    except ConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    device = compute.setup()
    act_store = store.get()
    bb = recipe.load_backbone(arch, xtra_cut, config.weights, config.weights_path)
    ts = recipe.transform_for(bb.spec, config.size)
    try:  # damaged chunks are dropped here, so the precompute below recomputes their rows
        repaired = recipe.repair_entry(act_store.entry(recipe.activation_key(bb, ts, config.pooled, config.dtype)),
                                       image_manifest, writable)
    except RuntimeError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    if repaired.damaged:
        context.log.warning(f"dropped {len(repaired.damaged)} damaged chunk(s), their rows are recomputed: "
                            + "; ".join(repaired.damaged.values()))
    entry, stats, view = recipe.precompute(
        image_manifest, act_store, bb, ts, config.pooled, config.dtype, config.batch_size,
        config.chunk_rows, compute.num_workers, device,
        on_progress=progress_logger(context))
    ref = recipe.ActivationsRef.of(entry, view, config.weights, config.weights_path,
                                   stats.failed)  # failed: no rows, later stages leave them out
    on_disk, raw = entry.nbytes_on_disk(), entry.raw_nbytes()
    context.log.info(f"activations {entry.rel}: {stats.computed} computed, {stats.reused} reused, "
                     f"{stats.images_per_s:.1f} img/s, {on_disk / 2**20:.1f} MiB on disk")
    if stats.failed:  # the run goes on without them; the checks below fail and name them
        context.log.warning(f"{len(stats.failed)} images failed to decode or transform and have no row: "
                            + "; ".join(f"{path}: {reason}" for _, path, reason in stats.failed[:10]))
    yield dg.Output(ref, data_version=dg.DataVersion(view), metadata={
        "entry": entry.rel,
        "entry_key": entry.key.digest(),
        "view_key": view,
        "key_parts": dg.MetadataValue.json(json.loads(json.dumps(entry.key.parts(), default=str))),
        **{k: dg.MetadataValue.float(float(v)) if isinstance(v, float) else v for k, v in stats.as_dict().items()},
        "bytes_on_disk": on_disk,
        "compression_ratio": dg.MetadataValue.float(round(raw / on_disk, 3) if on_disk else 0.0),
        "codec": entry.codec(),
        "chunks_verified": len(repaired.verified),
        "chunks_unverified": len(repaired.unverified),  # written before checksums: readable, not verifiable
        "chunks_repaired": dg.MetadataValue.json(repaired.damaged),
    })
    for name, (passed, details) in recipe.verify_entry(entry, image_manifest, stats.failed).items():
        yield dg.AssetCheckResult(check_name=name, passed=passed, metadata=details)
