"""Config-driven partitions, the daily/weekly schedules and the new-images sensor, on real files."""

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest

from assets import partitions
from assets.partitions import PartitionConfigError, arch_cut, partition_config, run_configs
from pipelines.definitions import defs
from pipelines.schedules import daily_recipe_refresh, runnable_partitions, weekly_cache_housekeeping
from pipelines.sensors import new_images_sensor, source_fingerprint
from precompute.weights import weights_available
from resources import ImageSource

PROJECT = Path(__file__).resolve().parents[1]
PHOTOS = PROJECT.parent / "shared" / "data" / "dogscats"
REPO = defs.get_repository_def()  # partitioned run requests are checked against the job in it


# --------------------------------------------------------------------------- partitions from config


@pytest.fixture
def no_config(monkeypatch, tmp_path):
    """No project config file and no env overrides, whatever the machine has."""
    monkeypatch.setattr(partitions, "CONFIG_FILE", tmp_path / "absent.yaml")
    return {}


def test_defaults_without_config(no_config):
    assert partition_config(no_config) == (["tf_efficientnet_lite0", "resnet34"], ["0", "1"])


def test_project_config_file_and_env_override(monkeypatch, tmp_path):
    project_file = tmp_path / "precompute.yaml"
    project_file.write_text("archs: [resnet18, tf_efficientnet_lite0]\ncuts: [0, 2]\nother_key: left alone\n")
    monkeypatch.setattr(partitions, "CONFIG_FILE", project_file)
    assert partition_config({}) == (["resnet18", "tf_efficientnet_lite0"], ["0", "2"])

    other = tmp_path / "other.yaml"
    other.write_text("archs:\n  - densenet121\n")  # cuts not given: the defaults
    assert partition_config({"PRECOMPUTE_CONFIG": str(other)}) == (["densenet121"], ["0", "1"])
    # env vars override the file, key by key
    assert partition_config({"PRECOMPUTE_CONFIG": str(other), "PRECOMPUTE_CUTS": "3, 0"}) == (["densenet121"], ["3", "0"])
    assert partition_config({"PRECOMPUTE_ARCHS": "vgg16_bn"}) == (["vgg16_bn"], ["0", "2"])


@pytest.mark.parametrize("text, env, expected", [
    ("archs: [resnet34, resnet99]\n", {}, ["'resnet99'", "valid archs:", "resnet18", "tf_efficientnet_lite0"]),
    ("cuts: [0, 7]\n", {}, ["cut '7'", "resnet34", "0..6"]),
    ("cuts: [-1]\n", {}, ["cut '-1'", "0..9", "0..6"]),
    ("cuts: [one]\n", {}, ["cut 'one'", "not an integer", "0..6"]),
    ("archs: []\n", {}, ["archs", "empty"]),
    ("- resnet34\n", {}, ["must be a mapping"]),
    ("", {"PRECOMPUTE_ARCHS": "resnet34,alexnet"}, ["'alexnet'", "$PRECOMPUTE_ARCHS", "valid archs:"]),
])
def test_bad_config_names_the_value_and_the_valid_ones(tmp_path, text, env, expected):
    cfg = tmp_path / "precompute.yaml"
    cfg.write_text(text)
    with pytest.raises(PartitionConfigError) as e:
        partition_config({"PRECOMPUTE_CONFIG": str(cfg), **env})
    for part in expected:
        assert part in str(e.value)


def test_missing_config_file_named_by_env_fails(tmp_path):
    with pytest.raises(PartitionConfigError, match="PRECOMPUTE_CONFIG=.*not a file"):
        partition_config({"PRECOMPUTE_CONFIG": str(tmp_path / "nope.yaml")})


def _load_definitions(config: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PRECOMPUTE_ARCHS", "PRECOMPUTE_CUTS", "PRECOMPUTE_ALLOW_DOWNLOAD")}
    env["PRECOMPUTE_CONFIG"] = str(config)
    code = ("import json; from pipelines.definitions import defs; from pipelines.schedules import daily_recipe_refresh;"
            "import dagster as dg;"
            "keys = defs.resolve_job_def('recipe').partitions_def.get_partition_keys();"
            "data = daily_recipe_refresh.evaluate_tick(dg.build_schedule_context(repository_def=defs.get_repository_def()));"
            "print(json.dumps({'keys': keys, 'scheduled': [r.partition_key for r in data.run_requests],"
            "'configs': {r.partition_key: r.run_config for r in data.run_requests}}))")
    return subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=240)


