"""The cached activations as one vector per image, and an exact cosine k-NN over them.

k-NN: faiss ``IndexFlatIP`` (exact inner product on L2-normalised rows). Measured against
scikit-learn's brute-force ``NearestNeighbors(metric="cosine")`` on 2,560-wide rows, 11 neighbours,
2 shared CPUs: 580 rows 0.17 s vs 0.53 s, 20,000 rows 88 s vs 126 s; both exact, so faiss.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def pooled_vectors(entry, image_ids: list[str]) -> np.ndarray:
    """float32 (n, d): the entry's rows for ``image_ids`` (each id read once); spatial maps
    (n, c, h, w) become fastai's concat pool (max and mean over h, w), as the pooled cache holds."""
    unique = list(dict.fromkeys(image_ids))
    rows = np.asarray(entry.read(unique), dtype=np.float32)
    if rows.ndim > 2:
        flat = rows.reshape(rows.shape[0], rows.shape[1], -1)
        rows = np.concatenate([flat.max(-1), flat.mean(-1)], axis=1)
    at = {image_id: i for i, image_id in enumerate(unique)}
    return rows[[at[i] for i in image_ids]]


def normalise(x: np.ndarray, center: bool = True) -> np.ndarray:
    """Rows centred on their mean (``center``) and scaled to unit length: inner product = cosine.
    Centring matters: pooled ReLU activations are all >= 0, so raw cosines of unrelated photos
    sit high (0.6-0.8) and near-copies stand out less."""
    z = x - x.mean(0, keepdims=True) if center else x
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return np.ascontiguousarray(z / np.maximum(norms, 1e-12), dtype=np.float32)


def knn(query: np.ndarray, base: np.ndarray | None = None, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (n_query, k'), best first: exact cosine neighbours of the
    normalised ``query`` rows among ``base`` (default: the query itself, self included)."""
    import faiss

    base = query if base is None else base
    k = min(k, len(base))
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    sims, idx = index.search(query, k)
    return sims, idx


def robust_z(values: np.ndarray) -> np.ndarray:
    """(v - median) / (1.4826 * MAD): how far each value sits above the bulk, in robust sigmas."""
    med = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - med))
    return (values - med) / max(mad, 1e-6)


def rows_frame(manifest: pd.DataFrame) -> pd.DataFrame:
    """The ok rows of a manifest (labelled, with a split), in a fresh 0..n-1 index."""
    return manifest[manifest["status"] == "ok"].reset_index(drop=True)
