"""Seed 001's five geometric methods, on stacked vectors `V` `[n, D]` (rows normalised first).

1. `subspace_reconstruction`: SVD, rank-k reconstruction, Pearson r of cosine matrices.
2. `triangle_consistency`: planarity of every triplet from its three angles.
3. `pca_structure`: PCA of the vectors (centred across vectors), variance explained, scores.
4. `projection_norms`: norm of each vector's projection on the span of reference vectors.
5. `residual_analysis`: remove the mean direction, recompute cosines, the "reduction".

All are invariant to a common orthogonal rotation of the vectors and to rescaling each vector.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from emgeo_jax.geometry.similarity import ZERO_NORM, angle_matrix, cosine_matrix, unit_rows

RANK_TOL = 1e-5  # singular values below RANK_TOL * s_max count as zero (float32 inputs)


def _offdiag(C: np.ndarray) -> np.ndarray:
    return C[np.triu_indices(C.shape[0], k=1)]


def pearson_offdiag(A: np.ndarray, B: np.ndarray) -> float | None:
    """Pearson r between the upper off-diagonal entries of two `[n, n]` matrices.

    None when undefined (fewer than two pairs, or either side constant).
    """
    a, b = _offdiag(A), _offdiag(B)
    if a.size < 2 or np.ptp(a) < 1e-9 or np.ptp(b) < 1e-9:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def cosines_allow_zero(X: np.ndarray) -> np.ndarray:
    """Cosine matrix of rows of X where a (numerically) zero row has cosine 0 with the others."""
    norms = np.linalg.norm(X, axis=1)
    safe = np.where(norms > ZERO_NORM, norms, 1.0)
    U = np.where((norms > ZERO_NORM)[:, None], X / safe[:, None], 0.0)
    C = np.asarray(np.clip(U @ U.T, -1.0, 1.0), dtype=np.float64)
    np.fill_diagonal(C, 1.0)
    return C


def subspace_reconstruction(V: np.ndarray) -> dict:
    """SVD of the unit rows `U = P S Q^T`; for each rank k < rank(U), the rank-k reconstruction
    `P_k S_k Q_k^T`, its cosine matrix and the Pearson r with the original cosine matrix.

    Returns singular values `[min(n, D)]`, the fraction of squared singular values per
    component, the numerical rank and `reconstruction`: list of {rank, pearson_r, max_abs_error}.
    """
    U = unit_rows(V)
    C = np.asarray(cosine_matrix(U))
    P, S, Qt = np.linalg.svd(U, full_matrices=False)
    s = np.asarray(S, dtype=np.float64)
    rank = int(np.sum(s > RANK_TOL * s[0]))
    recon = []
    for k in range(1, rank):
        Xk = (P[:, :k] * S[:k]) @ Qt[:k]
        Ck = cosines_allow_zero(Xk)
        recon.append(
            {
                "rank": k,
                "pearson_r": pearson_offdiag(C, Ck),
                "max_abs_error": float(np.abs(Ck - C).max()),
            }
        )
    return {
        "singular_values": s.tolist(),
        "energy_fraction": (s**2 / np.sum(s**2)).tolist(),
        "rank": rank,
        "reconstruction": recon,
    }


def triangle_error(t12: float, t13: float, t23: float) -> tuple[float, float, float]:
    """Planarity of three unit vectors from their angles (degrees).

    Pivot 1: if the vectors lie in a plane, t23 equals |t12 - t13| or t12 + t13 — taken modulo
    the circle, i.e. min(t12 + t13, 360 - t12 - t13); seed 001 omits that wrap, which calls three
    coplanar vectors at 120 deg "non-planar". Returns (pred_diff, pred_sum, error) with error the
    distance of t23 to the nearer prediction. The error equals the smallest slack of the
    spherical triangle inequalities, so it does not depend on which vector is the pivot.
    """
    pred_diff = abs(t12 - t13)
    pred_sum = min(t12 + t13, 360.0 - t12 - t13)
    return pred_diff, pred_sum, min(abs(t23 - pred_diff), abs(t23 - pred_sum))


def triangle_consistency(
    V: np.ndarray, names: Sequence[str], threshold_deg: float = 25.0
) -> list[dict]:
    """Every triplet (i < j < k) of rows: angles, planar predictions of angle(j, k) from the pivot
    i, error and the non-planar flag (error > `threshold_deg`, seed 001: 25 deg)."""
    A = angle_matrix(cosine_matrix(V, names))
    out = []
    for i, j, k in itertools.combinations(range(len(names)), 3):
        pred_diff, pred_sum, err = triangle_error(A[i, j], A[i, k], A[j, k])
        out.append(
            {
                "triplet": [names[i], names[j], names[k]],
                "angles_deg": [float(A[i, j]), float(A[i, k]), float(A[j, k])],
                "predicted_deg": [float(pred_diff), float(pred_sum)],
                "error_deg": float(err),
                "non_planar": bool(err > threshold_deg),
            }
        )
    return out


def principal_components(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact PCA of rows `X` `[m, D]` centred across rows (no randomised solver).

    Returns (components `[r, D]` unit rows, scores `[m, r]`, variance explained ratio `[r]`)
    for the r components with non-zero variance. Sign: each component is flipped so that the
    largest-magnitude score is positive, which is rotation invariant and reproducible.
    """
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(axis=0, keepdims=True)
    _, S, Qt = np.linalg.svd(Xc, full_matrices=False)
    s = np.asarray(S, dtype=np.float64)
    if s.size == 0 or s[0] <= ZERO_NORM:
        raise ValueError("PCA needs at least two distinct vectors")
    r = int(np.sum(s > RANK_TOL * s[0]))
    comps = Qt[:r]
    scores = np.asarray(Xc @ comps.T, dtype=np.float64)
    signs = np.sign(scores[np.argmax(np.abs(scores), axis=0), np.arange(r)])
    signs[signs == 0] = 1.0
    ratio = s[:r] ** 2 / np.sum(s**2)
    return np.asarray(comps, dtype=np.float64) * signs[:, None], scores * signs, ratio