def test_adding_an_arch_to_the_config_adds_its_partitions(tmp_path):
    cfg = tmp_path / "precompute.yaml"
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"PK\x03\x04 a state dict")  # only its presence is checked before a run
    cfg.write_text("archs: [tf_efficientnet_lite0, resnet18]\ncuts: [0, 2]\n"
                   "run_config:\n  ops:\n    activations: {config: {size: 96}}\n    head_on_cache: {config: {epochs: 2}}\n"
                   f"partition_run_config:\n  resnet18:\n    ops: {{activations: {{config: {{weights_path: '{weights}'}}}}}}\n"
                   "  tf_efficientnet_lite0|2:\n    ops: {activations: {config: {size: 64}}}\n")
    proc = _load_definitions(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"tf_efficientnet_lite0|0", "tf_efficientnet_lite0|2", "resnet18|0", "resnet18|2"}
    assert set(out["keys"]) == expected and set(out["scheduled"]) == expected
    configs = out["configs"]  # the tick's run requests carry the configured run config, per partition
    assert configs["tf_efficientnet_lite0|0"] == {"ops": {"activations": {"config": {"size": 96}},
                                                          "head_on_cache": {"config": {"epochs": 2}}}}
    assert configs["tf_efficientnet_lite0|2"]["ops"]["activations"]["config"] == {"size": 64}
    assert configs["resnet18|0"]["ops"]["activations"]["config"] == {"size": 96, "weights_path": str(weights)}
    assert configs["resnet18|2"]["ops"]["head_on_cache"]["config"] == {"epochs": 2}


@pytest.mark.parametrize("text, expected", [
    ("run_config:\n  ops:\n    head_on_cache: {config: {epoch: 3}}\n", ["partition", "epoch", "recipe job"]),
    # the config classes' rules too (precompute.settings), every op's at once: no scheduled run would pass
    ("run_config:\n  ops:\n    head_augmented: {config: {precompute: true}}\n    finetuned: {config: {epochs: 0}}\n",
     ["partition", "head_augmented: precompute=True with augment=True", "finetuned: epochs 0: use 1 or more"]),
    ("run_config: [1, 2]\n", ["run_config", "must be a Dagster run config mapping"]),
    ("run_config:\n  activations: {config: {size: 64}}\n", ["unknown top-level key", "'activations'", "ops"]),
    ("partition_run_config:\n  resnet99: {ops: {}}\n", ["'resnet99'", "configured partition", "tf_efficientnet_lite0|0"]),
])
def test_bad_run_config_names_the_problem(tmp_path, text, expected):
    cfg = tmp_path / "precompute.yaml"
    cfg.write_text("archs: [tf_efficientnet_lite0]\ncuts: [0]\n" + text)
    if "ops:\n" in text:  # a key the op's config does not have, or a value it refuses: caught at load
        proc = _load_definitions(cfg)
        assert proc.returncode != 0
        message = proc.stderr
        assert "PartitionConfigError" in message
    else:
        with pytest.raises(PartitionConfigError) as e:
            run_configs({"PRECOMPUTE_CONFIG": str(cfg)})
        message = str(e.value)
    for part in expected:
        assert part in message, message[-2000:]


def test_no_config_file_means_empty_run_configs(no_config):
    configs = run_configs(no_config)
    assert list(configs) == [f"{a}|{c}" for a in ("tf_efficientnet_lite0", "resnet34") for c in ("0", "1")]
    assert all(v == {} for v in configs.values())


def test_bad_config_fails_at_definitions_load(tmp_path):
    cfg = tmp_path / "precompute.yaml"
    cfg.write_text("archs: [resnet34, resnet9000]\n")
    proc = _load_definitions(cfg)
    assert proc.returncode != 0
    assert "PartitionConfigError" in proc.stderr and "'resnet9000'" in proc.stderr and "resnet18" in proc.stderr


# --------------------------------------------------------------------------- schedules


def test_schedules_are_registered_and_stopped():
    repo = defs.get_repository_def()
    assert {s.name for s in repo.schedule_defs} == {"daily_recipe_refresh", "weekly_cache_housekeeping"}
    assert {s.name for s in repo.sensor_defs} == {"new_images_sensor"}
    assert daily_recipe_refresh.cron_schedule == "0 2 * * *" and daily_recipe_refresh.job_name == "recipe"
    assert weekly_cache_housekeeping.cron_schedule == "0 3 * * 0"
    assert weekly_cache_housekeeping.job_name == "cache_housekeeping"
    assert repo.get_job("recipe").partitions_def == arch_cut
    for d in (daily_recipe_refresh, weekly_cache_housekeeping, new_images_sensor):
        assert d.default_status.value == "STOPPED"


