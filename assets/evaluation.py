import base64
from pathlib import Path

import dagster as dg

from assets.partitions import arch_and_cut, arch_cut
from precompute import evaluate, recipe
from resources import ActivationStoreResource, ComputeDevice, MlflowTracking, project_home


def _inline(md: str, folder: Path) -> str:
    """Plots as data URIs so the Markdown shows them in the Dagster UI, not just on disk."""
    for png in folder.glob("*.png"):
        data = base64.b64encode(png.read_bytes()).decode()
        md = md.replace(f"]({png.name})", f"](data:image/png;base64,{data})")
    return md


@dg.asset(group_name="recipe", partitions_def=arch_cut, tags={"precompute/cacheable": "false"})
def evaluation_report(context: dg.AssetExecutionContext, image_manifest, activations, head_on_cache,
                      head_augmented, finetuned, store: ActivationStoreResource, tracking: MlflowTracking,
                      compute: ComputeDevice):
    """Validation accuracy and loss of every stage, a confusion matrix and learning curves."""
    arch, xtra_cut = arch_and_cut(context)
    device = compute.setup()
    entry = recipe.open_entry(store.get(), activations)
    classes = finetuned["classes"]
    results = {"head_on_cache": recipe.evaluate_on_cache(head_on_cache, entry, image_manifest),
               "head_augmented": recipe.evaluate_on_images(head_augmented, image_manifest, compute.num_workers, device),
               "finetuned": recipe.evaluate_on_images(finetuned, image_manifest, compute.num_workers, device)}
    stages = {name: evaluate.stage_metrics(p, t, len(classes)) for name, (p, t) in results.items()}
    folder = project_home() / "reports" / arch / f"cut={xtra_cut}"
    folder.mkdir(parents=True, exist_ok=True)
    probs, targets = results["finetuned"]
    evaluate.plot_confusion(targets, probs.argmax(1), classes, folder / "confusion_matrix.png")
    evaluate.plot_learning_curves({r["stage"]: r["history"] for r in (head_on_cache, head_augmented, finetuned)},
                                  folder / "learning_curves.png")
    details = {"arch": arch, "xtra_cut": xtra_cut, "entry_key": entry.key.digest(),
               "view_key": activations["view_key"], "dagster_run": context.run.run_id,
               **{f"mlflow_run.{r['stage']}": r["mlflow_run_id"] for r in (head_on_cache, head_augmented, finetuned)}}
    md = evaluate.render_report(f"Evaluation: {arch}, cut {xtra_cut}", stages, classes, details,
                                {"Confusion matrix (finetuned)": "confusion_matrix.png",
                                 "Learning curves": "learning_curves.png"})
    (folder / "report.md").write_text(md)
    with tracking.tracker().run(f"evaluation {arch} cut={xtra_cut}", {"arch": arch, "cut": xtra_cut},
                                {"dagster.run_id": context.run.run_id, "stage": "evaluation"}) as run:
        for name, m in stages.items():
            run.metrics({f"{name}.valid_accuracy": m["accuracy"], f"{name}.valid_loss": m["loss"]})
        for path in folder.iterdir():
            run.artifact(path, "report")
    context.log.info(f"report: {folder / 'report.md'}; MLflow run {run.run_id}")
    return dg.Output({"stages": stages, "report": str(folder / "report.md"), "mlflow_run_id": run.run_id},
                     metadata={"report": dg.MetadataValue.md(_inline(md, folder)),
                               "report_path": dg.MetadataValue.path(str(folder / "report.md")),
                               "mlflow_run_id": run.run_id,
                               **{f"{n}_accuracy": m["accuracy"] for n, m in stages.items()}})
