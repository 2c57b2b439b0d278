"""`analyze`: every geometry analysis of a set of named directions, each number beside its null
and (when directions come from examples) a bootstrap interval. Returns a JSON-able dict.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from emgeo_jax.geometry import clustering, independence, null, similarity, subspace
from emgeo_jax.geometry.independence import TESTS, Thresholds
from emgeo_jax.vectors.directions import pca

# Parts of the result whose structure (signs, merge order) can change between bootstrap
# replicates; their intervals would be meaningless, so they get none.
_NO_CI = ("mds", "clustering")


def _index_groups(groups: dict[str, Sequence[str]] | None, names: list[str], what: str) -> dict:
    if not groups:
        return {}
    out, seen = {}, set()
    for g, members in groups.items():
        idx = []
        for m in members:
            if m not in names:
                raise ValueError(f"{what} '{g}': unknown vector '{m}' (have {names})")
            if m in seen:
                raise ValueError(f"{what} '{g}': vector '{m}' is in two {what}s")
            seen.add(m)
            idx.append(names.index(m))
        if not idx:
            raise ValueError(f"{what} '{g}' is empty")
        out[g] = idx
    return out


def _set_comparisons(C: np.ndarray, sets: dict[str, list[int]]) -> dict[str, float]:
    out = {}
    for s, idx in sets.items():
        if len(idx) >= 2:
            out[f"within:{s}"] = similarity.set_mean_cosine(C, idx)
    for (s, a), (t, b) in itertools.combinations(sets.items(), 2):
        out[f"between:{s}|{t}"] = similarity.set_mean_cosine(C, a, b)
    return out


def _reference_pair(C: np.ndarray, names: list[str], pair: Sequence[str] | None) -> list[int]:
    if pair is not None:
        for p in pair:
            if p not in names:
                raise ValueError(f"reference pair: unknown vector '{p}' (have {names})")
        return [names.index(p) for p in pair]
    iu = np.triu_indices(len(names), k=1)
    k = int(np.argmax(C[iu]))
    return [int(iu[0][k]), int(iu[1][k])]


def _point(
    V: np.ndarray,
    names: list[str],
    clusters: dict[str, list[int]],
    sets: dict[str, list[int]],
    ref: list[int],
    thresholds: Thresholds,
) -> dict[str, Any]:
    """Every point estimate on stacked vectors `V` `[n, D]` (no nulls, no intervals)."""
    C = similarity.cosine_matrix(V, names)
    out: dict[str, Any] = {
        "cosine": C.tolist(),
        "sets": _set_comparisons(C, sets),
        "subspace": subspace.subspace_reconstruction(V),
        "projection": {
            n: float(p) for n, p in zip(names, subspace.projection_norms(V, V[ref]), strict=True)
        },
        "independence": {
            f"{a}|{b}": independence.independence_statistics(V, names, clusters, a, b)
            for a, b in itertools.combinations(clusters, 2)
        },
    }
    if len(names) >= 3:
        out["triangles"] = subspace.triangle_consistency(V, names, thresholds.non_planar_deg)
        out["residual"] = subspace.residual_analysis(V, names)
    if len(names) >= 2 and np.ptp(C) > 0:
        out["pca"] = subspace.pca_structure(V, names)
    out["clustering"] = clustering.hierarchical(C, names)
    coords, eig = clustering.classical_mds(C)
    out["mds"] = {
        "coords": {n: coords[i].tolist() for i, n in enumerate(names)},
        "eig": eig.tolist(),
    }
    return out


def _leaves_ci(point: Any, reps: list[Any]) -> Any:
    """Basic bootstrap 95% intervals leaf by leaf, for a point tree and replicates of it."""
    if isinstance(point, dict):
        return {
            k: _leaves_ci(v, [r.get(k) for r in reps])
            for k, v in point.items()
            if k not in _NO_CI and not isinstance(v, (str, bool))
        }
    if isinstance(point, list) and point and not isinstance(point[0], (str, bool)):
        if all(isinstance(r, list) and len(r) == len(point) for r in reps):
            return [_leaves_ci(p, [r[i] for r in reps]) for i, p in enumerate(point)]
        return None
    if isinstance(point, (int, float)):
        vals = np.array([np.nan if r is None else float(r) for r in reps])
        finite = vals[np.isfinite(vals)]
        if finite.size < 2 or np.ptp(finite) == 0.0:  # undefined, or untouched by resampling
            return None
        return list(null.bootstrap_ci(finite, float(point)))
    return None


def _clip_intervals(node: Any, lo: float, hi: float) -> Any:
    """Every `[a, b]` interval in a tree of dicts/lists (None kept) clipped to `[lo, hi]`."""
    if isinstance(node, dict):
        return {k: _clip_intervals(v, lo, hi) for k, v in node.items()}
    if isinstance(node, list):
        if len(node) == 2 and all(isinstance(x, (int, float)) for x in node):
            return [min(max(float(x), lo), hi) for x in node]
        return [_clip_intervals(x, lo, hi) for x in node]
    return node


def _weighted_examples(
    examples: dict[str, tuple[np.ndarray, ...]], weighting: str
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """name -> (pooled `[N, D]` float64, labels `[N]`, tokens `[N]` float64 for token
    weighting or None for example weighting); errors name the example set."""
    if weighting not in ("token", "example"):
        raise ValueError(f"weighting={weighting!r}: use 'token' or 'example'")
    out = {}
    for k, item in examples.items():
        if len(item) not in (2, 3):
            raise ValueError(f"examples '{k}': give (pooled, labels) or (pooled, labels, tokens)")
        p, lab = np.asarray(item[0], np.float64), np.asarray(item[1])
        tokens = item[2] if len(item) == 3 else None
        w = None
        if weighting == "token":
            if tokens is None:
                raise ValueError(
                    f"examples '{k}': token weighting needs the tokens pooled per example "
                    "(`tokens` [N], written by `emgeo extract --per_example`); pass them or "
                    "use example weighting"
                )
            w = np.asarray(tokens, np.float64)
            if w.shape != lab.shape or not (w >= 0).all():
                raise ValueError(
                    f"examples '{k}': tokens must be [N] = {lab.shape} non-negative counts, "
                    f"got shape {w.shape}"
                )
            for c in (0, 1):
                if w[lab == c].sum() <= 0:
                    raise ValueError(f"examples '{k}': class {c} has no pooled tokens")
        out[k] = (p, lab, w)
    return out


def _built_directions(
    made: dict[str, tuple[str, np.ndarray, np.ndarray, np.ndarray | None]],
    members: Sequence[str],
    idx: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The directions `members` (of one resampling group, `made[name] = (method, pooled,
    labels, tokens)`) built from examples `idx` (None: all, in order) -> name: `[D]` float64.

    "mean_diff": `null.mean_diff` with the examples' tokens (the weighting). "pca": the first
    principal component of the centred per-example rows (exact SVD, `vectors.directions.pca`,
    unit length), its sign towards the mean difference of the same examples; the members' PCAs
    run as one batched call."""
    out, pcs = {}, []
    for name in members:
        method, p, lab, w = made[name]
        if idx is not None:
            p, lab, w = p[idx], lab[idx], None if w is None else w[idx]
        md = null.mean_diff(p, lab, w)
        if method == "pca":
            pcs.append((name, p, md))
        else:
            out[name] = md
    if pcs:
        rows = np.stack([p for _, p, _ in pcs], axis=1)  # [N, k, D]
        comps, _ = pca(rows, np.stack([md for _, _, md in pcs]))
        out.update({name: comps[i, 0].astype(np.float64) for i, (name, _, _) in enumerate(pcs)})
    return out