def test_daily_schedule_requests_one_run_per_partition():
    when = datetime(2024, 5, 1, 2, 0, tzinfo=timezone.utc)
    data = daily_recipe_refresh.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=when, repository_def=REPO))
    keys = runnable_partitions()[0]
    assert len(keys) >= 2
    assert sorted(r.partition_key for r in data.run_requests) == sorted(keys)
    assert {r.run_key for r in data.run_requests} == {f"2024-05-01:{k}" for k in keys}
    next_day = daily_recipe_refresh.evaluate_tick(
        dg.build_schedule_context(scheduled_execution_time=datetime(2024, 5, 2, 2, tzinfo=timezone.utc),
                                  repository_def=REPO))
    assert not {r.run_key for r in data.run_requests} & {r.run_key for r in next_day.run_requests}


# --------------------------------------------------------------------------- sensor


@pytest.fixture
def photos(tmp_path) -> Path:
    if not (PHOTOS / "train").is_dir():
        pytest.skip(f"real photos not found at {PHOTOS}")
    root = tmp_path / "images"
    for split, n in (("train", 2), ("valid", 1)):
        for cls in ("cats", "dogs"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((PHOTOS / split / cls).iterdir())[:n]:
                shutil.copy2(f, root / split / cls / f.name)
    return root


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def tick(instance, source, cursor, root=None):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=REPO,
                                  resources={"images": ImageSource(source=str(source), root=root)})
    return new_images_sensor.evaluate_tick(ctx)


def spare_photo(n: int = 5) -> Path:
    return sorted((PHOTOS / "train" / "dogs").iterdir())[n]


def test_sensor_launches_only_when_the_folder_changes(instance, photos):
    keys = sorted(runnable_partitions()[0])
    first = tick(instance, photos, None)
    assert sorted(r.partition_key for r in first.run_requests) == keys
    assert all(r.job_name in (None, "recipe") for r in first.run_requests)
    assert len({r.run_key for r in first.run_requests}) == len(keys)
    cursor = first.cursor
    assert cursor

    same = tick(instance, photos, cursor)
    assert same.run_requests == [] and "unchanged" in same.skip_message
    (photos / "train" / "cats" / "notes.txt").write_text("not an image")
    (photos / "train" / ".hidden.jpg").write_bytes(b"x")
    assert tick(instance, photos, cursor).run_requests == []  # non-images and hidden files do not count

    shutil.copy(spare_photo(), photos / "train" / "dogs" / "new.jpg")  # a new image
    added = tick(instance, photos, cursor)
    assert sorted(r.partition_key for r in added.run_requests) == keys and added.cursor != cursor
    assert not {r.run_key for r in added.run_requests} & {r.run_key for r in first.run_requests}
    cursor = added.cursor
    assert tick(instance, photos, cursor).run_requests == []

    victim = sorted((photos / "valid" / "cats").iterdir())[0]  # replaced content, same name
    victim.write_bytes(spare_photo(6).read_bytes())
    changed = tick(instance, photos, cursor)
    assert len(changed.run_requests) == len(keys)
    cursor = changed.cursor

    st = victim.stat()  # touched: the fingerprint moves, the content does not, so nothing runs
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = tick(instance, photos, cursor)
    assert touched.run_requests == [] and "content" in touched.skip_message
    assert touched.cursor != cursor  # the new fingerprint is remembered: the next tick skips at once
    assert "unchanged" in tick(instance, photos, touched.cursor).skip_message

    victim.write_bytes(spare_photo(7).read_bytes())  # rewritten in place with other bytes
    rewritten = tick(instance, photos, touched.cursor)
    assert len(rewritten.run_requests) == len(keys)
    assert not {r.run_key for r in rewritten.run_requests} & {r.run_key for r in changed.run_requests}

    victim.unlink()  # a removed image changes the training set too
    assert len(tick(instance, photos, rewritten.cursor).run_requests) == len(keys)


