import dagster as dg

from assets._util import inline_pngs
from assets.partitions import arch_and_cut, arch_cut
from precompute import evaluate, recipe
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
    image_manifest = recipe.without_failed(image_manifest, activations.get("failed_images"))  # no rows for them
    device = compute.setup()
    entry = recipe.open_entry(store.get(), activations)
    records = {"head_on_cache": head_on_cache, "head_augmented": head_augmented, "finetuned": finetuned}
    classes = finetuned["classes"]
    multilabel = bool(finetuned.get("multilabel"))
    stages, final = {}, None
    for name, record in records.items():
        probs, targets, tta_probs = recipe.evaluate_on_images(record, image_manifest, compute.num_workers, device,
                                                              config.tta, finetuned.get("augmentation"))
        if name == "head_on_cache":  # the same numbers from the cache: a check that the cache is not stale
            cache_probs, _ = recipe.evaluate_on_cache(record, entry, image_manifest)
            stages[name + " (on cache)"] = evaluate.stage_metrics(cache_probs, targets, len(classes),
                                                                  record.get("thresholds"))
        m = evaluate.stage_metrics(probs, targets, len(classes), record.get("thresholds"))
        if tta_probs is not None:
            t = evaluate.stage_metrics(tta_probs, targets, len(classes), record.get("thresholds"))
            m.update(tta_accuracy=t["accuracy"], tta_loss=t["loss"])
        stages[name] = m
        final = (probs, targets, tta_probs)
    folder = project_home() / "reports" / arch / f"cut={xtra_cut}"
    folder.mkdir(parents=True, exist_ok=True)
    probs, targets, _ = final
    thresholds = finetuned.get("thresholds")
    if multilabel:
        preds = evaluate.multilabel_predictions(probs, thresholds)
        evaluate.plot_label_confusion(targets, preds, classes, folder / "confusion_matrix.png")
        tags = evaluate.predicted_tags(probs, classes, thresholds)

        def caption(i: int) -> str:
            true = [c for c, on in zip(classes, targets[i] > 0.5) if on]
            return f"true {' '.join(true) or '-'} / pred {' '.join(tags[i]) or '-'}"
    else:
        preds = probs.argmax(1)
        evaluate.plot_confusion(targets, preds, classes, folder / "confusion_matrix.png")

        def caption(i: int) -> str:
            return f"true {classes[targets[i]]} / pred {classes[preds[i]]} ({probs[i, preds[i]]:.2f})"
    evaluate.plot_learning_curves({r["stage"]: r["history"] for r in records.values()}, folder / "learning_curves.png")
    valid = recipe.labelled_split(image_manifest, classes, "valid")
    worst = evaluate.top_losses(probs, targets, config.top_losses)
    evaluate.plot_image_grid([valid["path"].iloc[i] for i in worst], [caption(i) for i in worst],
                             folder / "top_losses.png")
    details = {"arch": arch, "xtra_cut": xtra_cut, "entry_key": entry.key.digest(),
               "view_key": activations["view_key"], "dagster_run": context.run.run_id, "tta_views": config.tta,
               **{f"mlflow_run.{r['stage']}": r["mlflow_run_id"] for r in records.values()}}
    md = evaluate.render_report(
        f"Evaluation: {arch}, cut {xtra_cut}", stages, classes, details,
        {"Confusion matrix (finetuned)": "confusion_matrix.png", "Top losses (finetuned)": "top_losses.png",
         "Learning curves": "learning_curves.png"},
        evaluate.per_class(probs, targets, classes, thresholds),
        () if multilabel else evaluate.most_confused(targets, preds, classes), multilabel)
    (folder / "report.md").write_text(md)
    tracker = tracking.tracker()
    with tracker.run(f"evaluation {arch} cut={xtra_cut}", {"arch": arch, "cut": xtra_cut, "tta": config.tta},
                     {"dagster.run_id": context.run.run_id, "stage": "evaluation",
                      "mlflow.parentRunId": tracker.parent_run(context.run.run_id, context.partition_key)}) as run:
        for name, m in stages.items():
            key = name.replace(" ", "_").replace("(", "").replace(")", "")
            run.metrics({f"{key}.{k}": v for k, v in m.items() if k != "n"})
        for path in folder.iterdir():
            run.artifact(path, "report")
    context.log.info(f"report: {folder / 'report.md'}; MLflow run {run.run_id}")
    return dg.Output({"stages": stages, "report": str(folder / "report.md"), "mlflow_run_id": run.run_id},
                     metadata={"report": dg.MetadataValue.md(inline_pngs(md, folder)),
                               "report_path": dg.MetadataValue.path(str(folder / "report.md")),
                               "mlflow_run_id": run.run_id,
                               **{f"{n}_accuracy": m["accuracy"] for n, m in stages.items()},
                               **{f"{n}_tta_accuracy": m["tta_accuracy"] for n, m in stages.items() if "tta_accuracy" in m}})
