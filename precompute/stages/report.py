"""The ``evaluation_report`` stage: every stage scored on the validation split (with TTA), and a
report of plots and Markdown."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from precompute import evaluate
from precompute.inference import evaluate_on_cache, evaluate_on_images
from precompute.metrics import Evaluation
from precompute.records import ActivationsRef, StageRecord, require_typed
from precompute.rows import labelled_split, without_failed
from precompute.stages.cache_fill import open_entry
from precompute.store import ActivationStore, Entry


def evaluate_stages(records: dict[str, StageRecord], entry: Entry | None, manifest: pd.DataFrame,
                    num_workers: int = 0, device="cpu", tta: int = 0,
                    augmentation: dict | None = None) -> tuple[dict[str, Evaluation], tuple]:
    """Every stage on the validation split, with TTA when ``tta`` > 0; the stage named head_on_cache is
    also scored on the cache (``entry``): the same numbers, a check that the cache is not stale.
    Returns (metrics per stage, (probs, targets, tta_probs) of the last stage)."""
    stages, final = {}, None
    for name, record in records.items():
        task = record.task
        probs, y, tta_probs = evaluate_on_images(record, manifest, num_workers, device, tta, augmentation)
        if name == "head_on_cache" and entry is not None:
            cache_probs, _ = evaluate_on_cache(record, entry, manifest)
            stages[name + " (on cache)"] = task.metrics(cache_probs, y)
        m = task.metrics(probs, y)
        stages[name] = m if tta_probs is None else m.with_tta(task.metrics(tta_probs, y))
        final = (probs, y, tta_probs)
    return stages, final


def write_report(folder, title: str, records: dict[str, StageRecord], stages: dict[str, dict], final: tuple,
                 manifest: pd.DataFrame, details: dict, top_losses: int = 8) -> str:
    """The report of an evaluation in ``folder``: the last stage's confusion matrix and worst mistakes,
    every stage's learning curves, and report.md (returned) with the metrics of ``stages``."""
    folder = Path(folder)
    task = list(records.values())[-1].task
    classes, thresholds, multilabel = list(task.classes), getattr(task, "thresholds", None), task.multilabel
    probs, y, _ = final
    preds = task.predictions(probs)
    if multilabel:
        evaluate.plot_label_confusion(y, preds, classes, folder / "confusion_matrix.png")
        tags = task.tags(probs)

        def caption(i: int) -> str:
            true = [c for c, on in zip(classes, y[i] > 0.5) if on]
            return f"true {' '.join(true) or '-'} / pred {' '.join(tags[i]) or '-'}"
    else:
        evaluate.plot_confusion(y, preds, classes, folder / "confusion_matrix.png")

        def caption(i: int) -> str:
            return f"true {classes[y[i]]} / pred {classes[preds[i]]} ({probs[i, preds[i]]:.2f})"
    evaluate.plot_learning_curves({r.stage: r.history for r in records.values()}, folder / "learning_curves.png")
    valid = labelled_split(manifest, task, "valid")
    worst = evaluate.top_losses(probs, y, top_losses)
    evaluate.plot_image_grid([valid["path"].iloc[i] for i in worst], [caption(i) for i in worst],
                             folder / "top_losses.png")
    md = evaluate.render_report(
        title, stages, classes, details,
        {"Confusion matrix (finetuned)": "confusion_matrix.png", "Top losses (finetuned)": "top_losses.png",
         "Learning curves": "learning_curves.png"},
        evaluate.per_class(probs, y, classes, thresholds),
        () if multilabel else evaluate.most_confused(y, preds, classes), multilabel)
    (folder / "report.md").write_text(md)
    return md


def evaluation_report(records: dict[str, StageRecord], ref: ActivationsRef, store: ActivationStore,
                      manifest: pd.DataFrame, folder, title: str, details: dict, tta: int = 4, top_losses: int = 8,
                      num_workers: int = 0, device="cpu") -> tuple[dict[str, dict], str]:
    """The ``evaluation_report`` stage: every stage scored (``evaluate_stages``, TTA with the last
    stage's augmentation) and the report written to ``folder`` (``write_report``). Returns
    (metrics per stage, the report's Markdown)."""
    entry = open_entry(store, ref)
    records = {name: require_typed(r, StageRecord, f"the {name} record") for name, r in records.items()}
    manifest = without_failed(manifest, ref.failed_images)  # no rows for them
    last = list(records.values())[-1]
    scores, final = evaluate_stages(records, entry, manifest, num_workers, device, tta, last.augmentation or None)
    stages = {name: m.to_dict() for name, m in scores.items()}  # plain numbers: metadata, MLflow, the report
    Path(folder).mkdir(parents=True, exist_ok=True)
    details = {**details, "entry_key": entry.key.digest(), "view_key": ref.view_key, "tta_views": tta,
               **{f"mlflow_run.{r.stage}": r.mlflow_run_id for r in records.values()}}
    return stages, write_report(folder, title, records, stages, final, manifest, details, top_losses)


def accuracy_metadata(stages: dict[str, dict]) -> dict[str, float]:
    """Each evaluated stage's accuracy (and with TTA) under a flat name: ``<stage>_accuracy``."""
    return {**{f"{n}_accuracy": m["accuracy"] for n, m in stages.items()},
            **{f"{n}_tta_accuracy": m["tta_accuracy"] for n, m in stages.items() if "tta_accuracy" in m}}
