"""The logged model serves images: an MLflow pyfunc with the stage's own transform and a signature,
registered per arch and cut, installable from PyPI, predicting what `precompute predict` predicts."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from precompute import Learner
from precompute.cli import main as cli
from precompute.recipe import checked_record
from precompute.tracking import Tracker

NAME = "precompute-tf_efficientnet_lite0-cut0"


@pytest.fixture
def logged(tmp_path, tiny_tree):
    """A head trained for one epoch on the tiny photo tree (64 px), exported, and logged the way the
    finetuned stage logs its model, in a fresh MLflow store."""
    learn = Learner.pretrained("tf_efficientnet_lite0", tiny_tree, size=64, store=str(tmp_path / "store"), bs=8,
                               verbose=False)
    learn.fit(3e-3, 1)
    model_file = learn.export(tmp_path / "model.pt")
    record = checked_record(torch.load(model_file, weights_only=True), str(model_file))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    import mlflow.pyfunc  # its own import-time notices are not the model's
    with Tracker(uri, artifact_root=str(tmp_path / "artifacts")).run("finetuned test") as run, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = run.pytorch_model(record, "network")
    # no pickle, requirements, type hint or input example warnings from logging the model
    # (ResourceWarnings are hidden by default; one may come from any earlier object the GC collects here)
    assert [str(w.message) for w in caught if not issubclass(w.category, ResourceWarning)] == []
    images = tmp_path / "new_photos"
    shutil.copytree(tiny_tree / "valid", images)
    (images / "broken.jpg").write_bytes(b"not a jpeg")  # unreadable: a row saying so, not a failed request
    return uri, run.run_id, info, model_file, images


def test_registered_pyfunc_predicts_as_precompute_predict(logged, tmp_path, monkeypatch, capsys):
    uri, run_id, info, model_file, images = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert version.run_id == run_id and info.registered_model_version == int(version.version)

    # the reference: precompute predict on the folder
    out_csv = tmp_path / "predictions.csv"
    assert cli(["predict", "--model", str(model_file), "--images", str(images), "--out", str(out_csv)]) == 0
    want = pd.read_csv(out_csv)
    ok = want[want["status"] == "ok"].reset_index(drop=True)
    assert len(ok) == 8 and (want["status"] != "ok").sum() == 1
    probs = [c for c in want.columns if c.startswith("prob_")]
    assert probs == ["prob_cats", "prob_dogs"]

    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version.version}")
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["path", "image"]
    assert model.metadata.get_output_schema().input_names() == ["status", "reason", "predicted"] + probs
    got = model.predict(pd.DataFrame({"path": list(want["path"])}))
    assert list(got["status"] == "ok") == list(want["status"] == "ok")  # the broken file too
    good = got[got["status"] == "ok"].reset_index(drop=True)
    assert list(good["predicted"]) == list(ok["predicted"])
    # the same transform, weights and batches: equal up to the CSV's float formatting
    np.testing.assert_allclose(good[probs].to_numpy(), ok[probs].to_numpy(), rtol=0, atol=1e-6)
    # bytes in, the same out
    blobs = [Path(p).read_bytes() for p in ok["path"]]
    from_bytes = model.predict(pd.DataFrame({"image": blobs}))
    assert list(from_bytes["predicted"]) == list(ok["predicted"])
    np.testing.assert_allclose(from_bytes[probs].to_numpy(), ok[probs].to_numpy(), rtol=0, atol=1e-6)

    # what pip would install: PyPI versions, no local version tags (torch==2.x+cu130 cannot install)
    reqs = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version.version}/requirements.txt",
                                                     dst_path=str(tmp_path / "reqs"))).read_text()
    assert "+" not in reqs
    assert any(line.startswith("torch==") for line in reqs.splitlines())
    assert "dagster" not in reqs

    # the CLI MLflow serves with: `mlflow models predict` on a CSV of paths
    pd.DataFrame({"path": list(ok["path"])}).to_csv(tmp_path / "input.csv", index=False)
    done = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "models", "predict", "-m",
                           f"models:/{NAME}/{version.version}", "-i", str(tmp_path / "input.csv"), "-t", "csv",
                           "-o", str(tmp_path / "out.json"), "--env-manager", "local"],
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = pd.DataFrame(json.loads((tmp_path / "out.json").read_text())["predictions"])
    assert list(served["predicted"]) == list(ok["predicted"])
    np.testing.assert_allclose(served[probs].to_numpy(), ok[probs].to_numpy(), rtol=0, atol=1e-6)


    # a run without a model file (this one logged the pyfunc only; a head_on_cache run has none):
    # precompute predict says so in one line
    capsys.readouterr()
    assert cli(["predict", "--model", run_id, "--images", str(images), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "finetuned" in err and "Traceback" not in err
