"""The recipe's stages under their old names: precompute -> head on the cache -> head with
augmentation -> unfreeze and fine-tune -> evaluate.

Each job lives in its own module; this one only re-exports them, so ``recipe.precompute`` and the
other names callers used keep working:

- ``precompute.backbone``: the cut pretrained body (``load_backbone``, ``transform_for``, ``rebuild``);
- ``precompute.rows``: labelled rows from the manifest, the cache or image files;
- ``precompute.stages.cache_fill``: the ``activations`` stage (``precompute``, ``fill_cache``, ``verify_entry``);
- ``precompute.stages.head_stage``: ``head_on_cache`` (``train_head_stage``, ``HeadStage``);
- ``precompute.stages.image_stage``: the stages on images (``ImageStage``, ``run_image_stage``);
- ``precompute.stages.report``: ``evaluation_report``; ``precompute.inference``: predictions.
"""

from precompute.backbone import Backbone, load_backbone, transform_for, with_size  # noqa: F401
from precompute.inference import evaluate_on_cache, evaluate_on_images, predict_paths, rebuild  # noqa: F401
from precompute.records import ActivationsRef, StageRecord, checked_record, save_model  # noqa: F401
from precompute.rows import (DEFAULT_MEMORY_BUDGET, Classes, cached_rows, cached_split, failed_images,  # noqa: F401
                             image_loader, labelled_split, targets, without_failed)
from precompute.stages.cache_fill import (CacheFill, CacheSettings, ReadOnlyStore, activation_key,  # noqa: F401
                                          check_same_weights, fill_cache, open_entry, precompute, repair_entry,
                                          verify_entry)
from precompute.stages.common import LOG, OpenRun, log_stage, schedule_params, stage_metadata  # noqa: F401
from precompute.stages.head_stage import (HEAD_CODE_VERSION, HeadStage, head_fingerprint,  # noqa: F401
                                          head_on_cache_cached, load_head_result, lr_find_on_cache, lr_find_on_ref,
                                          save_head_result, train_head_on_cache, train_head_stage)
from precompute.stages.image_stage import (ImageStage, augmented_samples, lr_find_on_images,  # noqa: F401
                                           run_image_stage, stage_learner, stage_lrs, train_image_stage,
                                           train_on_images)
from precompute.stages.report import accuracy_metadata, evaluate_stages, evaluation_report, write_report  # noqa: F401
from precompute.transforms import eval_transform  # noqa: F401
