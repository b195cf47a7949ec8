"""Metrics, plots and the Markdown report of a recipe run."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support  # noqa: E402


def stage_metrics(probs: np.ndarray, targets: np.ndarray, n_classes: int) -> dict:
    labels = list(range(n_classes))
    return {"accuracy": float(accuracy_score(targets, probs.argmax(1))),
            "loss": float(log_loss(targets, np.clip(probs, 1e-7, 1), labels=labels)),
            "n": int(len(targets))}


def per_class(probs: np.ndarray, targets: np.ndarray, classes: Sequence[str]) -> list[dict]:
    p, r, f, n = precision_recall_fscore_support(targets, probs.argmax(1), labels=list(range(len(classes))),
                                                 zero_division=0)
    return [{"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(n[i])}
            for i, c in enumerate(classes)]


def most_confused(targets: np.ndarray, preds: np.ndarray, classes: Sequence[str], top: int = 5) -> list[tuple]:
    """(actual, predicted, count) for the largest off-diagonal cells, as fastai's most_confused."""
    cm = confusion_matrix(targets, preds, labels=list(range(len(classes))))
    np.fill_diagonal(cm, 0)
    cells = sorted(((int(cm[i, j]), i, j) for i, j in zip(*np.nonzero(cm))), reverse=True)[:top]
    return [(classes[i], classes[j], n) for n, i, j in cells]


def top_losses(probs: np.ndarray, targets: np.ndarray, k: int = 8) -> np.ndarray:
    """Indices of the k images the model was most wrong about (highest cross-entropy)."""
    losses = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-7, 1))
    return np.argsort(-losses)[:k]


def plot_image_grid(paths: Sequence[str], captions: Sequence[str], path: Path, cols: int = 4) -> Path:
    from precompute.data import load_rgb

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


def plot_tensor_grid(images, path: Path, mean, std, cols: int = 4) -> Path:
    """Augmented training samples as the model sees them (normalization undone)."""
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    m, s = np.asarray(mean)[:, None, None], np.asarray(std)[:, None, None]
    for ax, img in zip(axes.flat, images):
        ax.imshow(np.clip(img.numpy() * s + m, 0, 1).transpose(1, 2, 0))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_lr_find(result: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"])
    if result["suggestion"] is not None:
        ax.axvline(result["suggestion"], color="red", linestyle="--", label=f"suggested {result['suggestion']:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed loss",
           title=None if result["suggestion"] is not None else "the loss never fell: no suggestion")
    if result["suggestion"] is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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
                  images: dict[str, str], class_rows: Sequence[dict] = (), confused: Sequence[tuple] = ()) -> str:
    """Markdown: one row per stage (with TTA where measured), per-class metrics, the most
    confused pairs, the run's identifiers, and the plots by relative path."""
    lines = [f"# {title}", "", "| stage | valid accuracy | valid loss | accuracy with TTA | loss with TTA | images |",
             "|---|---|---|---|---|---|"]
    for name, m in stages.items():
        tta_acc = f"{m['tta_accuracy']:.4f}" if "tta_accuracy" in m else "-"
        tta_loss = f"{m['tta_loss']:.4f}" if "tta_loss" in m else "-"
        lines.append(f"| {name} | {m['accuracy']:.4f} | {m['loss']:.4f} | {tta_acc} | {tta_loss} | {m['n']} |")
    if class_rows:
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
