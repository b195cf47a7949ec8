import dagster as dg

from assets._util import LazyModule, inline_pngs
from assets.partitions import arch_and_cut, arch_cut
from assets.training import _mlflow_run
from resources import ActivationStoreResource, ComputeDevice, MlflowTracking, project_home

report = LazyModule("precompute.stages.report")  # torch loads when a step runs, not with the definitions
precompute_tracking = LazyModule("precompute.tracking")  # mlflow, likewise; `tracking` is the resource


class EvaluationConfig(dg.Config):
    tta: int = 4          # augmented views averaged with the center crop; 0 turns TTA off
    top_losses: int = 8   # images in the gallery of the model's worst mistakes


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
    with _mlflow_run(context, tracking, "evaluation", {"tta": config.tta}, image_manifest) as run:
        run.metrics(precompute_tracking.stage_metrics(stages))
        for path in folder.iterdir():
            run.artifact(path, "report")
    context.log.info(f"report: {folder / 'report.md'}; MLflow run {run.run_id}")
    return dg.Output({"stages": stages, "report": str(folder / "report.md"), "mlflow_run_id": run.run_id},
                     metadata={"report": dg.MetadataValue.md(inline_pngs(md, folder)),
                               "report_path": dg.MetadataValue.path(str(folder / "report.md")),
                               "mlflow_run_id": run.run_id, **report.accuracy_metadata(stages)})
