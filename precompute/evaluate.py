"""Metrics, plots and the Markdown report of a recipe run."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss  # noqa: E402


def stage_metrics(probs: np.ndarray, targets: np.ndarray, n_classes: int) -> dict:
    labels = list(range(n_classes))
    return {"accuracy": float(accuracy_score(targets, probs.argmax(1))),
            "loss": float(log_loss(targets, np.clip(probs, 1e-7, 1), labels=labels)),
            "n": int(len(targets))}


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
                  images: dict[str, str]) -> str:
    """Markdown: one row per stage, the run's identifiers, and the plots by relative path."""
    lines = [f"# {title}", "", "| stage | valid accuracy | valid loss | images |", "|---|---|---|---|"]
    for name, m in stages.items():
        lines.append(f"| {name} | {m['accuracy']:.4f} | {m['loss']:.4f} | {m['n']} |")
    lines += ["", f"Classes ({len(classes)}): {', '.join(classes)}", "", "| detail | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in details.items()]
    for caption, rel in images.items():
        lines += ["", f"## {caption}", "", f"![{caption}]({rel})"]
    return "\n".join(lines) + "\n"
