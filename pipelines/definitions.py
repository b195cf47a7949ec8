"""The wiring: assets, resources with the embedded defaults, the recipe job, its schedules and sensor."""

import dagster as dg

from assets import RECIPE_ASSETS, SWEEP_ASSETS
from assets.partitions import arch_cut
from pipelines.housekeeping import cache_housekeeping
from pipelines.schedules import SCHEDULES
from pipelines.sharding import precompute_sharded
from pipelines.sensors import SENSORS
from resources import default_resources

recipe_job = dg.define_asset_job(
    "recipe", selection=dg.AssetSelection.assets(*RECIPE_ASSETS), partitions_def=arch_cut,
    description="images -> manifest -> activations -> head on cache -> augmented head -> fine-tuned -> report")

defs = dg.Definitions(assets=RECIPE_ASSETS + SWEEP_ASSETS, jobs=[recipe_job, cache_housekeeping, precompute_sharded], schedules=SCHEDULES,
                      sensors=SENSORS, resources=default_resources())
