from assets.activations import activations
from assets.evaluation import evaluation_report
from assets.leaderboard import arch_leaderboard
from assets.manifest import image_manifest
from assets.quality import data_quality
from assets.sweep import head_sweep
from assets.training import finetuned, head_augmented, head_on_cache, lr_find_head, lr_find_unfrozen

RECIPE_ASSETS = [image_manifest, activations, lr_find_head, head_on_cache, head_augmented, lr_find_unfrozen,
                 finetuned, evaluation_report]
SWEEP_ASSETS = [head_sweep]  # on demand, not in the recipe job: many heads on one partition's cache
LEADERBOARD_ASSETS = [arch_leaderboard]  # not partitioned: every evaluated arch x cut side by side
QUALITY_ASSETS = [data_quality]  # on demand or nightly: findings from the cache, for a person to act on
