"""The five independence tests of Hunter (2025, seed 001) for two clusters of directions,
and the verdict.

Clusters are lists of row indices into unit vectors `U` `[n, D]`. Each test yields one scalar
statistic with a side that favours "independent mechanisms" under a configurable threshold:

1. `cluster_angle`: angle (deg) between the cluster means; independent if >= threshold.
2. `projection`: mean norm of each vector's projection on the other cluster's span, the larger
   of the two directions (squared norm = shared variance); independent if < threshold.
3. `cross_residual`: residual-analysis reduction (%) averaged over every cross-cluster triplet
   (two vectors from one cluster, one from the other); independent if < threshold (negative).
4. `pc1_ablation`: PC1 of all vectors (centred PCA) is removed; per cluster (two or more
   members) the mean change of within-cluster cosines; statistic = spread max|d| - min|d|
   across clusters; independent ("PC1 separates clusters") if >= threshold.
5. `cross_pca`: PC1 of each cluster (centred) and the fraction of the other cluster's centred
   variance along it, the larger direction; independent if < threshold.

A test whose inputs are too small (e.g. one-vector clusters for 5) has statistic None.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from emgeo_jax.geometry.similarity import cosine_matrix, unit_rows
from emgeo_jax.geometry.subspace import (
    cosines_allow_zero,
    principal_components,
    projection_norms,
    remove_direction,
    residual_analysis,
)

TESTS = ("cluster_angle", "projection", "cross_residual", "pc1_ablation", "cross_pca")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Decision thresholds (seed 001 defaults) and the significance level for nulls."""

    cluster_angle_min_deg: float = 80.0
    projection_max: float = 0.3
    cross_reduction_max: float = 0.0
    pc1_differential_min: float = 0.1
    cross_variance_max: float = 0.10
    non_planar_deg: float = 25.0
    strong_projection: float = 0.8
    alpha: float = 0.05

    def rule(self, test: str) -> tuple[str, float]:
        """(comparison that means "independent", threshold) for a test."""
        return {
            "cluster_angle": (">=", self.cluster_angle_min_deg),
            "projection": ("<", self.projection_max),
            "cross_residual": ("<", self.cross_reduction_max),
            "pc1_ablation": (">=", self.pc1_differential_min),
            "cross_pca": ("<", self.cross_variance_max),
        }[test]


def _cluster_angle(U: np.ndarray, a: list[int], b: list[int]) -> dict:
    ma, mb = U[np.asarray(a)].mean(axis=0), U[np.asarray(b)].mean(axis=0)
    na, nb = float(np.linalg.norm(ma)), float(np.linalg.norm(mb))
    if na <= 1e-6 or nb <= 1e-6:
        return {"statistic": None, "reason": "a cluster mean is zero"}
    cos = float(np.clip(float(ma @ mb) / (na * nb), -1.0, 1.0))
    return {"statistic": float(np.degrees(np.arccos(cos))), "cosine": cos}


def _projection(U: np.ndarray, a: list[int], b: list[int], names: Sequence[str]) -> dict:
    pa = projection_norms(U[np.asarray(a)], U[np.asarray(b)])
    pb = projection_norms(U[np.asarray(b)], U[np.asarray(a)])
    return {
        "statistic": float(max(pa.mean(), pb.mean())),
        "a_on_b": {names[i]: float(p) for i, p in zip(a, pa, strict=True)},
        "b_on_a": {names[i]: float(p) for i, p in zip(b, pb, strict=True)},
        "shared_variance_a_on_b": float(np.mean(pa**2)),
        "shared_variance_b_on_a": float(np.mean(pb**2)),
    }


def _cross_residual(U: np.ndarray, a: list[int], b: list[int], names: Sequence[str]) -> dict:
    triplets = [(*p, q) for p in itertools.combinations(a, 2) for q in b]
    triplets += [(*p, q) for p in itertools.combinations(b, 2) for q in a]
    per = {}
    for t in triplets:
        try:
            r = residual_analysis(U[np.asarray(t)], [names[i] for i in t])["reduction_percent"]
        except ValueError:
            r = None
        if r is not None:
            per["-".join(names[i] for i in t)] = r
    if not per:
        return {"statistic": None, "reason": "needs a cluster with two vectors"}
    return {"statistic": float(np.mean(list(per.values()))), "triplets": per}


