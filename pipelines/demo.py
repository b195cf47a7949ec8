"""`make demo`: materialize the whole recipe for the default partition, then say where things are."""

import os
import sys
import time

from resources import project_home

home = project_home()
os.environ.setdefault("DAGSTER_HOME", str(home / "dagster_home"))
os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)

import dagster as dg  # noqa: E402

from assets.partitions import DEFAULT_PARTITION, merge_config, run_config_for  # noqa: E402
from pipelines.definitions import defs  # noqa: E402

# Digits are 8x8 upscaled: 64 px loses nothing and keeps the demo at a few minutes on two cores.
# A flipped digit is another glyph, so no flips. The run config in precompute.yaml (run_config,
# partition_run_config) is merged over these: what the user configured wins, key by key.
DEMO_RUN_CONFIG = {"ops": {
    "activations": {"config": {"size": int(os.environ.get("PRECOMPUTE_DEMO_SIZE", "64"))}},
    "head_on_cache": {"config": {"epochs": 5}},
    "head_augmented": {"config": {"epochs": 1, "augmentation": "basic"}},
    "finetuned": {"config": {"epochs": 2, "augmentation": "basic"}},
    "lr_find_unfrozen": {"config": {"num_it": 30, "augmentation": "basic"}},
}}


def main() -> int:
    partition = os.environ.get("PRECOMPUTE_PARTITION", DEFAULT_PARTITION)
    t0 = time.time()
    result = defs.resolve_job_def("recipe").execute_in_process(
        run_config=merge_config(DEMO_RUN_CONFIG, run_config_for(partition)), partition_key=partition,
        instance=dg.DagsterInstance.get())
    if not result.success:
        print("demo failed; see the log above", file=sys.stderr)
        return 1
    report = result.output_for_node("evaluation_report")
    tracking = defs.resources["tracking"]
    print(f"\nrecipe for partition {partition} finished in {time.time() - t0:.0f}s")
    for stage, m in report["stages"].items():
        print(f"  {stage:<15} valid accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}")
    print(f"report:        {report['report']}")
    print(f"MLflow run:    {report['mlflow_run_id']} in {tracking.tracking_uri}")
    print(f"Dagster runs:  DAGSTER_HOME={os.environ['DAGSTER_HOME']} (make ui to browse)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
