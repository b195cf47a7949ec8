"""The whole asset graph on a real Dagster instance (SQLite), real MLflow (SQLite), real Zarr and photos."""

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from assets import RECIPE_ASSETS, activations, head_augmented, head_on_cache, image_manifest, lr_find_head

PARTITION = "tf_efficientnet_lite0|0"
SMALL = {"ops": {
    "activations": {"config": {"size": 64, "chunk_rows": 8}},
    "head_on_cache": {"config": {"epochs": 2, "batch_size": 8}},
    "head_augmented": {"config": {"epochs": 1, "batch_size": 8}},
    "finetuned": {"config": {"epochs": 1, "batch_size": 8}},
    "lr_find_head": {"config": {"num_it": 20, "batch_size": 8}},
    "lr_find_unfrozen": {"config": {"num_it": 6, "batch_size": 8}},
    "evaluation_report": {"config": {"tta": 2, "top_losses": 4}},
}}
CACHE_STAGE = [image_manifest, activations, lr_find_head, head_on_cache]


def test_whole_recipe_materializes(env, tiny_tree):
    resources, instance, uri, tmp_path = env
    result = dg.materialize(RECIPE_ASSETS, partition_key=PARTITION, resources=resources, instance=instance,
                            run_config=SMALL)
    assert result.success
    report = result.output_for_node("evaluation_report")
    assert set(report["stages"]) == {"head_on_cache (on cache)", "head_on_cache", "head_augmented", "finetuned"}
    assert all(m["n"] == 8 and 0 <= m["accuracy"] <= 1 for m in report["stages"].values())
    # the head evaluated on cached rows and on freshly decoded images agrees: the cache is not stale
    assert report["stages"]["head_on_cache (on cache)"]["loss"] == pytest.approx(report["stages"]["head_on_cache"]["loss"], rel=1e-3)
    assert all("tta_accuracy" in report["stages"][s] for s in ("head_on_cache", "head_augmented", "finetuned"))
    md = (tmp_path / "home/reports/tf_efficientnet_lite0/cut=0/report.md").read_text()
    assert "| finetuned |" in md and "confusion_matrix.png" in md and "## Per class" in md and "top_losses.png" in md
    assert (tmp_path / "home/reports/tf_efficientnet_lite0/cut=0/confusion_matrix.png").stat().st_size > 1000

    # one MLflow run per training asset plus the evaluation, grouped by the Dagster run id
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("precompute-pipeline")
    runs = client.search_runs([exp.experiment_id], f"tags.`dagster.run_id` = '{result.run_id}'")
    by_stage = {r.data.tags["stage"]: r for r in runs}
    assert set(by_stage) == {"lr_find_head", "head_on_cache", "head_augmented", "lr_find_unfrozen", "finetuned",
                             "evaluation"}
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1  # one parent run groups the stages of this pipeline run
    assert len(client.get_metric_history(by_stage["finetuned"].info.run_id, "lr_step")) == 2  # 16 images / 8
    assert float(client.get_run(by_stage["lr_find_head"].info.run_id).data.metrics["suggested_lr"]) > 0
    model_uri = f"runs:/{by_stage['finetuned'].info.run_id}/network"
    import mlflow.pyfunc
    import pandas as pd
    mlflow.set_tracking_uri(uri)
    paths = [str(p) for p in sorted((tmp_path / "images" / "valid").rglob("*.jpg"))[:2]]
    served = mlflow.pyfunc.load_model(model_uri, model_config={"image_roots": [str(tmp_path / "images")]}).predict(
        pd.DataFrame({"path": paths}))  # the model serves images, by path under a root the operator names
    assert list(served["status"]) == ["ok", "ok"] and served.filter(like="prob_").shape == (2, 2)
    head = by_stage["head_on_cache"].data
    assert head.params["arch"] == "tf_efficientnet_lite0" and head.params["seed"] == "0"
    assert head.params["group2.trainable"] == "True" and head.params["group0.trainable"] == "False"
    assert int(head.params["group2.n_params"]) > 0
    assert len(client.get_metric_history(by_stage["head_on_cache"].info.run_id, "valid_accuracy")) == 2
    fine = by_stage["finetuned"].data.params
    assert fine["size"] == "64" and fine["epochs"] == "1"  # the size the stage ran at, not the config's None
    assert fine["pct_start"] == "0.25" and head.params["pct_start"] == "0.25"  # one_cycle's warm-up, as it ran
    assert fine["optimizer"] == "adamw" and fine["weight_decay"] == "0.01" and head.params["label_smoothing"] == "0.0"
    assert fine["group0.trainable"] == "True"
    assert float(fine["group0.lr"]) < float(fine["group1.lr"]) < float(fine["group2.lr"])
    artifacts = {a.path for a in client.list_artifacts(by_stage["evaluation"].info.run_id, "report")}
    assert {"report/report.md", "report/confusion_matrix.png"} <= artifacts

    # the Dagster metadata names the MLflow run; augmented stages are marked non-cacheable
    mat = instance.get_latest_materialization_event(head_on_cache.key).asset_materialization
    assert mat.metadata["mlflow_run_id"].value == by_stage["head_on_cache"].info.run_id
    assert head_augmented.tags_by_key[head_augmented.key]["precompute/cacheable"] == "false"
    assert head_augmented.code_versions_by_key[head_augmented.key] is None

    # the activations' data version is the view key, and a rerun reuses every row
    acts = instance.get_latest_materialization_event(activations.key).asset_materialization
    assert acts.tags["dagster/data_version"] == acts.metadata["view_key"].value
    assert acts.metadata["computed"].value == 24
    # every stage's MLflow run names the same data, and it came with the stage's inputs (no instance
    # lookup): the manifest's own source and the activations' view key, carried on by the stage records
    from precompute.tracking import rerun_spec
    for stage, run in by_stage.items():
        spec = rerun_spec(uri, run.info.run_id)
        assert (spec.dataset_digest, spec.dataset_source) == (acts.metadata["view_key"].value, str(tiny_tree)), stage
    again = dg.materialize([image_manifest, activations], partition_key=PARTITION, resources=resources,
                           instance=instance, run_config={"ops": {"activations": SMALL["ops"]["activations"]}},
                           selection=[activations])
    meta = instance.get_latest_materialization_event(activations.key).asset_materialization.metadata
    assert again.success and meta["computed"].value == 0 and meta["reused"].value == 24
    # pooled vectors are stored raw by default (codec "auto"): on disk the rows plus Zarr's metadata
    assert meta["codec"].text == "none" and 0.9 < meta["compression_ratio"].value <= 1.0
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"rows_match_manifest": True, "finite_values": True, "every_image_accounted_for": True,
                      "blocks_verified": True}

    # the cacheable head: same rows, config and seed -> the earlier result, said plainly; a new seed trains
    def head_run(seed):
        run_config = {"ops": {"head_on_cache": {"config": {**SMALL["ops"]["head_on_cache"]["config"], "seed": seed}}}}
        assert dg.materialize(CACHE_STAGE, partition_key=PARTITION,
                              resources=resources, instance=instance, run_config=run_config,
                              selection=[head_on_cache]).success
        return instance.get_latest_materialization_event(head_on_cache.key).asset_materialization.metadata
    reused = head_run(0)
    assert reused["reused"].value is True
    assert reused["mlflow_run_id"].value == by_stage["head_on_cache"].info.run_id
    retrained = head_run(1)
    assert retrained["reused"].value is False and retrained["mlflow_run_id"].value != reused["mlflow_run_id"].value
    head_runs = client.search_runs([exp.experiment_id], "tags.stage = 'head_on_cache'")  # noqa
    assert len(head_runs) == 2  # the reused materialization started no MLflow run


def test_precompute_with_augmentation_fails_before_any_work(env):
    resources, instance, uri, _ = env
    assert dg.materialize(CACHE_STAGE, partition_key=PARTITION, resources=resources, instance=instance,
                          run_config={"ops": {k: SMALL["ops"][k] for k in ("activations", "lr_find_head", "head_on_cache")}}).success
    config = {"ops": {"head_augmented": {"config": {"precompute": True, "augment": True}}}}
    result = dg.materialize(CACHE_STAGE + [head_augmented], partition_key=PARTITION,
                            resources=resources, instance=instance, run_config=config,
                            selection=[head_augmented], raise_on_error=False)
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert "augment=False" in failure.step_failure_data.error.message
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("precompute-pipeline").experiment_id])
    assert "head_augmented" not in {r.data.tags.get("stage") for r in runs}  # no run started: no work done
