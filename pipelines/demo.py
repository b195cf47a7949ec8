"""`make demo`: materialize the whole recipe for the default partition, then say where things are."""

import os
import sys
import time

from pipelines.local import dagster_home, quiet_warnings, with_quiet_logging

dagster_home()  # $DAGSTER_HOME (default var/dagster_home), with telemetry off
quiet_warnings()

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


def _registered_model(tracking_uri: str, partition: str) -> str:
    """The fine-tuned model's latest version in the Model Registry, and how to serve it."""
    from mlflow.tracking import MlflowClient

    from precompute.serving import model_name

    arch, cut = partition.split("|")
    name = model_name(arch, int(cut))
    versions = MlflowClient(tracking_uri).search_model_versions(f"name = '{name}'")
    if not versions:
        return f"none registered as {name}"
    uri = f"models:/{name}/{max(int(v.version) for v in versions)}"
    return f"{uri}  (.venv/bin/precompute serve -m {uri})"


def main() -> int:
    partition = os.environ.get("PRECOMPUTE_PARTITION", DEFAULT_PARTITION)
    t0 = time.time()
    result = defs.resolve_job_def("recipe").execute_in_process(
        run_config=with_quiet_logging(merge_config(DEMO_RUN_CONFIG, run_config_for(partition))), partition_key=partition,
        instance=dg.DagsterInstance.get())
    if not result.success:
        print("demo failed; see the log above", file=sys.stderr)
        return 1
    report = result.output_for_node("evaluation_report")
    tracking = defs.resources["tracking"]
    print(f"\nrecipe for partition {partition} finished in {time.time() - t0:.0f}s")
    width = max(map(len, report["stages"]))
    for stage, m in report["stages"].items():
        print(f"  {stage:<{width}}  valid accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}")
    print(f"report:        {report['report']}")
    print(f"MLflow run:    {report['mlflow_run_id']} in {tracking.tracking_uri}")
    print(f"model:         {_registered_model(tracking.tracking_uri, partition)}")
    print(f"Dagster runs:  DAGSTER_HOME={os.environ['DAGSTER_HOME']} (make ui to browse)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
