import dagster as dg

from assets._util import inline_pngs
from assets.partitions import arch_and_cut, arch_cut
from precompute import recipe
from precompute.tracking import stage_metrics
from resources import ActivationStoreResource, ComputeDevice, MlflowTracking, project_home


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
    activations = recipe.ActivationsRef.coerce(activations)
    image_manifest = recipe.without_failed(image_manifest, activations.failed_images)  # no rows for them
    device = compute.setup()
    entry = recipe.open_entry(store.get(), activations)
    records = {"head_on_cache": head_on_cache, "head_augmented": head_augmented, "finetuned": finetuned}
    stages, final = recipe.evaluate_stages(records, entry, image_manifest, compute.num_workers, device, config.tta,
                                           finetuned.get("augmentation"))
    folder = project_home() / "reports" / arch / f"cut={xtra_cut}"
    folder.mkdir(parents=True, exist_ok=True)
    details = {"arch": arch, "xtra_cut": xtra_cut, "entry_key": entry.key.digest(),
               "view_key": activations.view_key, "dagster_run": context.run.run_id, "tta_views": config.tta,
               **{f"mlflow_run.{r['stage']}": r["mlflow_run_id"] for r in records.values()}}
    md = recipe.write_report(folder, f"Evaluation: {arch}, cut {xtra_cut}", records, stages, final, image_manifest,
                             details, config.top_losses)
    tracker = tracking.tracker()
    with tracker.run(f"evaluation {arch} cut={xtra_cut}", {"arch": arch, "cut": xtra_cut, "tta": config.tta},
                     tracker.stage_tags(context.run.run_id, context.partition_key, "evaluation")) as run:
        run.metrics(stage_metrics(stages))
        for path in folder.iterdir():
            run.artifact(path, "report")
    context.log.info(f"report: {folder / 'report.md'}; MLflow run {run.run_id}")
    return dg.Output({"stages": stages, "report": str(folder / "report.md"), "mlflow_run_id": run.run_id},
                     metadata={"report": dg.MetadataValue.md(inline_pngs(md, folder)),
                               "report_path": dg.MetadataValue.path(str(folder / "report.md")),
                               "mlflow_run_id": run.run_id,
                               **{f"{n}_accuracy": m["accuracy"] for n, m in stages.items()},
                               **{f"{n}_tta_accuracy": m["tta_accuracy"] for n, m in stages.items() if "tta_accuracy" in m}})
