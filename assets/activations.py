import time

import dagster as dg

from assets._config import SettingsConfig
from assets._util import LazyModule
from assets.metadata import ActivationsMetadata
from assets.partitions import arch_and_cut, arch_cut
from precompute.errors import ConfigError
from precompute.settings import ActivationSettings, all_checks
from precompute.versions import CODE_VERSION

cache_fill = LazyModule("precompute.stages.cache_fill")  # torch loads when a step runs, not with the definitions
validate = LazyModule("precompute.validate")
body_spec = LazyModule("precompute.body_spec")
from resources import ActivationStoreResource, ComputeDevice


class ActivationsConfig(SettingsConfig, ActivationSettings):
    """activations' settings (precompute.settings.ActivationSettings): dtype, decoder and weights are choices."""


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
        all_checks(lambda: body_spec.BodySpec(arch, xtra_cut, config.size),
                   lambda: validate.validate_run(arch=arch, weights=config.weights, weights_path=config.weights_path,
                                                 manifest=image_manifest))
        writable = validate.check_store(store.root, store.storage_options_json, read_only_ok=True)  # the one probe
        device = compute.setup()
        settings = cache_fill.CacheSettings(**config.model_dump())
        fill = cache_fill.fill_cache(image_manifest, store.get(), arch, xtra_cut, settings, writable,
                                     compute.num_workers, device, progress_logger(context), context.log)
    except (ConfigError, cache_fill.ReadOnlyStore) as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    yield dg.Output(fill.ref, data_version=dg.DataVersion(fill.ref.view_key), metadata=ActivationsMetadata(**fill.metadata()).to_metadata())
    for name, (passed, details) in fill.checks.items():
        yield dg.AssetCheckResult(check_name=name, passed=passed, metadata=details)