def _pc1_ablation(U: np.ndarray, clusters: dict[str, list[int]], names: Sequence[str]) -> dict:
    multi = {c: idx for c, idx in clusters.items() if len(idx) >= 2}
    if len(multi) < 2 or U.shape[0] < 3:
        return {"statistic": None, "reason": "needs two clusters with two or more vectors"}
    comps, _, _ = principal_components(U)
    before = cosine_matrix(U)
    after = cosines_allow_zero(remove_direction(U, comps[0]))
    pairs, per_cluster = {}, {}
    for c, idx in multi.items():
        deltas = []
        for i, j in itertools.combinations(idx, 2):
            d = float(after[i, j] - before[i, j])
            pairs[f"{names[i]}-{names[j]}"] = {
                "before": float(before[i, j]),
                "after": float(after[i, j]),
                "change": d,
            }
            deltas.append(d)
        per_cluster[c] = float(np.mean(deltas))
    mags = np.abs(list(per_cluster.values()))
    return {
        "statistic": float(mags.max() - mags.min()),
        "cluster_mean_change": per_cluster,
        "pairs": pairs,
    }


def _explained_in(Ua: np.ndarray, Ub: np.ndarray) -> float:
    comps, _, _ = principal_components(Ua)
    Xb = Ub - Ub.mean(axis=0, keepdims=True)
    total = float(np.sum(Xb**2))
    return float(np.sum((Xb @ np.asarray(comps[0], dtype=Xb.dtype)) ** 2)) / total


def _cross_pca(U: np.ndarray, a: list[int], b: list[int]) -> dict:
    Ua, Ub = U[np.asarray(a)], U[np.asarray(b)]
    try:
        ab, ba = _explained_in(Ua, Ub), _explained_in(Ub, Ua)
    except (ValueError, ZeroDivisionError):
        return {"statistic": None, "reason": "needs two distinct vectors in each cluster"}
    return {"statistic": float(max(ab, ba)), "a_pc1_in_b": ab, "b_pc1_in_a": ba}


def independence_statistics(
    U: np.ndarray, names: Sequence[str], clusters: dict[str, list[int]], a: str, b: str
) -> dict[str, dict]:
    """The five tests for clusters `a` and `b` (names in `clusters`, a dict cluster -> row
    indices of the unit rows `U` `[n, D]`); test 4 uses every cluster. test -> details."""
    U = unit_rows(U, names)
    ia, ib = clusters[a], clusters[b]
    return {
        "cluster_angle": _cluster_angle(U, ia, ib),
        "projection": _projection(U, ia, ib, names),
        "cross_residual": _cross_residual(U, ia, ib, names),
        "pc1_ablation": _pc1_ablation(U, clusters, names),
        "cross_pca": _cross_pca(U, ia, ib),
    }


