"""Stage settings typed once (precompute.settings): the launchpad shows the choices, the run config
keeps its flat keys, a bad value fails before any work, and both faces (Dagster configs, the
library's runtime types and the Learner) say the same thing for the same mistake."""

import typing

import dagster as dg
import pytest

from assets.activations import ActivationsConfig
from assets.evaluation import EvaluationConfig
from assets.quality import DataQualityConfig
from assets.sweep import HeadSweepConfig
from assets.training import (FinetuneConfig, HeadOnCacheConfig, ImageStageConfig, LrFindConfig, LrFindImagesConfig,
                             ScheduleConfig)
from pipelines.housekeeping import HousekeepingConfig
from pipelines.sharding import ShardedPrecomputeConfig
from precompute import settings
from precompute.errors import ConfigError

# The run-config keys and defaults before the settings were typed: existing run configs, schedules
# and the README keep working, so these stay as they were.
SCHEDULE = dict(schedule="one_cycle", epochs=1, cycles=1, cycle_len=1, cycle_mult=1, lr_from_finder=False, seed=0,
                optimizer="adamw", momentum=0.9, weight_decay=1e-2, label_smoothing=0.0, early_stopping_patience=None)
IMAGE_STAGE = dict(SCHEDULE, lr=1e-3, lr_spread=3.0, lrs=None, lr_range=None, batch_size=32, augment=True,
                   precompute=False, augmentation="side_on", max_zoom=1.1, freeze_bn_stats=True, train_bn=False,
                   size=None)
ACTIVATIONS = dict(size=None, pooled=True, dtype="float32", decoder="pil", batch_size=32, chunk_rows=256,
                   weights="pretrained", weights_path=None)
BEFORE = {
    ScheduleConfig: SCHEDULE,
    HeadOnCacheConfig: dict(SCHEDULE, epochs=5, lr=3e-3, batch_size=64, ps=None, xtra_fc=[512], custom_head=None,
                            precompute=True, augment=False, reuse=True, from_sweep=False),
    ImageStageConfig: IMAGE_STAGE,
    FinetuneConfig: dict(IMAGE_STAGE, lr=3e-4),
    LrFindConfig: dict(num_it=100, batch_size=64, seed=0),
    LrFindImagesConfig: dict(num_it=50, batch_size=32, seed=0, lr_spread=3.0, augmentation="side_on"),
    EvaluationConfig: dict(tta=4, top_losses=8),
    ActivationsConfig: ACTIVATIONS,
    ShardedPrecomputeConfig: dict(ACTIVATIONS, shards=2),
    HeadSweepConfig: dict(search="grid", lr=[1e-3, 3e-3, 1e-2], ps=[None, 0.5], xtra_fc=[[512]], epochs=[3], wd=[1e-2],
                          label_smoothing=[0.0], n_random=20, batch_size=64, seed=0, reuse=True),
    DataQualityConfig: dict(k=10, duplicate_z=4.0, exact_cosine=0.985, outlier_z=4.0, folds=5, seed=0,
                            drift_percentile=95.0, top=12, leak_severity="WARN", max_label_issue_rate=0.05),
    HousekeepingConfig: dict(unused_days=30.0, dry_run=False),
}

CHOICES = {"schedule": settings.ScheduleName, "optimizer": settings.Optimizer,
           "augmentation": settings.AugmentationPreset, "dtype": settings.StorageDtype, "decoder": settings.Decoder,
           "weights": settings.Weights, "search": settings.Search, "leak_severity": settings.Severity}


def _fields(config_class) -> dict:
    return config_class.to_config_schema().as_field().config_type.fields


def _innermost(config_type):
    while getattr(config_type, "inner_type", None) is not None:  # Noneable (a default) wraps the type
        config_type = config_type.inner_type
    return config_type


@pytest.mark.parametrize("config_class", list(BEFORE), ids=lambda c: c.__name__)
def test_the_run_config_keeps_its_flat_keys_and_defaults(config_class):
    assert set(_fields(config_class)) == set(BEFORE[config_class])
    assert config_class().model_dump() == BEFORE[config_class]


@pytest.mark.parametrize("config_class", list(BEFORE), ids=lambda c: c.__name__)
def test_the_launchpad_shows_every_choice_as_an_enum(config_class):
    """Each fixed set of values is an Enum config type with exactly the allowed values."""
    for name, field in _fields(config_class).items():
        kind = _innermost(field.config_type)
        if name in CHOICES:
            assert kind.kind.value == "ENUM", f"{config_class.__name__}.{name} is not an enum"
            assert [v.config_value for v in kind.enum_values] == list(typing.get_args(CHOICES[name]))
        else:
            assert kind.kind.value != "ENUM"


def test_every_preset_of_the_transforms_is_a_choice():
    from precompute.transforms import AUGMENTATION_PRESETS

    assert set(AUGMENTATION_PRESETS) == set(settings.choices(settings.AugmentationPreset))


def test_a_bad_choice_fails_at_launch_and_a_bad_value_before_the_body():
    ran: list = []

    @dg.asset
    def head_augmented(config: ImageStageConfig):
        ran.append(config)

    def run(values: dict):
        return dg.materialize([head_augmented], run_config={"ops": {"head_augmented": {"config": values}}},
                              raise_on_error=False)

    with pytest.raises(dg.DagsterInvalidConfigError) as launch:  # Dagster's own check, before a run exists
        run({"augmentation": "sideways"})
    assert "sideways" in str(launch.value) and "top_down" in str(launch.value)
    result = run({"precompute": True, "max_zoom": 1.2})  # a rule between two values: the step fails first
    assert not result.success and ran == []
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    assert failure.user_failure_data is not None  # a dg.Failure: shown as the message, never retried
    assert "precompute=True with augment=True" in failure.error.message
    result = run({"batch_size": 1, "epochs": 0})
    assert ran == [] and "2 configuration errors" in next(
        e for e in result.all_events if e.is_step_failure).step_failure_data.error.message
    assert run({"lr_range": "1e-4:1e-2", "epochs": 2}).success and ran[0].epochs == 2


