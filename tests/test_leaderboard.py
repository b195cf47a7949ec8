"""arch_leaderboard over two materialized partitions: real Dagster instance, MLflow, Zarr and photos."""

import json

import dagster as dg
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from assets import RECIPE_ASSETS, activations, arch_leaderboard, evaluation_report
from precompute import leaderboard
from tests.test_pipeline import SMALL

PARTITIONS = ["tf_efficientnet_lite0|0", "tf_efficientnet_lite0|1"]
# SMALL, with fewer lr_find steps and TTA off: the board needs the reports, not their quality
FAST = {"ops": {**SMALL["ops"], "lr_find_head": {"config": {"num_it": 8, "batch_size": 8}},
                "lr_find_unfrozen": {"config": {"num_it": 4, "batch_size": 8}},
                "evaluation_report": {"config": {"tta": 0, "top_losses": 2}}}}


def test_leaderboard_over_two_partitions(env):
    resources, instance, uri, tmp_path = env
    for partition in PARTITIONS:
        assert dg.materialize(RECIPE_ASSETS, partition_key=partition, resources=resources, instance=instance,
                              run_config=FAST).success
    result = dg.materialize(RECIPE_ASSETS + [arch_leaderboard], resources=resources,
                            instance=instance, selection=[arch_leaderboard])
    assert result.success
    rows = result.output_for_node("arch_leaderboard")
    assert sorted((r["arch"], r["cut"]) for r in rows) == [("tf_efficientnet_lite0", 0), ("tf_efficientnet_lite0", 1)]
    for r in rows:  # each row's accuracies are its partition's report's
        partition = f"{r['arch']}|{r['cut']}"
        report = instance.fetch_materializations(
            dg.AssetRecordsFilter(evaluation_report.key, asset_partitions=[partition]), limit=1
        ).records[0].asset_materialization.metadata
        assert set(r["accuracy"]) == {"head_on_cache", "head_augmented", "finetuned"}
        for stage, acc in r["accuracy"].items():
            assert acc == report[f"{stage}_accuracy"].value
        acts = instance.fetch_materializations(
            dg.AssetRecordsFilter(activations.key, asset_partitions=[partition]), limit=1
        ).records[0].asset_materialization.metadata  # its own partition's cache, not the other's
        assert r["images_per_s"] == acts["images_per_s"].value > 0
        assert r["cache_bytes"] == acts["bytes_on_disk"].value > 0 and r["head_epoch_s"] > 0
        assert r["report"].endswith(f"cut={r['cut']}/report.md")

    meta = instance.get_latest_materialization_event(arch_leaderboard.key).asset_materialization.metadata
    table = meta["table"].value
    assert table.count("| tf_efficientnet_lite0 |") == 2 and "precompute img/s" in table
    assert meta["plot"].value.startswith("![accuracy against cost](data:image/png;base64,")
    client = MlflowClient(uri)
    artifacts = {a.path: a.file_size for a in client.list_artifacts(meta["mlflow_run_id"].value, "leaderboard")}
    assert set(artifacts) == {"leaderboard/leaderboard.md", "leaderboard/leaderboard.csv", "leaderboard/leaderboard.png"}
    assert artifacts["leaderboard/leaderboard.png"] > 1000


def test_table_ranks_and_tolerates_missing_numbers(tmp_path):
    parts = [
        {"arch": "a", "cut": 0, "accuracy": {"head_on_cache": 0.8, "finetuned": 0.9}, "images_per_s": 10.0,
         "cache_bytes": 2**20, "head_epoch_s": 0.5},
        {"arch": "b", "cut": 1, "accuracy": {"head_on_cache": 0.7, "finetuned": 0.95}, "tta_accuracy": {"finetuned": 0.96},
         "images_per_s": None, "cache_bytes": None, "head_epoch_s": float("nan")},
        {"arch": "c", "cut": 0, "accuracy": {"head_on_cache": 0.85, "finetuned": 0.9}, "images_per_s": 20.0},
    ]
    df = leaderboard.table(parts)
    # best final accuracy first; a tie goes to the faster precompute
    assert list(zip(df["arch"], df["cut"])) == [("b", 1), ("c", 0), ("a", 0)]
    assert df.loc[2, "cache_mib"] == pytest.approx(1.0)
    assert pd.isna(df.loc[0, "head_epoch_s"])  # NaN in, unknown out
    md = leaderboard.markdown(df)
    assert md.splitlines()[2].startswith("| b | 1 | 0.7000 | 0.9500 | 0.9600 | - | - | - |")
    assert leaderboard.plot(df, tmp_path / "p.png").stat().st_size > 1000
    top = leaderboard.best(df)
    assert top["arch"] == "b" and json.loads(json.dumps(top))["cut"] == 1  # plain values: JSON metadata takes them
    assert "No partition" in leaderboard.markdown(leaderboard.table([]))
    with pytest.raises(ValueError, match="arch"):
        leaderboard.table([{"cut": 0}])
