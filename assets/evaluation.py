import dagster as dg

from assets._config import SettingsConfig
from assets._util import LazyModule, inline_pngs
from assets.metadata import EvaluationMetadata
from assets.partitions import arch_and_cut, arch_cut
from precompute.settings import EvaluationSettings
from resources import ActivationStoreResource, ComputeDevice, MlflowTracking, project_home

report = LazyModule("precompute.stages.report")  # torch loads when a step runs, not with the definitions
precompute_tracking = LazyModule("precompute.tracking")  # mlflow, likewise; `tracking` is the resource


class EvaluationConfig(SettingsConfig, EvaluationSettings):
    """evaluation_report's settings: tta views (0: off) and the worst mistakes shown (top_losses)."""


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags={"precompute/cacheable": "false"})
def evaluation_report(context: dg.AssetExecutionContext, config: EvaluationConfig, image_manifest, activations,
                      head_on_cache, head_augmented, finetuned, store: ActivationStoreResource,
                      tracking: MlflowTracking, compute: ComputeDevice):
    """Every stage on the validation split, with and without TTA; per-class metrics, the most
    confused pairs, a confusion matrix, the worst mistakes and the learning curves."""
    arch, xtra_cut = arch_and_cut(context)
    folder = project_home() / "reports" / arch / f"cut={xtra_cut}"
    records = {"head_on_cache": head_on_cache, "head_augmented": head_augmented, "finetuned": finetuned}
    stages, md = report.evaluation_report(
        records, activations, store.get(), image_manifest, folder, f"Evaluation: {arch}, cut {xtra_cut}",
        {"arch": arch, "xtra_cut": xtra_cut, "dagster_run": context.run.run_id}, config.tta, config.top_losses,
        compute.num_workers, compute.setup())
    with tracking.open_run(context, "evaluation", {"tta": config.tta}, arch, xtra_cut, image_manifest,
                           activations.view_key) as run:
        run.metrics(precompute_tracking.stage_metrics(stages))
        for path in folder.iterdir():
            run.artifact(path, "report")
    context.log.info(f"report: {folder / 'report.md'}; MLflow run {run.run_id}")
    metadata = EvaluationMetadata.of(stages, inline_pngs(md, folder), str(folder / "report.md"), run.run_id)
    return dg.Output({"stages": stages, "report": str(folder / "report.md"), "mlflow_run_id": run.run_id},
                     metadata=metadata.to_metadata())