def random_rotation_of_rows(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows `X` `[m, D]` under a Haar-random rotation of R^D, drawn cheaply: the rows' coordinates
    in an orthonormal basis of their span `[m, r]` are mapped to a Haar-random r-frame."""
    X = np.asarray(X, dtype=np.float64)
    P, S, _ = np.linalg.svd(X, full_matrices=False)
    r = int(np.sum(S > 1e-6 * S[0]))
    Q, R = np.linalg.qr(rng.standard_normal((X.shape[1], r)))
    Q = Q * np.sign(np.diag(R))
    return (P[:, :r] * S[:r]) @ Q.T


def independence_null(
    U: np.ndarray,
    names: Sequence[str],
    clusters: dict[str, list[int]],
    a: str,
    b: str,
    n: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Null of "independent clusters": cluster `b` is rotated by a Haar-random rotation relative
    to all other vectors (its internal geometry kept), and the statistics recomputed `n` times.
    Returns test -> `[n]` statistics (NaN where undefined)."""
    U = np.asarray(unit_rows(U, names), dtype=np.float64)
    out = {t: np.full(n, np.nan) for t in TESTS}
    rows = clusters[b]
    for k in range(n):
        Ur = U.copy()
        Ur[rows] = random_rotation_of_rows(U[rows], rng)
        stats = independence_statistics(Ur, names, clusters, a, b)
        for t in TESTS:
            if stats[t]["statistic"] is not None:
                out[t][k] = stats[t]["statistic"]
    return out


def decide(
    test: str, statistic: float | None, ci: Sequence[float] | None, thresholds: Thresholds
) -> str:
    """ "independent" / "shared" / "inconclusive" / "not_applicable" for one test.

    The point estimate picks a side of the threshold; with a 95% interval, the decision stands
    only if the whole interval is on that side, else "inconclusive".
    """
    if statistic is None:
        return "not_applicable"
    op, thr = thresholds.rule(test)

    def indep(x: float) -> bool:
        return x >= thr if op == ">=" else x < thr

    side = indep(statistic)
    if ci is not None and (indep(ci[0]) != side or indep(ci[1]) != side):
        return "inconclusive"
    return "independent" if side else "shared"


def p_shared_side(test: str, statistic: float, null: np.ndarray, thresholds: Thresholds) -> float:
    """Fraction (add-one) of null statistics at least as far toward "shared" as `statistic`.

    Small values: more overlap than independent clusters of the same internal geometry give."""
    null = null[np.isfinite(null)]
    op, _ = thresholds.rule(test)
    more_shared = null <= statistic if op == ">=" else null >= statistic
    return float((1 + np.sum(more_shared)) / (1 + null.size))


def null_side(test: str, statistic: float, null: np.ndarray, thresholds: Thresholds) -> str:
    """Where the statistic sits against the independent-clusters null: "shared" (beyond it
    toward overlap, p < alpha), "independent" (beyond it the other way, e.g. an obtuse cluster
    angle: anti-aligned rather than unrelated) or "within"."""
    if p_shared_side(test, statistic, null, thresholds) < thresholds.alpha:
        return "shared"
    null = null[np.isfinite(null)]
    op, _ = thresholds.rule(test)
    other = null >= statistic if op == ">=" else null <= statistic
    if (1 + np.sum(other)) / (1 + null.size) < thresholds.alpha:
        return "independent"
    return "within"


def verdict(tests: dict[str, dict]) -> str:
    """The summary, one criterion per sentence: first the thresholds of Hunter (2025) (only
    decisions whose 95% interval stays on one side count), then the inconclusive tests, then
    where each statistic sits against the independent-random-clusters null (a separate
    criterion: a test can pass its threshold and still show more overlap than chance)."""
    applicable = [t for t in TESTS if tests[t]["decision"] != "not_applicable"]
    passed = [t for t in applicable if tests[t]["decision"] == "independent"]
    against = [t for t in applicable if tests[t]["decision"] == "shared"]
    inconclusive = [t for t in applicable if tests[t]["decision"] == "inconclusive"]
    text = f"{len(passed)}/{len(applicable)} tests support independent mechanisms by the "
    text += "thresholds of Hunter (2025)" + (f": {', '.join(passed)}." if passed else ".")
    if against:
        text += f" {len(against)} point to a shared mechanism by them: {', '.join(against)}."
    if inconclusive:
        text += (
            f" {len(inconclusive)} inconclusive (the 95% interval crosses the threshold): "
            f"{', '.join(inconclusive)}."
        )
    shared = [t for t in applicable if tests[t].get("null_side") == "shared"]
    beyond = [t for t in applicable if tests[t].get("null_side") == "independent"]
    if shared:
        text += (
            " Against independent random clusters, more overlap than chance in: "
            f"{', '.join(shared)}."
        )
    if beyond:
        text += (
            " Against independent random clusters, further apart than chance in: "
            f"{', '.join(beyond)}."
        )
    if not shared and not beyond:
        text += " Against independent random clusters, every statistic is within chance."
    return text
