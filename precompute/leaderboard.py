"""The arch x cut leaderboard: each evaluated partition's accuracy beside what it cost.

Input is one plain dict per partition (no orchestrator types), as ``assets/leaderboard.py``
gathers them::

    {"arch": "resnet34", "cut": 0,
     "accuracy": {"head_on_cache": 0.93, "head_augmented": 0.94, "finetuned": 0.96},  # per stage
     "tta_accuracy": {"finetuned": 0.97},          # optional, per stage
     "images_per_s": 41.2,      # precompute throughput when the entry was computed (None: unknown)
     "cache_bytes": 1234567,    # the entry's bytes on disk
     "head_epoch_s": 0.08,      # mean seconds per head_on_cache epoch
     "sweep_best_accuracy": 0.95,  # optional: the head_sweep's best configuration
     "report": "/path/report.md", "mlflow_run_id": "..."}

``table`` makes the DataFrame (best final accuracy first), ``markdown`` and ``plot`` show it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pandas as pd

STAGES = ("head_on_cache", "head_augmented", "finetuned")  # the recipe's order; the last one ranks
COST_COLUMNS = ("images_per_s", "cache_mib", "head_epoch_s")


def _num(value) -> float | None:
    """A finite float, or None for missing / NaN / not a number."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def stage_order(partitions: Sequence[dict]) -> list[str]:
    """Every stage any partition reports, the recipe's stages first in recipe order."""
    seen = [s for p in partitions for s in (p.get("accuracy") or {})]
    known = [s for s in STAGES if s in seen]
    return known + sorted(set(seen) - set(known))


def table(partitions: Sequence[dict]) -> pd.DataFrame:
    """One row per partition: arch, cut, accuracy per stage (and with TTA), precompute img/s, cache MiB,
    head epoch seconds, the sweep's best; sorted by the last stage's accuracy, best first, then cheaper
    precompute. ValueError names a partition dict without arch or cut."""
    stages = stage_order(partitions)
    rows = []
    for p in partitions:
        if "arch" not in p or "cut" not in p:
            raise ValueError(f"a leaderboard partition needs 'arch' and 'cut', got keys {sorted(p)}")
        acc, tta = p.get("accuracy") or {}, p.get("tta_accuracy") or {}
        row = {"arch": str(p["arch"]), "cut": int(p["cut"])}
        row.update({f"{s} accuracy": _num(acc.get(s)) for s in stages})
        row.update({f"{s} tta_accuracy": _num(tta.get(s)) for s in stages if s in tta})
        cache = _num(p.get("cache_bytes"))
        row.update(images_per_s=_num(p.get("images_per_s")), cache_mib=None if cache is None else cache / 2**20,
                   head_epoch_s=_num(p.get("head_epoch_s")), sweep_best_accuracy=_num(p.get("sweep_best_accuracy")),
                   report=p.get("report") or "", mlflow_run_id=p.get("mlflow_run_id") or "")
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    rank = f"{stages[-1]} accuracy" if stages else None
    keys = ([rank] if rank else []) + ["images_per_s", "arch", "cut"]
    asc = ([False] if rank else []) + [False, True, True]
    return df.sort_values(keys, ascending=asc, na_position="last", kind="stable").reset_index(drop=True)


def best(df: pd.DataFrame) -> dict | None:
    """The top row (arch, cut and its numbers), or None for an empty board."""
    if df.empty:
        return None
    # plain Python values: they go into JSON metadata and MLflow params
    return {k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in df.iloc[0].items()}


def _cell(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def markdown(df: pd.DataFrame) -> str:
    """The board as a Markdown table; a dash where a number is unknown."""
    if df.empty:
        return "No partition has an evaluation report yet: materialize the recipe for at least one arch x cut."
    acc_cols = [c for c in df.columns if c.endswith("accuracy") and c != "sweep_best_accuracy"]
    if df["sweep_best_accuracy"].notna().any():
        acc_cols.append("sweep_best_accuracy")
    cols = ["arch", "cut", *acc_cols, *COST_COLUMNS]
    names = {"images_per_s": "precompute img/s", "cache_mib": "cache MiB", "head_epoch_s": "head epoch s",
             "sweep_best_accuracy": "head_sweep best accuracy"}
    fmt = {**{c: "{:.4f}" for c in acc_cols}, "images_per_s": "{:.1f}", "cache_mib": "{:.2f}",
           "head_epoch_s": "{:.3f}", "cut": "{}", "arch": "{}"}
    lines = ["| " + " | ".join(names.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_cell(r[c], fmt[c]) for c in cols) + " |")
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: str | Path) -> Path:
    """Accuracy against cost: precompute milliseconds per image (left) and head epoch seconds (right);
    one marker per stage, each partition labelled arch|cut. Partitions without a cost are left out of
    that panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [c.removesuffix(" accuracy") for c in df.columns if c.endswith(" accuracy")] if not df.empty else []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    costs = (("precompute ms / image", lambda r: 1000.0 / r["images_per_s"] if _num(r["images_per_s"]) else None),
             ("head_on_cache epoch seconds", lambda r: _num(r["head_epoch_s"])))
    markers = "osD^v<>"
    for ax, (label, cost) in zip(axes, costs):
        for k, stage in enumerate(stages):
            pts = [(cost(r), r[f"{stage} accuracy"], f"{r['arch']}|{r['cut']}") for _, r in df.iterrows()]
            pts = [(x, y, n) for x, y, n in pts if x is not None and _num(y) is not None]
            if not pts:
                continue
            ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], marker=markers[k % len(markers)], s=40,
                       alpha=0.8, label=stage)
            if k == len(stages) - 1:  # label each partition once, at its last stage
                for x, y, name in pts:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("valid accuracy")
        ax.grid(alpha=0.3)
    if stages:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"arch x cut leaderboard: {len(df)} partition(s)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
