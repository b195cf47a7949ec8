"""Quiet by default: `make demo` shows INFO lines, progress and results; no DEBUG flood, no beta or
NumPy warnings, no telemetry banner; and it works from a folder whose path has a space."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT, project_copy

# The user's run config in precompute.yaml, which make demo merges over its own: small enough for a test.
SMALL_DEMO = """run_config:
  ops:
    lr_find_head: {config: {num_it: 10, batch_size: 8}}
    head_on_cache: {config: {epochs: 2, batch_size: 8}}
    head_augmented: {config: {batch_size: 8}}
    lr_find_unfrozen: {config: {num_it: 4, batch_size: 8}}
    finetuned: {config: {epochs: 1, batch_size: 8}}
    evaluation_report: {config: {tta: 1, top_losses: 4}}
"""


def test_make_demo_is_quiet_from_a_path_with_a_space(tmp_path, tiny_tree):
    folder = project_copy(tmp_path)
    (folder / "precompute.yaml").write_text(SMALL_DEMO)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PRECOMPUTE_", "DAGSTER_", "MLFLOW_", "MAKE", "MFLAGS"))}
    env["PRECOMPUTE_DATA"] = str(tiny_tree)  # 24 photos: the demo's recipe in about a minute
    done = subprocess.run(["make", "-C", str(folder), "demo"], env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    lines = out.splitlines()
    assert not [line for line in lines if " - DEBUG - " in line]
    assert "Warning" not in out  # BetaWarning, NumPy's UserWarning, MLflow's pickle/requirements warnings
    assert "Telemetry" not in out and "Welcome to Dagster" not in out
    # what it does show: Dagster's INFO lines (progress, epochs) and the results
    assert any(" - INFO - " in line and "epoch" in line for line in lines)
    assert any(" - INFO - " in line and "precompute" in line and "images" in line for line in lines)
    assert "valid accuracy" in out and "report:" in out
    assert "models:/precompute-tf_efficientnet_lite0-cut0/1" in out  # the registered model, and how to serve it
    # everything under the quoted path, nothing beside it
    home = folder / "var"
    assert (home / "dagster_home" / "dagster.yaml").read_text().count("enabled: false") == 1
    assert (home / "mlflow.db").exists() and any((home / "reports").rglob("report.md"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["my project", "images"])
    assert not (folder / "my").exists() and not (folder / "project").exists()


def test_dg_check_defs_loads_the_project(tmp_path):
    """`dg check defs` (Dagster's dg CLI, package dagster-dg-cli) finds the project through
    pyproject's [tool.dg] section and loads pipelines.definitions, as `dagster definitions validate` does."""
    pytest.importorskip("dagster_dg_cli", reason="dagster-dg-cli is not installed (pip install -e .[test])")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", "import sys; from dagster_dg_cli.cli import main; sys.argv[0] = 'dg'; "
                           "main()", "check", "defs"], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All definitions loaded successfully" in done.stdout + done.stderr
