"""A job that removes cache entries no partition uses any more, from the Dagster UI or a schedule."""

import dagster as dg

from assets._config import SettingsConfig
from assets.partitions import arch_cut
from precompute.settings import HousekeepingSettings
from resources import ActivationStoreResource


class HousekeepingConfig(SettingsConfig, HousekeepingSettings):
    """unused_days (>= 0): entries neither read nor written for this long may go; dry_run: only list them."""


def entries_in_use(instance: dg.DagsterInstance) -> set[str]:
    """The entry each activations partition's latest materialization points at."""
    keep = set()
    for partition in arch_cut.get_partition_keys():
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("activations"), asset_partitions=[partition]), limit=1).records
        if records:
            entry = records[0].asset_materialization.metadata.get("entry")
            if entry is not None:
                keep.add(entry.value)
    return keep


@dg.op
def remove_unused_cache_entries(context: dg.OpExecutionContext, config: HousekeepingConfig,
                                store: ActivationStoreResource) -> list:
    keep = entries_in_use(context.instance)
    removed = store.get().remove_unused(keep, config.unused_days * 86400, dry_run=config.dry_run)
    context.log.info(f"{'would remove' if config.dry_run else 'removed'} {len(removed)}; kept in use: {sorted(keep)}")
    context.add_output_metadata({"removed": dg.MetadataValue.json(removed), "kept_in_use": dg.MetadataValue.json(sorted(keep))})
    return removed


@dg.job(description="Remove activation cache entries that no partition uses and nobody read for a while")
def cache_housekeeping():
    remove_unused_cache_entries()