def test_sensor_on_a_csv_source(instance, photos, tmp_path):
    listed = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))[:3]
    csv = photos / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{p.split('/')[1]}\n" for p in listed))
    first = tick(instance, csv, None)
    assert len(first.run_requests) == len(runnable_partitions()[0])
    assert source_fingerprint(csv)[1] == 3

    shutil.copy(spare_photo(), photos / "train" / "dogs" / "unlisted.jpg")  # not in the CSV: no run
    assert tick(instance, csv, first.cursor).run_requests == []

    os.utime(photos / listed[0], ns=(0, 10**18))  # a listed image touched: same bytes, no run
    assert tick(instance, csv, first.cursor).run_requests == []
    (photos / listed[0]).write_bytes(spare_photo(8).read_bytes())  # a listed image changed
    second = tick(instance, csv, first.cursor)
    assert second.run_requests

    with csv.open("a") as f:  # a row added to the CSV
        f.write("train/dogs/unlisted.jpg,dogs\n")
    assert tick(instance, csv, second.cursor).run_requests


def test_sensor_skips_a_missing_source(instance, tmp_path):
    data = tick(instance, tmp_path / "gone", None)
    assert data.run_requests == [] and "does not exist" in data.skip_message and data.cursor is None


# --------------------------------------------------------------------------- what a tick launches


@pytest.fixture
def default_partitions(monkeypatch):
    """The default partitions (lite0 and resnet34, cuts 0 and 1), downloads off, no run config."""
    monkeypatch.delenv("PRECOMPUTE_ALLOW_DOWNLOAD", raising=False)
    keys = ["tf_efficientnet_lite0|0", "tf_efficientnet_lite0|1", "resnet34|0", "resnet34|1"]
    monkeypatch.setattr(arch_cut, "get_partition_keys", lambda *a, **k: keys)
    monkeypatch.setattr(partitions, "RUN_CONFIGS", {k: {} for k in keys})
    return keys


def test_switched_on_schedule_never_launches_a_partition_that_must_fail(default_partitions, monkeypatch, tmp_path):
    if weights_available("resnet34"):
        pytest.skip("resnet34 weights are on this machine: nothing to skip")
    assert weights_available("tf_efficientnet_lite0")
    when = datetime(2024, 5, 1, 2, 0, tzinfo=timezone.utc)
    ctx = dg.build_schedule_context(scheduled_execution_time=when, repository_def=REPO)
    requested = [r.partition_key for r in daily_recipe_refresh.evaluate_tick(ctx).run_requests]
    assert requested == ["tf_efficientnet_lite0|0", "tf_efficientnet_lite0|1"]
    runnable, skipped = runnable_partitions()
    assert set(skipped) == {"resnet34|0", "resnet34|1"} and "torch hub cache" in skipped["resnet34|0"]

    # weights at a configured path, or downloads switched on, make the partition runnable again
    weights = tmp_path / "resnet34.pth"
    weights.write_bytes(b"PK\x03\x04")
    monkeypatch.setitem(partitions.RUN_CONFIGS, "resnet34|1",
                        {"ops": {"activations": {"config": {"weights_path": str(weights)}}}})
    data = daily_recipe_refresh.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=when, repository_def=REPO))
    by_key = {r.partition_key: r.run_config for r in data.run_requests}
    assert set(by_key) == {"tf_efficientnet_lite0|0", "tf_efficientnet_lite0|1", "resnet34|1"}
    assert by_key["resnet34|1"]["ops"]["activations"]["config"]["weights_path"] == str(weights)
    monkeypatch.setenv("PRECOMPUTE_ALLOW_DOWNLOAD", "1")
    assert runnable_partitions()[0] == default_partitions


def test_sensor_tick_carries_the_run_config_and_skips_unavailable_weights(default_partitions, monkeypatch,
                                                                           instance, photos):
    cfg = {"ops": {"activations": {"config": {"size": 96}}, "finetuned": {"config": {"epochs": 1}}}}
    for key in default_partitions:
        monkeypatch.setitem(partitions.RUN_CONFIGS, key, cfg)
    ctx = dg.build_sensor_context(instance=instance, cursor=None, repository_def=REPO,
                                  resources={"images": ImageSource(source=str(photos))})
    data = new_images_sensor.evaluate_tick(ctx)
    assert data.run_requests and all(r.run_config == cfg for r in data.run_requests)
    keys = {r.partition_key for r in data.run_requests}
    assert {"tf_efficientnet_lite0|0", "tf_efficientnet_lite0|1"} <= keys
    if not weights_available("resnet34"):
        assert not any(k.startswith("resnet34") for k in keys)