def _resampling_groups(
    made: dict[str, tuple[str, np.ndarray, np.ndarray, np.ndarray | None]],
    same_examples: Sequence[Sequence[str]] | None,
) -> list[list[str]]:
    """The names of `made` partitioned into groups resampled together: each of
    `same_examples` (checked to hold the same examples: equal labels and tokens), then every
    other name alone; in the order of `made`."""
    groups, seen = [], set()
    for group in same_examples or ():
        group = list(group)
        for name in group:
            if name not in made:
                raise ValueError(
                    f"same_examples {group}: '{name}' is not a direction built from examples "
                    f"(those are {list(made)})"
                )
            if name in seen:
                raise ValueError(f"same_examples: '{name}' is in two groups")
            seen.add(name)
        _, _, lab0, w0 = made[group[0]]
        for name in group[1:]:
            _, _, lab, w = made[name]
            same_tokens = (w is None) == (w0 is None) and (w is None or np.array_equal(w, w0))
            if not (np.array_equal(lab, lab0) and same_tokens):
                raise ValueError(
                    f"same_examples {group}: '{name}' and '{group[0]}' are not the same "
                    "examples (their labels or token counts differ)"
                )
        groups.append(group)
    groups += [[name] for name in made if name not in seen]
    order = list(made)
    return sorted(groups, key=lambda g: min(map(order.index, g)))