def pca_structure(V: np.ndarray, names: Sequence[str]) -> dict:
    """Seed 001 method 3 on unit rows: variance explained per component and the per-vector
    scores ("loadings") on each component; `uniform_share` = 1/n is the no-structure reference
    for PC1 ("substantially more than 1/6" with six vectors)."""
    _, scores, ratio = principal_components(unit_rows(V, names))
    return {
        "variance_explained": ratio.tolist(),
        "loadings": {n: scores[i].tolist() for i, n in enumerate(names)},
        "uniform_share": 1.0 / len(names),
    }


def projection_norms(V: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Norm of the projection of each unit row of `V` `[n, D]` on span(rows of `basis` `[k, D]`).

    Computed with an orthonormal basis of the span from an SVD, so colinear basis vectors are
    fine. The squared norm is the fraction of the vector's variance inside the span.
    """
    U = unit_rows(V)
    B = unit_rows(basis)
    _, S, Qt = np.linalg.svd(B, full_matrices=False)
    r = int(np.sum(np.asarray(S) > RANK_TOL * float(S[0])))
    coeff = U @ Qt[:r].T
    return np.clip(np.asarray(np.linalg.norm(coeff, axis=1), dtype=np.float64), 0.0, 1.0)


def remove_direction(V: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """`v - (v . r) r` for each row of `V` `[n, D]`, with `r` the normalised `direction` `[D]`."""
    r = unit_rows(np.asarray(direction)[None, :], ["direction"])[0]
    V = np.asarray(V, dtype=np.float64)
    return V - np.outer(V @ r, r)


def reduction_percent(C_before: np.ndarray, C_after: np.ndarray) -> float | None:
    """Seed 001's "reduction": mean over off-diagonal pairs of (|c| - |c'|) / |c|, in percent.

    Positive: residual cosines are smaller in magnitude (shared structure removed); negative:
    they grew (seed 001's -256.8% for profanity-malicious-medical). Pairs with c = 0 are
    skipped; None if no pair is left.
    """
    a, b = np.abs(_offdiag(C_before)), np.abs(_offdiag(C_after))
    keep = a > 1e-9
    if not keep.any():
        return None
    return float(100.0 * np.mean((a[keep] - b[keep]) / a[keep]))


def residual_analysis(V: np.ndarray, names: Sequence[str]) -> dict:
    """Seed 001 method 5: remove each unit vector's projection on the mean direction (the
    normalised mean of the unit vectors), recompute cosines and the reduction percent.

    A residual that vanishes (a vector equal to the mean direction) has cosine 0 with the rest.
    """
    U = unit_rows(V, names)
    mean = U.mean(axis=0)
    if float(np.linalg.norm(mean)) <= 1e-6:
        raise ValueError("residual analysis: the mean direction is zero (vectors cancel out)")
    C = cosine_matrix(U)
    R = cosines_allow_zero(remove_direction(U, mean))
    return {
        "cosine_before": C.tolist(),
        "cosine_after": R.tolist(),
        "reduction_percent": reduction_percent(C, R),
    }
