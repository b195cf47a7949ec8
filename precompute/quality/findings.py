"""The findings, each from the cached vectors alone: duplicates and leaks, label issues, outliers, drift.

Every function returns rows of the findings table (``FINDING_COLUMNS``, the columns of
``data_quality.csv``) and a summary dict; the higher ``score``, the more suspect the row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from precompute.quality.vectors import knn, robust_z

FINDING_COLUMNS = ["finding", "score", "similarity", "image_id", "relpath", "split", "label", "suggested_label",
                   "other_image_id", "other_relpath", "other_split", "other_label", "action", "note"]
TRAIN = "train"


def _finding(kind: str, row, score: float, **extra) -> dict:
    out = dict.fromkeys(FINDING_COLUMNS, "")
    out.update(finding=kind, score=round(float(score), 4), similarity=np.nan, image_id=row.image_id,
               relpath=row.relpath, split=row.split, label=row.label)
    out.update(extra)
    return out


def table(found: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(found, columns=FINDING_COLUMNS)


def _neighbours(idx: np.ndarray, sims: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Row i's neighbours without itself (an identical twin may come before it)."""
    keep = (idx[i] != i) & (idx[i] >= 0)
    return idx[i][keep], sims[i][keep]


def duplicates(rows: pd.DataFrame, zc: np.ndarray, zraw: np.ndarray, k: int = 10, z_min: float = 4.0,
               exact_cosine: float = 0.985) -> tuple[pd.DataFrame, dict]:
    """Near-duplicate pairs by a hubness-corrected cosine (CSLS): s_ij - (r_i + r_j) / 2, r_i the mean
    similarity of row i to its 2nd..(k+1)th neighbours. A near copy stands far above its row's
    neighbourhood; two photos of similar scenes do not. A pair is reported when that margin is
    ``z_min`` robust sigmas above the median row's best margin, or when the raw cosine is at least
    ``exact_cosine`` (re-encoded or identical bytes). Pairs across splits are ``leak``s, with the
    non-training image first (the copy one would drop)."""
    n = len(rows)
    if n < 3:
        return table([]), {"pairs": 0, "leaks": 0}
    sims, idx = knn(zc, k=min(k + 2, n))
    neigh = [_neighbours(idx, sims, i) for i in range(n)]
    r = np.array([s[1:].mean() if len(s) > 1 else s.mean() for _, s in neigh])
    best = np.array([(s[0] - (r[i] + r[j[0]]) / 2) for i, (j, s) in enumerate(neigh)])
    med, mad = np.median(best), 1.4826 * np.median(np.abs(best - np.median(best)))
    pairs: dict[tuple[int, int], tuple[float, float]] = {}
    for i, (js, ss) in enumerate(neigh):
        for j, s in zip(js[:3], ss[:3]):
            z = (s - (r[i] + r[j]) / 2 - med) / max(mad, 1e-6)
            cos = float(zraw[i] @ zraw[j])
            if z >= z_min or cos >= exact_cosine:
                pairs[(min(i, j), max(i, j))] = (float(z), cos)
    found = []
    for (i, j), (z, cos) in sorted(pairs.items(), key=lambda kv: -kv[1][0]):
        a, b = rows.iloc[i], rows.iloc[j]
        leak = a.split != b.split
        if leak and a.split == TRAIN:
            a, b = b, a
        same = a.image_id == b.image_id
        found.append(_finding("leak" if leak else "duplicate", a, z, similarity=round(cos, 4),
                              other_image_id=b.image_id, other_relpath=b.relpath, other_split=b.split,
                              other_label=b.label,
                              note="identical bytes" if same else f"cosine {cos:.3f}, {z:.1f} robust sigmas "
                                                                  "above the typical nearest neighbour"))
    t = table(found)
    return t, {"pairs": len(t), "leaks": int((t["finding"] == "leak").sum()) if len(t) else 0}


def outliers(rows: pd.DataFrame, z: np.ndarray, k: int = 10, z_min: float = 4.0) -> tuple[pd.DataFrame, dict]:
    """Images far from every other: mean cosine distance to their k nearest neighbours (``z``: the
    rows L2-normalised, not centred: centring makes images with weak activations look alike),
    reported when ``z_min`` robust sigmas above the median image's."""
    n = len(rows)
    if n < 3:
        return table([]), {"outliers": 0}
    sims, idx = knn(z, k=min(k + 1, n))
    dist = np.array([1 - _neighbours(idx, sims, i)[1].mean() for i in range(n)])
    sigmas = robust_z(dist)
    found = [_finding("outlier", rows.iloc[i], sigmas[i], similarity=round(1 - dist[i], 4),
                      note=f"mean cosine distance to its {k} nearest images {dist[i]:.3f} "
                           f"(median image {np.median(dist):.3f})")
             for i in np.argsort(-sigmas) if sigmas[i] >= z_min]
    return table(found), {"outliers": len(found), "knn_distance_median": round(float(np.median(dist)), 4)}


def drift(rows: pd.DataFrame, z: np.ndarray, previous_ids, reference: str, k: int = 10,
          percentile_min: float = 95.0) -> tuple[pd.DataFrame, dict]:
    """How far the images the last run had not seen sit from the ones it had (training split):
    each new image's mean cosine distance to its k nearest reference images, as a percentile of
    the reference images' own (leave-one-out) distances, and a domain classifier's out-of-fold AUC
    (0.5: indistinguishable). New images at or above ``percentile_min`` are findings."""
    from precompute.quality.labels import oof_scores

    if previous_ids is None:
        return table([]), {"drift": "no earlier data_quality run: these images are the reference for the next one"}
    seen = rows["image_id"].isin(set(previous_ids)).to_numpy()
    new = ~seen
    ref = seen & (rows["split"] == TRAIN).to_numpy()
    ref = ref if ref.sum() > k else seen
    summary = {"drift_reference": f"{int(ref.sum())} images {reference}", "new_images": int(new.sum())}
    if not new.any() or ref.sum() < 3:
        return table([]), {**summary, "drift": "no new images" if not new.any() else "reference too small (< 3)"}
    zr, zn = z[ref], z[new]
    kk = min(k, int(ref.sum()) - 1)
    rs, ri = knn(zr, k=kk + 1)
    d_ref = np.array([1 - _neighbours(ri, rs, i)[1][:kk].mean() for i in range(len(zr))])
    ns, _ = knn(zn, zr, k=kk)
    d_new = 1 - ns.mean(1)
    pct = np.array([(d_ref <= d).mean() * 100 for d in d_new])
    summary.update(drift_median_percentile=round(float(np.median(pct)), 1),
                   drift_share_above_p95=round(float((pct >= 95).mean()), 4))
    if new.sum() >= 5 and ref.sum() >= 5:
        from sklearn.metrics import roc_auc_score

        both = np.concatenate([zr, zn])
        y = np.r_[np.zeros(len(zr), int), np.ones(len(zn), int)]
        p = oof_scores(both, y, 2, folds=5, seed=0)[:, 1]
        summary["drift_domain_auc"] = round(float(roc_auc_score(y, p)), 4)
    new_rows = rows[new].reset_index(drop=True)
    found = [_finding("drift", new_rows.iloc[i], pct[i], similarity=round(1 - d_new[i], 4),
                      note=f"k-NN distance at the {pct[i]:.0f}th percentile of the reference's")
             for i in np.argsort(-pct) if pct[i] >= percentile_min]
    return table(found), summary
