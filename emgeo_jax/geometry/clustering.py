"""Hierarchical clustering on 1 - cos (average linkage) and classical MDS of the vectors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform


def hierarchical(C: np.ndarray, names: Sequence[str]) -> dict:
    """Average-linkage clustering on the distance 1 - cos from a cosine matrix `C` `[n, n]`.

    Returns the scipy linkage matrix `[n - 1, 4]` and the merges as
    {"height", "left", "right"} with the member names of each side.
    """
    D = np.clip(1.0 - np.asarray(C, dtype=np.float64), 0.0, 2.0)
    np.fill_diagonal(D, 0.0)
    Z = linkage(squareform(D, checks=False), method="average")
    members: list[list[str]] = [[n] for n in names]
    merges = []
    for left, right, height, _ in Z:
        a, b = members[int(left)], members[int(right)]
        merges.append({"height": float(height), "left": a, "right": b})
        members.append(a + b)
    return {"linkage": Z.tolist(), "merges": merges}


def classical_mds(C: np.ndarray, dims: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Classical (Torgerson) MDS of the chord distances between unit vectors.

    For unit vectors the squared distance is 2 - 2 cos, whose double-centred Gram matrix is
    the centred cosine matrix; coordinates `[n, dims]` are the top eigenvectors scaled by the
    square roots of the eigenvalues (negative ones clipped). Returns (coords, eigenvalues).
    Sign: each axis flipped so its largest-magnitude coordinate is positive.
    """
    C = np.asarray(C, dtype=np.float64)
    n = C.shape[0]
    J = np.eye(n) - 1.0 / n
    B = J @ C @ J
    w, E = np.linalg.eigh(B)
    order = np.argsort(w)[::-1][:dims]
    w, E = np.clip(w[order], 0.0, None), E[:, order]
    X = E * np.sqrt(w)
    if X.shape[1] < dims:
        X = np.pad(X, ((0, 0), (0, dims - X.shape[1])))
        w = np.pad(w, (0, dims - w.shape[0]))
    signs = np.sign(X[np.argmax(np.abs(X), axis=0), np.arange(dims)])
    signs[signs == 0] = 1.0
    return X * signs, w
