from assets.activations import activations
from assets.evaluation import evaluation_report
from assets.manifest import image_manifest
from assets.training import finetuned, head_augmented, head_on_cache

RECIPE_ASSETS = [image_manifest, activations, head_on_cache, head_augmented, finetuned, evaluation_report]
