"""examples/lesson1.ipynb runs top to bottom (small settings) in the project's Python, so it cannot rot."""

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import copy_tree

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]' (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "lesson1.ipynb"


def outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == kind]


def test_lesson1_notebook_runs_and_learns(dogscats, tmp_path, monkeypatch):
    photos = copy_tree(dogscats, tmp_path / "dogscats", {"train": 16, "valid": 16})
    for name, value in {"LESSON1_FAST": "1", "LESSON1_DATA": str(photos), "PRECOMPUTE_STORE": str(tmp_path / "store"),
                        "LESSON1_OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": str(torch.get_num_threads())}.items():
        monkeypatch.setenv(name, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # kernel "python3" is ipykernel in the Python running this test; a failing cell raises CellExecutionError
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    text = "".join(o.get("text", "") for o in outputs(nb, "stream") if o.get("name") == "stdout")
    assert "precompute: 64 images, 64 computed, 0 read from the cache" in text
    assert re.search(r"ConfigError: aug_tfms .* with precompute=True", text)
    assert "head_on_cache:" in text and "head_augmented:" in text and "finetuned:" in text
    accuracy = float(re.search(r"TTA accuracy: ([0-9.]+)", text).group(1))
    assert accuracy > 0.6  # 32 validation photos, chance is 0.5
    shown = outputs(nb, "display_data") + outputs(nb, "execute_result")
    # lr_find, the recorder's losses, show_batch, confusion matrix, top losses
    assert sum("image/png" in o.get("data", {}) for o in shown) == 5
    assert re.search(r"valid accuracy [0-9.]+ on 32 images; Sequential of 2", text)
    assert any("inputs: images" in o.get("data", {}).get("text/plain", "") for o in shown)
    model = torch.load(tmp_path / "out" / "lesson1.pt", weights_only=True)
    assert model["stage"] == "finetuned" and model["classes"] == ["cats", "dogs"]
