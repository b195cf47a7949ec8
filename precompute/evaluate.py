"""Per-class metrics, plots and the Markdown report of a recipe run (a Task's own metrics: ``metrics``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import average_precision_score, confusion_matrix, precision_recall_fscore_support  # noqa: E402

from precompute.metrics import multilabel_predictions, thresholds_or_half  # noqa: E402


def per_class(probs: np.ndarray, targets: np.ndarray, classes: Sequence[str], thresholds=None) -> list[dict]:
    """Precision, recall, F1 and support per class; for multi-label targets (2-d) per tag at
    ``thresholds`` (default 0.5), with the tag's threshold and average precision."""
    if targets.ndim == 2:
        th = thresholds_or_half(thresholds, probs.shape[1])
        p, r, f, n = precision_recall_fscore_support(targets.astype(int), multilabel_predictions(probs, th),
                                                     zero_division=0)
        return [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(n[i]),
                 "threshold": float(th[i]),
                 "average_precision": float(average_precision_score(targets[:, i], probs[:, i])) if n[i] else None}
                for i, c in enumerate(classes)]
    p, r, f, n = precision_recall_fscore_support(targets, probs.argmax(1), labels=list(range(len(classes))),
                                                 zero_division=0)
    return [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(n[i])}
            for i, c in enumerate(classes)]


def predicted_tags(probs: np.ndarray, classes: Sequence[str], thresholds=None) -> list[list[str]]:
    return [[c for c, on in zip(classes, row) if on] for row in multilabel_predictions(probs, thresholds)]


def most_confused(targets: np.ndarray, preds: np.ndarray, classes: Sequence[str], top: int = 5) -> list[tuple]:
    """(actual, predicted, count) for the largest off-diagonal cells, as fastai's most_confused."""
    cm = confusion_matrix(targets, preds, labels=list(range(len(classes))))
    np.fill_diagonal(cm, 0)
    cells = sorted(((int(cm[i, j]), i, j) for i, j in zip(*np.nonzero(cm))), reverse=True)[:top]
    return [(classes[i], classes[j], n) for n, i, j in cells]


def top_losses(probs: np.ndarray, targets: np.ndarray, k: int = 8) -> np.ndarray:
    """Indices of the k images the model was most wrong about (highest cross-entropy; summed
    binary cross-entropy over the labels for multi-label targets)."""
    if targets.ndim == 2:
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        losses = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).sum(1)
    else:
        losses = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-7, 1))
    return np.argsort(-losses)[:k]


def plot_image_grid(paths: Sequence[str], captions: Sequence[str], path: Path, cols: int = 4) -> Path:
    from precompute.images import load_rgb

    rows = max(1, -(-len(paths) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p, c in zip(axes.flat, paths, captions):
        ax.imshow(load_rgb(p))
        ax.set_title(c, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_confusion(targets: np.ndarray, preds: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    cm = confusion_matrix(targets, preds, labels=list(range(len(classes))))
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_label_confusion(targets: np.ndarray, preds: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """Multi-label: one row per label with its true/false positives and negatives."""
    y, p = targets > 0.5, preds > 0.5
    cells = np.stack([(y & p).sum(0), (~y & p).sum(0), (y & ~p).sum(0), (~y & ~p).sum(0)], 1)
    fig, ax = plt.subplots(figsize=(6, max(3.0, 0.4 * len(classes) + 1.5)))
    ax.imshow(cells[:, :3], cmap="Blues", aspect="auto")
    ax.set_xticks(range(3), ["true pos.", "false pos.", "false neg."])
    ax.set_yticks(range(len(classes)), classes)
    for (i, j), v in np.ndenumerate(cells[:, :3]):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_title(f"per label, at its threshold ({int(cells[0].sum())} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_learning_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    offset = 0
    for stage, history in histories.items():
        if not history:
            continue
        epochs = [offset + h["epoch"] + 1 for h in history]
        ax_loss.plot(epochs, [h["valid_loss"] for h in history], "o-", label=f"{stage} valid")
        ax_loss.plot(epochs, [h["train_loss"] for h in history], "x--", label=f"{stage} train")
        ax_acc.plot(epochs, [h["valid_accuracy"] for h in history], "o-", label=stage)
        offset = epochs[-1]
    ax_loss.set(xlabel="epoch (all stages)", ylabel="loss")
    ax_acc.set(xlabel="epoch (all stages)", ylabel="valid accuracy")
    ax_loss.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_report(title: str, stages: dict[str, dict], classes: Sequence[str], details: dict,
                  images: dict[str, str], class_rows: Sequence[dict] = (), confused: Sequence[tuple] = (),
                  multilabel: bool = False) -> str:
    """Markdown: one row per stage (with TTA where measured), per-class metrics, the most
    confused pairs, the run's identifiers, and the plots by relative path."""
    lines = [f"# {title}", "", "| stage | valid accuracy | valid loss | accuracy with TTA | loss with TTA | images |",
             "|---|---|---|---|---|---|"]
    for name, m in stages.items():
        tta_acc = f"{m['tta_accuracy']:.4f}" if "tta_accuracy" in m else "-"
        tta_loss = f"{m['tta_loss']:.4f}" if "tta_loss" in m else "-"
        lines.append(f"| {name} | {m['accuracy']:.4f} | {m['loss']:.4f} | {tta_acc} | {tta_loss} | {m['n']} |")
    if multilabel:
        lines += ["", "Multi-label: accuracy is the share of correct label decisions (fastai's accuracy_thresh) at "
                  "each label's threshold, chosen for the best F1 on this validation split (so these figures are "
                  "optimistic; hold out a test split for an unbiased one).", "",
                  "| stage | exact match | F1 micro | F1 macro | F2 (per image) |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {m['exact_match']:.4f} | {m['f1_micro']:.4f} | {m['f1_macro']:.4f} | "
                  f"{m['f2_samples']:.4f} |" for name, m in stages.items() if "exact_match" in m]
    if class_rows and multilabel:
        lines += ["", "## Per label (final stage)", "",
                  "| label | threshold | precision | recall | F1 | average precision | images |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['class']} | {r['threshold']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                  f"{'-' if r['average_precision'] is None else format(r['average_precision'], '.3f')} | {r['support']} |"
                  for r in class_rows]
    elif class_rows:
        lines += ["", "## Per class (final stage)", "", "| class | precision | recall | F1 | images |", "|---|---|---|---|---|"]
        lines += [f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
                  for r in class_rows]
    if confused:
        lines += ["", "## Most confused (actual -> predicted)", "", "| actual | predicted | images |", "|---|---|---|"]
        lines += [f"| {a} | {p} | {n} |" for a, p, n in confused]
    lines += ["", f"Classes ({len(classes)}): {', '.join(classes)}", "", "| detail | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in details.items()]
    for caption, rel in images.items():
        lines += ["", f"## {caption}", "", f"![{caption}]({rel})"]
    return "\n".join(lines) + "\n"