def _triangle_error_stat(X: np.ndarray) -> float:
    A = similarity.angle_matrix(similarity.cosine_matrix(X))
    return subspace.triangle_error(A[0, 1], A[0, 2], A[1, 2])[2]


def _pc1_share(X: np.ndarray) -> float:
    return float(subspace.principal_components(similarity.unit_rows(X))[2][0])


def _residual_stat(X: np.ndarray) -> float:
    r = subspace.residual_analysis(X, [str(i) for i in range(len(X))])["reduction_percent"]
    return np.nan if r is None else r


def analyze(
    vectors: dict[str, np.ndarray],
    clusters: dict[str, Sequence[str]] | None = None,
    *,
    sets: dict[str, Sequence[str]] | None = None,
    examples: dict[str, tuple[np.ndarray, ...]] | None = None,
    pca_examples: dict[str, tuple[np.ndarray, ...]] | None = None,
    same_examples: Sequence[Sequence[str]] | None = None,
    weighting: str = "token",
    stacks: dict[str, np.ndarray] | None = None,
    trace_reference: str | None = None,
    reference_pair: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    n_null: int = 500,
    n_boot: int = 200,
    n_perm: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """All geometry of named directions, as a JSON-able dict.

    vectors: name -> `[D]` direction (any scale; a zero vector is an error).
    clusters: cluster -> member names, for the independence tests (every pair of clusters)
        and a cluster-label permutation test. sets: set -> names for seed 000's within/between
        mean cosines (default: the clusters).
    examples: name -> (pooled `[N, D]` per-example means, labels `[N]`, 1 = misaligned[,
        tokens `[N]` pooled tokens per example]): the direction `name` is the mean difference
        of these examples; examples are resampled (stratified, `n_boot` times) to give
        basic-bootstrap 95% intervals of every statistic, permuted for label nulls and split in
        halves for reliability, the direction being rebuilt with `weighting` each time. A name
        may be in only one of `vectors`, `examples` and `pca_examples`.
    pca_examples: name -> the same kind of tuple: the direction `name` is the first principal
        component of the centred rows (unit length, exact SVD, sign towards the rows'
        mean difference under `weighting`), as `emgeo_jax.vectors.directions.pca` and the
        demo build it; rebuilt in every bootstrap replicate (no label permutations or split
        halves: it does not depend on the labels beyond its sign).
    same_examples: groups of names (of `examples` and `pca_examples`) built from the same
        examples in the same order, e.g. one extraction's rows at several layers, or its
        mean-diff and PCA: a bootstrap replicate draws one resample per group and rebuilds
        all of its directions from it, so statistics between them (a cosine across layers)
        vary as one sample would. Every other name is resampled on its own.
    weighting: "token" (default, as the reference code and `emgeo vectors`: class mean = sum
        over all pooled tokens / token count, which needs `tokens`) or "example" (mean of
        per-example means). Recorded in `inputs.weighting`.
    stacks: name -> `[L, D]` (row l = output of block l) for layer traces: cosine per layer to
        `trace_reference` (default: the first stack).
    reference_pair: two names spanning the plane for projection magnitudes (default: the
        most similar pair).
    thresholds: decision thresholds (default: seed 001's, see `Thresholds`).
    Nulls use `n_null` Monte Carlo draws; everything is seeded by `seed`.
    """
    thresholds = thresholds or Thresholds()
    examples, pca_examples = examples or {}, pca_examples or {}
    for a, b, what in (
        (vectors, examples, "as vectors and as examples"),
        (vectors, pca_examples, "as vectors and as pca_examples"),
        (examples, pca_examples, "as examples and as pca_examples"),
    ):
        clash = set(a) & set(b)
        if clash:
            raise ValueError(f"vectors {sorted(clash)} given both {what}")
    ex = _weighted_examples(examples, weighting)
    made = {k: ("mean_diff", *v) for k, v in ex.items()}
    made.update({k: ("pca", *v) for k, v in _weighted_examples(pca_examples, weighting).items()})
    groups = _resampling_groups(made, same_examples)
    all_vecs = {k: np.asarray(v, np.float64) for k, v in vectors.items()}
    built = {k: v for g in groups for k, v in _built_directions(made, g).items()}
    all_vecs.update({k: built[k] for k in made})
    names = list(all_vecs)
    if len(names) < 2:
        raise ValueError("geometry needs at least two vectors")
    shapes = {k: v.shape for k, v in all_vecs.items()}
    if any(len(s) != 1 for s in shapes.values()) or len({s[0] for s in shapes.values()}) != 1:
        raise ValueError(f"all vectors must be [D] with the same D; got {shapes}")
    V = np.stack([all_vecs[n] for n in names])
    d = V.shape[1]
    norms = np.linalg.norm(V, axis=1)
    similarity.unit_rows(V, names)  # zero-vector check with the vector's name
    rng = np.random.default_rng(seed)

    cl = _index_groups(clusters, names, "cluster")
    st = _index_groups(sets, names, "set") if sets else cl
    C = similarity.cosine_matrix(V, names)
    ref = _reference_pair(C, names, reference_pair)
    point = _point(V, names, cl, st, ref, thresholds)

    # Bootstrap over examples: rebuild example-made directions, recompute everything. One
    # resample per group (`same_examples`), each example keeping its tokens.
    ci = None
    if made and n_boot > 0:
        reps = []
        for _ in range(n_boot):
            Vb = V.copy()
            for group in groups:
                idx = null.stratified_resample(made[group[0]][2], rng)
                for k, v in _built_directions(made, group, idx).items():
                    Vb[names.index(k)] = v
            reps.append(_point(Vb, names, cl, st, ref, thresholds))
        ci = _leaves_ci(point, reps)

    def ci_at(*path: Any, bounds: tuple[float, float] | None = None) -> Any:
        """The interval tree at `path`, each interval clipped to `bounds` (the statistic's
        range: a basic interval 2t - q can step past it, e.g. a cosine above 1)."""
        node = ci
        for p in path:
            if node is None:
                return None
            node = node.get(p) if isinstance(node, dict) else node[p]
        return node if bounds is None else _clip_intervals(node, *bounds)

    res: dict[str, Any] = {
        "inputs": {
            "names": names,
            "d": d,
            "norms": dict(zip(names, norms.tolist(), strict=True)),
            "clusters": {g: [names[i] for i in idx] for g, idx in cl.items()},
            "sets": {g: [names[i] for i in idx] for g, idx in st.items()},
            "weighting": weighting if made else None,
            "from_examples": {
                k: {
                    "method": method,
                    "n": int(len(lab)),
                    "n_misaligned": int(lab.sum()),
                    "weighting": weighting,
                    **({} if w is None else {"tokens": [float(w[lab == c].sum()) for c in (0, 1)]}),
                    "resampled_with": next([m for m in g if m != k] for g in groups if k in g),
                }
                for k, (method, _, lab, w) in made.items()
            },
            "seed": seed,
            "n_null": n_null,
            "n_boot": n_boot if made else 0,
            "thresholds": thresholds.__dict__,
        }
    }

    # Cosines: exact isotropic null, Monte Carlo of norm-matched random directions.
    mc = null.monte_carlo(
        lambda X: similarity.cosine_matrix(X)[np.triu_indices(len(X), 1)], norms, d, n_null, rng
    )
    res["cosine"] = {
        "matrix": point["cosine"],
        "angle_deg": similarity.angle_matrix(C).tolist(),
        "p_value_isotropic": null.cosine_p_value(C, d).tolist(),
        "ci95": ci_at("cosine", bounds=(-1.0, 1.0)),
        "null": {**null.cosine_null_summary(d), "mc_std": float(mc.std()), "mc_n": int(mc.size)},
    }

    # Seed 000 set comparisons with a Monte Carlo null of the same set sizes.
    if point["sets"]:
        set_null = null.monte_carlo(
            lambda X: np.array(list(_set_comparisons(similarity.cosine_matrix(X), st).values())),
            norms,
            d,
            n_null,
            rng,
        )
        res["sets"] = {
            k: {
                "mean_cosine": v,
                "ci95": ci_at("sets", k, bounds=(-1.0, 1.0)),
                "null": null.null_summary(v, set_null[:, j]),
            }
            for j, (k, v) in enumerate(point["sets"].items())
        }

    sub = point["subspace"]
    res["subspace"] = {**sub, "ci95": ci_at("subspace")}

    if "triangles" in point:
        tri_null = null.monte_carlo(_triangle_error_stat, np.ones(3), d, n_null, rng)
        summary = null.null_summary(0.0, tri_null)
        summary.pop("p_value")
        res["triangles"] = {
            "triplets": point["triangles"],
            "ci95": ci_at("triangles"),
            "null_error_deg": summary,
            "note": "random directions are non-planar too: compare errors with the null",
        }

    if "pca" in point:
        pc1 = point["pca"]["variance_explained"][0]
        pca_null = null.monte_carlo(_pc1_share, norms, d, n_null, rng)
        res["pca"] = {
            **point["pca"],
            "ci95": ci_at("pca"),
            "null_pc1_share": null.null_summary(pc1, pca_null),
        }

    k_ref = max(1, int(np.linalg.matrix_rank(V[ref] / norms[ref, None], tol=1e-5)))
    proj = point["projection"]
    res["projection"] = {
        "reference": [names[i] for i in ref],
        "norms": proj,
        "strong": [n for n, p in proj.items() if p > thresholds.strong_projection],
        "ci95": ci_at("projection", bounds=(0.0, 1.0)),
    }
    if k_ref < d:
        pn = null.projection_null(k_ref, d)
        res["projection"]["null"] = {
            "k": k_ref,
            "mean_norm_sq": k_ref / d,
            "q975_norm": float(math.sqrt(pn.ppf(0.975))),
            "p_value": {n: float(pn.sf(p**2)) for n, p in proj.items()},
        }

    if "residual" in point:
        red = point["residual"]["reduction_percent"]
        res["residual"] = {**point["residual"], "ci95": ci_at("residual")}
        if red is not None:
            rnull = null.monte_carlo(_residual_stat, norms, d, n_null, rng)
            res["residual"]["null"] = null.null_summary(red, rnull)

    res["independence"] = {}
    for a, b in itertools.combinations(cl, 2):
        key = f"{a}|{b}"
        stats = point["independence"][key]
        nulls = independence.independence_null(V, names, cl, a, b, n_null, rng)
        tests = {}
        for t in TESTS:
            s = stats[t]["statistic"]
            interval = ci_at("independence", key, t, "statistic")
            rec = {
                **stats[t],
                "ci95": interval,
                "threshold": list(thresholds.rule(t)),
                "decision": independence.decide(t, s, interval, thresholds),
            }
            if s is not None and np.isfinite(nulls[t]).sum() >= 2:
                p = independence.p_shared_side(t, s, nulls[t], thresholds)
                summary = null.null_summary(s, nulls[t])
                summary.pop("p_value")
                rec["null"] = {**summary, "p_shared_side": p}
                rec["null_side"] = independence.null_side(t, s, nulls[t], thresholds)
            tests[t] = rec
        res["independence"][key] = {"tests": tests, "verdict": independence.verdict(tests)}

    res["clustering"] = point["clustering"]
    res["mds"] = point["mds"]

    if cl and len(cl) >= 2:
        member = np.full(len(names), -1)
        for g, idx in enumerate(cl.values()):
            member[idx] = g
        used = np.flatnonzero(member >= 0)
        Cu = C[np.ix_(used, used)]
        iu = np.triu_indices(len(used), 1)

        def within_minus_between(lab: np.ndarray) -> float:
            same = (lab[:, None] == lab[None, :])[iu]
            if same.all() or not same.any():
                return np.nan
            return float(Cu[iu][same].mean() - Cu[iu][~same].mean())

        res["cluster_permutation"] = null.permutation_test(
            within_minus_between, member[used], n_perm, rng
        )

    if ex:
        res["examples"] = {}
        for k, (p, lab, w) in ex.items():
            i = names.index(k)
            others = [j for j in range(len(names)) if j != i]

            def abs_cos_to_others(labels: np.ndarray, p=p, w=w, others=others) -> np.ndarray:
                v = null.mean_diff(p, labels, w)  # labels permuted; tokens stay with examples
                return np.abs(similarity.cosine_matrix(np.vstack([v[None], V[others]]))[0, 1:])

            observed = abs_cos_to_others(lab)
            perm = np.stack([abs_cos_to_others(rng.permutation(lab)) for _ in range(n_perm)])
            res["examples"][k] = {
                "label_permutation_abs_cosine": {
                    names[j]: {
                        "observed": float(observed[m]),
                        "null_q95": float(np.quantile(perm[:, m], 0.95)),
                        "p_value": float((1 + np.sum(perm[:, m] >= observed[m])) / (1 + n_perm)),
                    }
                    for m, j in enumerate(others)
                },
                "norm_permutation": null.permutation_test(
                    lambda labels, p=p, w=w: float(np.linalg.norm(null.mean_diff(p, labels, w))),
                    lab,
                    n_perm,
                    rng,
                ),
                "split_half": null.split_half_reliability(p, lab, min(n_perm, 200), rng, w),
            }

    if stacks:
        res["traces"] = layer_traces(stacks, trace_reference)
    return _jsonable(res)


def layer_traces(stacks: dict[str, np.ndarray], reference: str | None = None) -> dict[str, Any]:
    """Cosine per layer of each `[L, D]` stack to the reference stack (seed 001 Figure 3B), with
    the isotropic null's 95% band in dimension D."""
    names = list(stacks)
    ref = reference if reference is not None else names[0]
    if ref not in stacks:
        raise ValueError(f"trace reference '{ref}' is not among the stacks {names}")
    d = np.asarray(stacks[ref]).shape[-1]
    return {
        "reference": ref,
        "cosine": {
            n: similarity.layer_trace(s, stacks[ref]).tolist()
            for n, s in stacks.items()
            if n != ref
        },
        "null": null.cosine_null_summary(d),
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x
