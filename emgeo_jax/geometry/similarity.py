"""Pairwise similarity: unit rows, cosine and angle matrices, set comparisons, layer traces.

Vectors are stacked as rows `V` `[n, D]`. Every function works on directions: rows are
normalised first, so results do not depend on vector scale, and a zero row is an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ZERO_NORM = 1e-12


def unit_rows(V: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
    """`[n, D]` -> rows scaled to unit norm; a zero (or non-finite) row raises naming the vector."""
    V = np.asarray(V, dtype=np.float64)
    if V.ndim != 2:
        raise ValueError(f"expected stacked vectors [n, D], got shape {V.shape}")
    norms = np.linalg.norm(V, axis=1)
    bad = np.flatnonzero(~(np.asarray(norms) > ZERO_NORM) | ~np.isfinite(np.asarray(norms)))
    if bad.size:
        label = names[bad[0]] if names is not None else f"row {bad[0]}"
        raise ValueError(f"vector '{label}' has zero (or non-finite) norm; it has no direction")
    return V / norms[:, None]


def cosine_matrix(V: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
    """Cosine similarities `[n, n]` of the rows of `V` `[n, D]` (diagonal exactly 1)."""
    U = unit_rows(V, names)
    C = np.clip(U @ U.T, -1.0, 1.0)
    np.fill_diagonal(C, 1.0)
    return C


def angle_matrix(C: np.ndarray) -> np.ndarray:
    """Angles in degrees, arccos of a cosine matrix `[n, n]`."""
    return np.degrees(np.arccos(np.clip(C, -1.0, 1.0)))


def set_mean_cosine(C: np.ndarray, a: Sequence[int], b: Sequence[int] | None = None) -> float:
    """Seed 000's set comparison on a cosine matrix `C` `[n, n]`.

    Within one set (`b` None): mean of cos(v_i, v_j) over pairs i < j of `a`.
    Between two sets: mean of cos(v_i, v_j) over all i in `a`, j in `b` (disjoint sets).
    """
    a = list(a)
    if b is None:
        if len(a) < 2:
            raise ValueError("a within-set mean needs at least two vectors")
        iu = np.triu_indices(len(a), k=1)
        return float(C[np.ix_(a, a)][iu].mean())
    if set(a) & set(b):
        raise ValueError("between-set comparison needs disjoint sets")
    return float(C[np.ix_(a, list(b))].mean())


def layer_trace(stack: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine per layer between `stack` `[L, D]` and `reference` `[L, D]` (or one `[D]`) -> `[L]`.

    Row l is the output of decoder block l (HF `hidden_states[l + 1]`).
    """
    stack = unit_rows(stack)
    ref = np.asarray(reference, dtype=np.float64)
    ref = unit_rows(np.broadcast_to(ref, stack.shape) if ref.ndim == 1 else ref)
    if ref.shape != stack.shape:
        raise ValueError(f"layer trace: shapes {stack.shape} and {ref.shape} differ")
    return np.asarray(np.clip(np.sum(stack * ref, axis=1), -1.0, 1.0), dtype=np.float64)
