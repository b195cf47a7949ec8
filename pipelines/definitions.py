"""The wiring: assets, resources with the embedded defaults, the recipe job, its schedules and sensor."""

import dagster as dg

from assets import LEADERBOARD_ASSETS, QUALITY_ASSETS, RECIPE_ASSETS, SWEEP_ASSETS
from assets._config import check_op_configs
from assets.activations import ActivationsConfig
from assets.evaluation import EvaluationConfig
from assets.training import FinetuneConfig, HeadOnCacheConfig, ImageStageConfig, LrFindHeadConfig, LrFindImagesConfig
from assets.partitions import RUN_CONFIGS, PartitionConfigError, arch_cut, config_file
from pipelines.housekeeping import cache_housekeeping
from pipelines.local import quiet_warnings
from pipelines.schedules import SCHEDULES
from pipelines.sharding import precompute_sharded
from pipelines.sensors import SENSORS
from precompute.errors import ConfigError
from resources import default_resources

quiet_warnings()  # dagster dev / dg dev / the tests: only the beta warnings of KNOWN_BETA_APIS are hidden

recipe_job = dg.define_asset_job(
    "recipe", selection=dg.AssetSelection.assets(*RECIPE_ASSETS), partitions_def=arch_cut,
    description="images -> manifest -> activations -> head on cache -> augmented head -> fine-tuned -> report")

data_quality_job = dg.define_asset_job(
    "quality", selection=dg.AssetSelection.assets(*QUALITY_ASSETS), partitions_def=arch_cut,
    description="duplicates, train/valid leaks, label errors, outliers and drift from the cached activations")

defs = dg.Definitions(assets=RECIPE_ASSETS + SWEEP_ASSETS + LEADERBOARD_ASSETS + QUALITY_ASSETS,
                      jobs=[recipe_job, data_quality_job, cache_housekeeping, precompute_sharded], schedules=SCHEDULES,
                      sensors=SENSORS, resources=default_resources())


# the recipe's config classes (precompute.settings models): their bounds and rules, checked at load too
RECIPE_CONFIGS = {"activations": ActivationsConfig, "lr_find_head": LrFindHeadConfig,
                  "head_on_cache": HeadOnCacheConfig,
                  "head_augmented": ImageStageConfig, "lr_find_unfrozen": LrFindImagesConfig,
                  "finetuned": FinetuneConfig, "evaluation_report": EvaluationConfig}


def _check_run_configs() -> None:
    """Every partition's run config from precompute.yaml against the recipe job's schema and its
    config classes' rules, at load: a scheduled run never launches with a config its step refuses."""
    job = defs.resolve_job_def("recipe")
    for partition, run_config in RUN_CONFIGS.items():
        if not run_config:
            continue
        try:
            dg.validate_run_config(job, run_config)
            check_op_configs(run_config, RECIPE_CONFIGS)
        except (dg.DagsterInvalidConfigError, ConfigError) as e:
            problems = "; ".join(err.message for err in getattr(e, "errors", [])) or str(e)
            raise PartitionConfigError(f"the run config for partition {partition} (run_config / partition_run_config "
                                       f"in {config_file()}) does not fit the recipe job: {problems}") from None


_check_run_configs()
