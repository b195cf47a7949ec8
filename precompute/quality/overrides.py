"""A user's overrides: rows of data_quality.csv marked ``drop`` or ``relabel``, applied to a manifest.

The CSV has the columns of ``data_quality.csv`` (extra columns are ignored; ``image_id`` and
``action`` are needed, ``split`` narrows a row to one copy, ``suggested_label`` is the new label
of a ``relabel``). Rows with an empty action are findings left as they are. Nothing is deleted
from disk: a dropped image becomes status ``excluded``, a relabelled one keeps status ``ok`` with
the new label, and both say so in ``reason``. Labels and statuses are in the manifest's data
version, so everything downstream goes stale; ``applied`` says what was done, row by row.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd

ACTIONS = ("drop", "relabel")
EXCLUDED = "excluded"
ENV = "PRECOMPUTE_OVERRIDES"


class OverrideError(ValueError):
    """The override CSV cannot be applied; the message names the file, the line and what to change."""


def overrides_path(home: Path) -> Path:
    """$PRECOMPUTE_OVERRIDES, else ``<project home>/overrides.csv`` (applied when it exists)."""
    value = os.environ.get(ENV, "").strip()
    return Path(value).expanduser() if value else Path(home) / "overrides.csv"


def _read(csv: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise OverrideError(f"{csv}: not a CSV this can read ({exc}); write it with the columns of "
                            "data_quality.csv (at least image_id and action)") from None
    missing = {"image_id", "action"} - set(table.columns)
    if missing:
        raise OverrideError(f"{csv}: no column(s) {sorted(missing)}; copy rows of data_quality.csv and set "
                            f"action to one of {ACTIONS}")
    table["action"] = table["action"].str.strip().str.lower()
    table = table[table["action"] != ""]
    for line, row in table.iterrows():
        where = f"{csv} line {line + 2}"
        if row["action"] not in ACTIONS:
            raise OverrideError(f"{where}: action {row['action']!r}; use one of {ACTIONS} (or leave it empty)")
        if row["action"] == "relabel" and not row.get("suggested_label", "").strip():
            raise OverrideError(f"{where}: relabel without a suggested_label; write the new label there")
    return table


def apply_overrides(manifest: pd.DataFrame, csv: Path | str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the manifest with the overrides applied, one row per override: image_id, relpath, split,
    action, old_label, new_label, applied ("yes" or why not)). No file: the manifest as it is."""
    columns = ["image_id", "relpath", "split", "action", "old_label", "new_label", "applied"]
    if csv is None or not Path(csv).is_file():
        return manifest, pd.DataFrame(columns=columns)
    csv = Path(csv)
    table = _read(csv)
    version = hashlib.sha256(csv.read_bytes()).hexdigest()[:12]
    out = manifest.copy()
    out.attrs.update(manifest.attrs)
    known = set(out.loc[out["status"] == "ok", "label"])
    done = []
    for _, row in table.iterrows():
        hit = out["image_id"] == row["image_id"]
        if row.get("split", "").strip():
            hit &= out["split"] == row["split"].strip()
        new = row.get("suggested_label", "").strip() if row["action"] == "relabel" else ""
        base = {"image_id": row["image_id"], "relpath": row.get("relpath", ""), "split": row.get("split", ""),
                "action": row["action"], "old_label": "", "new_label": new}
        if not hit.any():
            done.append({**base, "applied": "no: no such image in the manifest (removed from the source?)"})
            continue
        base.update(relpath=out.loc[hit, "relpath"].iloc[0], old_label=out.loc[hit, "label"].iloc[0])
        if row["action"] == "relabel" and new not in known and manifest.attrs.get("label_delim") is None:
            done.append({**base, "applied": f"no: {new!r} is not a class ({sorted(known)})"})
            continue
        tag = f"override {csv.name}@{version}: {row['action']}"
        if row["action"] == "drop":
            out.loc[hit, "status"] = EXCLUDED
            out.loc[hit, "reason"] = f"{tag}; the file stays on disk"
        else:
            out.loc[hit, "reason"] = f"{tag} from {base['old_label']!r}"
            out.loc[hit, "label"] = new
        done.append({**base, "applied": "yes"})
    return out, pd.DataFrame(done, columns=columns)


def applied_overrides(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's rows an override changed (their reason says which file and version)."""
    return manifest[manifest["reason"].astype(str).str.startswith("override ")][
        ["image_id", "relpath", "split", "label", "status", "reason"]].reset_index(drop=True)