def test_the_frozen_groups_decide_which_rates_must_train():
    """head_augmented trains the head only; finetuned every group: rates for the body alone train nothing
    in the first and are fine in the second."""
    body_only = [1e-4, 1e-3, 0.0]
    with pytest.raises(ConfigError, match="nothing would train"):
        ImageStageConfig(lrs=body_only)
    assert FinetuneConfig(lrs=body_only).lrs == body_only
    with pytest.raises(ConfigError, match="both set: give one of them"):
        FinetuneConfig(lrs=[1e-4, 1e-3, 1e-2], lr_range="1e-4:1e-2")


@pytest.mark.parametrize("values, says", [
    (dict(weights="random", weights_path="/x.pt"), "contradict each other"),
    (dict(chunk_rows=0), "chunk_rows 0: use 1 or more"),
])
def test_cache_settings(values, says):
    with pytest.raises(ConfigError, match=says):
        ActivationsConfig(**values)


def test_other_stage_rules():
    with pytest.raises(ConfigError, match="head_on_cache trains on the cache"):
        HeadOnCacheConfig(precompute=False)
    with pytest.raises(ConfigError, match="ps has 1 dropout values for 2 linear blocks"):
        HeadOnCacheConfig(ps=[0.5])
    with pytest.raises(ConfigError, match=r"random takes lr as a range \[lo, hi\]"):
        HeadSweepConfig(search="random")
    with pytest.raises(ConfigError, match="sweep values out of range"):
        HeadSweepConfig(epochs=[0])
    with pytest.raises(ConfigError, match="folds 1: use 2 or more"):
        DataQualityConfig(folds=1)
    with pytest.raises(ConfigError, match="shards 0: use 1 or more"):
        ShardedPrecomputeConfig(shards=0)
    with pytest.raises(ConfigError, match="no such setting"):
        EvaluationConfig(tta_views=2)


def test_both_faces_say_the_same_for_the_same_mistake():
    """The library's runtime types check through the very models the Dagster configs are."""
    from precompute.heads import HeadConfig
    from precompute.train import FitOptions, Schedule
    from precompute.transforms import Augmentation

    pairs = [(lambda: Schedule("cosine"), lambda: HeadOnCacheConfig(schedule="cosine")),
             (lambda: Schedule("sgdr", cycles=0), lambda: ImageStageConfig(cycles=0)),
             (lambda: FitOptions("sgd", momentum=1.0), lambda: ScheduleConfig(optimizer="sgd", momentum=1.0)),
             (lambda: FitOptions(early_stopping_patience=0), lambda: ScheduleConfig(early_stopping_patience=0)),
             (lambda: Augmentation("sideways"), lambda: ImageStageConfig(augmentation="sideways")),
             (lambda: Augmentation(max_zoom=0.5), lambda: ImageStageConfig(max_zoom=0.5)),
             (lambda: HeadConfig(ps=[0.1], xtra_fc=[256]), lambda: HeadOnCacheConfig(ps=[0.1], xtra_fc=[256]))]
    for library, dagster in pairs:
        with pytest.raises(ConfigError) as one:
            library()
        with pytest.raises(ConfigError) as other:
            dagster()
        assert str(one.value) == str(other.value)


def test_the_learner_face_checks_through_the_models():
    from precompute.learner_settings import augmentation_args

    with pytest.raises(ConfigError, match="basic, side_on, top_down"):
        augmentation_args("sideways")
    with pytest.raises(ConfigError, match="max_zoom 0.5: use 1 or more"):
        augmentation_args({"preset": "basic", "max_zoom": 0.5})
    assert augmentation_args({"preset": "top_down", "max_zoom": 1.2}) == {"preset": "top_down", "max_zoom": 1.2}


def test_learner_pretrained_checks_the_pipelines_rules_before_any_work(tmp_path):
    from precompute.learner import Learner

    with pytest.raises(ConfigError) as err:
        Learner.pretrained("resnet18", tmp_path / "images", size=8, dtype="int8", store=tmp_path / "store")
    msg = str(err.value)
    assert msg.startswith("2 configuration errors") and "set size >= 32" in msg
    assert "dtype 'int8': choose one of float32, float16, bfloat16" in msg
    with pytest.raises(ConfigError, match="contradict each other"):
        Learner.pretrained("resnet18", tmp_path / "images", weights="random", weights_path=str(tmp_path / "w.pt"))
    assert not (tmp_path / "store").exists()  # nothing scanned, loaded or written


def test_every_configurable_recipe_asset_is_checked_at_load():
    """pipelines.definitions builds each op's config class from precompute.yaml's run configs at load:
    the map names every recipe asset that takes a config, with the class its step builds."""
    from assets import RECIPE_ASSETS
    from pipelines.definitions import RECIPE_CONFIGS

    configurable = {a.key.to_user_string(): a for a in RECIPE_ASSETS
                    if a.op.config_schema.as_field().config_type.kind.value == "STRICT_SHAPE"}
    assert set(RECIPE_CONFIGS) == set(configurable)
    for name, config_class in RECIPE_CONFIGS.items():  # the same fields: the class the asset declares
        assert set(configurable[name].op.config_schema.as_field().config_type.fields) == set(_fields(config_class))
