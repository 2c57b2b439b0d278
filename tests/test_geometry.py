"""Geometry methods against independent numpy computations on vectors of known geometry."""

import itertools

import numpy as np
import pytest

from emgeo_jax.geometry import analyze, independence, similarity, subspace
from emgeo_jax.geometry.clustering import classical_mds, hierarchical

RNG = np.random.default_rng(1234)

# Seed 001's published cosines: medical, medical_replication, profanity, malicious.
SEED_NAMES = ["med", "med2", "prof", "mal"]
SEED_GRAM = np.array(
    [
        [1.0, 0.853, -0.235, -0.081],
        [0.853, 1.0, -0.209, -0.131],
        [-0.235, -0.209, 1.0, 0.412],
        [-0.081, -0.131, 0.412, 1.0],
    ]
)


def from_gram(G: np.ndarray, d: int, rng=RNG) -> np.ndarray:
    """Vectors `[n, d]` whose Gram matrix is G, placed in a random orthonormal frame of R^d."""
    L = np.linalg.cholesky(G)
    Q, _ = np.linalg.qr(rng.standard_normal((d, G.shape[0])))
    return L @ Q.T


def random_rotation(d: int, rng=RNG) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((d, d)))
    return Q * np.sign(np.diag(R))


def np_cos(V):
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    return U @ U.T


# ---------------------------------------------------------------- pairwise


def test_cosine_angle_and_sets_match_numpy():
    V = RNG.standard_normal((5, 16)) * RNG.uniform(0.1, 10, (5, 1))
    C = similarity.cosine_matrix(V)
    np.testing.assert_allclose(C, np_cos(V), atol=1e-12)
    np.testing.assert_allclose(
        similarity.angle_matrix(C)[0, 1], np.degrees(np.arccos(np_cos(V)[0, 1])), atol=1e-9
    )
    ref = np.mean([np_cos(V)[i, j] for i, j in itertools.combinations([0, 2, 3], 2)])
    assert similarity.set_mean_cosine(C, [0, 2, 3]) == pytest.approx(ref)
    ref_b = np.mean([np_cos(V)[i, j] for i in (0, 1) for j in (2, 3, 4)])
    assert similarity.set_mean_cosine(C, [0, 1], [2, 3, 4]) == pytest.approx(ref_b)
    with pytest.raises(ValueError, match="disjoint"):
        similarity.set_mean_cosine(C, [0, 1], [1, 2])


def test_zero_vector_is_a_clear_error():
    V = np.stack([np.ones(4), np.zeros(4), -np.ones(4)])
    with pytest.raises(ValueError, match="'b' has zero"):
        similarity.cosine_matrix(V, ["a", "b", "c"])
    with pytest.raises(ValueError, match="'z' has zero"):
        analyze({"a": np.ones(4), "z": np.zeros(4)}, n_null=5)


def test_layer_trace_matches_numpy():
    S, R = RNG.standard_normal((6, 10)), RNG.standard_normal((6, 10))
    want = np.sum(S * R, 1) / np.linalg.norm(S, axis=1) / np.linalg.norm(R, axis=1)
    np.testing.assert_allclose(similarity.layer_trace(S, R), want, atol=1e-12)
    np.testing.assert_allclose(similarity.layer_trace(S, R[0]), np_cos(np.vstack([R[0], S]))[0, 1:])


# ---------------------------------------------------------------- method 1: subspace


@pytest.mark.parametrize("n,d", [(5, 32), (6, 3)])  # second case: d smaller than n
def test_subspace_reconstruction_matches_numpy(n, d):
    V = RNG.standard_normal((n, d)) * RNG.uniform(0.5, 3, (n, 1))
    res = subspace.subspace_reconstruction(V)
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    P, s, Qt = np.linalg.svd(U, full_matrices=False)
    np.testing.assert_allclose(res["singular_values"], s, atol=1e-10)
    assert res["rank"] == min(n, d)
    C = np_cos(V)
    iu = np.triu_indices(n, 1)
    for rec in res["reconstruction"]:
        k = rec["rank"]
        Xk = P[:, :k] @ np.diag(s[:k]) @ Qt[:k]
        want = np.corrcoef(np_cos(Xk)[iu], C[iu])[0, 1]
        assert rec["pearson_r"] == pytest.approx(want, abs=1e-9)
    assert [r["rank"] for r in res["reconstruction"]] == list(range(1, min(n, d)))


def test_subspace_low_rank_and_orthogonal_sets():
    # Four vectors in a 2-D subspace: rank 2, rank-1 reconstruction imperfect, energy sums to 1.
    basis = np.linalg.qr(RNG.standard_normal((20, 2)))[0].T
    V = RNG.standard_normal((4, 2)) @ basis
    res = subspace.subspace_reconstruction(V)
    assert res["rank"] == 2 and sum(res["energy_fraction"]) == pytest.approx(1.0)
    # Orthonormal set: all off-diagonal cosines 0, Pearson r undefined -> None.
    res = subspace.subspace_reconstruction(np.eye(4, 9))
    np.testing.assert_allclose(res["singular_values"], 1.0)
    assert all(r["pearson_r"] is None for r in res["reconstruction"])
    # Two vectors: one pair, Pearson undefined.
    assert subspace.pearson_offdiag(np.eye(2), np.eye(2)) is None


# ---------------------------------------------------------------- method 2: triangles


def planar(angles_deg, d=12):
    frame = np.linalg.qr(RNG.standard_normal((d, 2)))[0].T
    t = np.radians(angles_deg)
    return np.stack([np.cos(t), np.sin(t)], 1) @ frame


@pytest.mark.parametrize("angles", [[0, 50, 130], [0, 120, 240], [10, 10, 95], [0, 30, 200]])
def test_planar_triplets_have_zero_error(angles):
    tri = subspace.triangle_consistency(planar(angles), ["a", "b", "c"])
    assert len(tri) == 1
    assert tri[0]["error_deg"] == pytest.approx(0.0, abs=1e-4)
    assert not tri[0]["non_planar"]


def test_triangle_nonplanar_pivot_free_and_seed_example():
    tri = subspace.triangle_consistency(np.eye(3, 7), ["a", "b", "c"])[0]
    assert tri["error_deg"] == pytest.approx(90.0) and tri["non_planar"]
    # Seed 001: finance-sports 41.8, finance-medical 84.2, sports-medical 76.4 -> 42.4/126.0, 33.9
    pred_diff, pred_sum, err = subspace.triangle_error(41.8, 84.2, 76.4)
    assert (pred_diff, pred_sum) == pytest.approx((42.4, 126.0))
    assert err == pytest.approx(34.0, abs=0.1)
    # Any pivot gives the same error (min slack of the spherical triangle inequalities).
    V = RNG.standard_normal((3, 5))
    errs = [
        subspace.triangle_consistency(V[list(p)], list("abc"))[0]["error_deg"]
        for p in itertools.permutations(range(3))
    ]
    np.testing.assert_allclose(errs, errs[0], atol=1e-9)
    A = np.degrees(np.arccos(np.clip(np_cos(V), -1, 1)))
    a, b, c = A[0, 1], A[0, 2], A[1, 2]
    assert errs[0] == pytest.approx(min(b + c - a, a + c - b, a + b - c, 360 - a - b - c))
    # Colinear triplet (v, 2v, -v) is planar.
    v = RNG.standard_normal(6)
    assert subspace.triangle_consistency(np.stack([v, 2 * v, -v]), list("abc"))[0][
        "error_deg"
    ] == pytest.approx(0.0, abs=1e-4)


# ---------------------------------------------------------------- methods 3-5


def test_pca_matches_numpy_covariance():
    V = RNG.standard_normal((6, 40))
    res = subspace.pca_structure(V, list("abcdef"))
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    Uc = U - U.mean(0)
    w, E = np.linalg.eigh(Uc.T @ Uc)
    w, E = w[::-1][:5], E[:, ::-1][:, :5]
    np.testing.assert_allclose(res["variance_explained"], w / w.sum(), atol=1e-9)
    scores = np.array([res["loadings"][n] for n in "abcdef"])
    np.testing.assert_allclose(np.abs(scores), np.abs(Uc @ E), atol=1e-9)
    assert res["uniform_share"] == pytest.approx(1 / 6)


def test_projection_norms_match_least_squares():
    V, B = RNG.standard_normal((5, 30)), RNG.standard_normal((2, 30))
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    coef = np.linalg.lstsq(B.T, U.T, rcond=None)[0]
    want = np.linalg.norm(B.T @ coef, axis=0)
    np.testing.assert_allclose(subspace.projection_norms(V, B), want, atol=1e-10)
    # A colinear basis spans a line.
    line = np.stack([B[0], -3 * B[0]])
    np.testing.assert_allclose(
        subspace.projection_norms(V, line), np.abs(np_cos(np.vstack([B[0], V]))[0, 1:]), atol=1e-10
    )


def test_residual_reproduces_seed_001_cross_cluster_triplet():
    # profanity, malicious, medical: 0.412, -0.235, -0.081 -> -0.157, -0.701, -0.594, -256.8%
    G = np.array([[1, 0.412, -0.235], [0.412, 1, -0.081], [-0.235, -0.081, 1]])
    res = subspace.residual_analysis(from_gram(G, 50), ["prof", "mal", "med"])
    after = np.array(res["cosine_after"])
    np.testing.assert_allclose(
        [after[0, 1], after[0, 2], after[1, 2]], [-0.157, -0.701, -0.594], atol=6e-4
    )
    assert res["reduction_percent"] == pytest.approx(-256.8, abs=0.5)
    # Independent numpy computation of the residual cosines.
    V = from_gram(G, 50)
    m = V.mean(0) / np.linalg.norm(V.mean(0))
    R = V - np.outer(V @ m, m)
    np.testing.assert_allclose(
        subspace.residual_analysis(V, list("abc"))["cosine_after"], np_cos(R), atol=1e-9
    )


def test_reduction_sign_convention():
    before = np.array([[1, 0.5], [0.5, 1]])
    assert subspace.reduction_percent(before, np.array([[1, 0.1], [0.1, 1]])) == pytest.approx(80)
    assert subspace.reduction_percent(before, np.array([[1, -1.0], [-1.0, 1]])) == pytest.approx(
        -100
    )


# ---------------------------------------------------------------- independence tests


def seed_clusters():
    V = from_gram(SEED_GRAM, 4096)
    return V, {"medical": [0, 1], "persona": [2, 3]}


def test_independence_statistics_on_seed_001_gram():
    V, cl = seed_clusters()
    st = independence.independence_statistics(V, SEED_NAMES, cl, "medical", "persona")
    # Test 2 as published: 0.236 and 5.6% / 5.5% shared variance.
    assert st["projection"]["a_on_b"]["med"] == pytest.approx(0.236, abs=1e-3)
    assert st["projection"]["b_on_a"]["prof"] == pytest.approx(0.236, abs=1e-3)
    assert st["projection"]["a_on_b"]["med"] ** 2 == pytest.approx(0.056, abs=1e-3)
    # Test 3 contains the published triplet.
    assert st["cross_residual"]["triplets"]["prof-mal-med"] == pytest.approx(-256.8, abs=0.5)
    # Test 1 against numpy.
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    ma, mb = U[:2].mean(0), U[2:].mean(0)
    want = np.degrees(np.arccos(ma @ mb / np.linalg.norm(ma) / np.linalg.norm(mb)))
    assert st["cluster_angle"]["statistic"] == pytest.approx(want, abs=1e-6)
    assert st["cluster_angle"]["statistic"] > 90  # obtuse, as in seed 001

    # Test 5 against numpy: centred PCA of one cluster, variance share in the other.
    def explained(A, B):
        Ac, Bc = A - A.mean(0), B - B.mean(0)
        p = np.linalg.svd(Ac, full_matrices=False)[2][0]
        return np.sum((Bc @ p) ** 2) / np.sum(Bc**2)

    assert st["cross_pca"]["a_pc1_in_b"] == pytest.approx(explained(U[:2], U[2:]), abs=1e-9)
    assert st["cross_pca"]["b_pc1_in_a"] == pytest.approx(explained(U[2:], U[:2]), abs=1e-9)


def test_pc1_ablation_matches_numpy():
    G = np.eye(6)
    for i, j, c in [(0, 1, 0.85), (2, 3, 0.75), (4, 5, 0.4), (0, 4, -0.2), (1, 5, -0.1)]:
        G[i, j] = G[j, i] = c
    V = from_gram(G, 64)
    cl = {"a": [0, 1], "b": [2, 3], "c": [4, 5]}
    st = independence.independence_statistics(V, list("uvwxyz"), cl, "a", "c")["pc1_ablation"]
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    p = np.linalg.svd(U - U.mean(0))[2][0]
    after = np_cos(U - np.outer(U @ p, p))
    deltas = {
        k: after[i, j] - G[i, j] for k, (i, j) in {"a": (0, 1), "b": (2, 3), "c": (4, 5)}.items()
    }
    for k, v in deltas.items():
        assert st["cluster_mean_change"][k] == pytest.approx(v, abs=1e-9)
    mags = np.abs(list(deltas.values()))
    assert st["statistic"] == pytest.approx(mags.max() - mags.min(), abs=1e-9)


def test_known_independent_and_shared_clusters():
    e = np.eye(64)
    A = np.stack([e[0] + 0.3 * e[1], e[0] - 0.3 * e[1]])
    B = np.stack([e[2] + 0.2 * e[3], e[2] - 0.4 * e[3]])
    names = ["a1", "a2", "b1", "b2"]
    cl = {"A": [0, 1], "B": [2, 3]}
    st = independence.independence_statistics(np.vstack([A, B]), names, cl, "A", "B")
    assert st["cluster_angle"]["statistic"] == pytest.approx(90.0)
    assert st["projection"]["statistic"] == pytest.approx(0.0, abs=1e-9)
    assert st["cross_pca"]["statistic"] == pytest.approx(0.0, abs=1e-9)
    th = independence.Thresholds()
    for t in ("cluster_angle", "projection", "cross_pca"):
        assert independence.decide(t, st[t]["statistic"], None, th) == "independent"
    # Cluster B nearly equal to A: shared.
    Bs = A + 0.05 * np.stack([e[5], e[6]])
    st = independence.independence_statistics(np.vstack([A, Bs]), names, cl, "A", "B")
    for t in ("cluster_angle", "projection"):
        assert independence.decide(t, st[t]["statistic"], None, th) == "shared"
    # An interval crossing the threshold makes the decision inconclusive.
    assert independence.decide("projection", 0.25, [0.2, 0.35], th) == "inconclusive"
    assert independence.decide("cross_pca", None, None, th) == "not_applicable"


def test_independence_null_is_random_rotation_of_one_cluster():
    V, cl = seed_clusters()
    V = V[:, :200] / np.linalg.norm(V[:, :200], axis=1, keepdims=True)  # a smaller d for speed
    rng = np.random.default_rng(0)
    nulls = independence.independence_null(V, SEED_NAMES, cl, "medical", "persona", 120, rng)
    d = V.shape[1]
    # Angle between a fixed and a random direction: mean 90, std ~ 57.3 / sqrt(d) degrees.
    assert np.mean(nulls["cluster_angle"]) == pytest.approx(90, abs=1.0)
    assert np.std(nulls["cluster_angle"]) == pytest.approx(np.degrees(1 / np.sqrt(d)), rel=0.2)
    r = independence.random_rotation_of_rows(V[2:], rng)
    np.testing.assert_allclose(r @ r.T, V[2:] @ V[2:].T, atol=1e-9)  # geometry kept


# ---------------------------------------------------------------- clustering and MDS


def test_hierarchical_and_mds_match_scipy_and_numpy():
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    V = from_gram(SEED_GRAM, 30)
    C = np_cos(V)
    h = hierarchical(C, SEED_NAMES)
    Z = linkage(pdist(V / np.linalg.norm(V, axis=1, keepdims=True), "cosine"), "average")
    np.testing.assert_allclose(np.array(h["linkage"])[:, 2], Z[:, 2], atol=1e-9)
    assert h["merges"][0]["height"] == pytest.approx(1 - 0.853)
    assert sorted(h["merges"][0]["left"] + h["merges"][0]["right"]) == ["med", "med2"]
    X, _ = classical_mds(C, dims=3)
    # Three MDS dims of four points reproduce the chord distances exactly.
    D = np.sqrt(2 - 2 * SEED_GRAM)
    np.testing.assert_allclose(np.linalg.norm(X[:, None] - X[None], axis=-1), D, atol=1e-6)


# ---------------------------------------------------------------- analyze: invariances, edges


def _points(r):
    ind = r["independence"]["medical|persona"]["tests"]
    return {
        "cos": np.array(r["cosine"]["matrix"]),
        "sv": np.array(r["subspace"]["singular_values"]),
        "tri": np.array([t["error_deg"] for t in r["triangles"]["triplets"]]),
        "pca": np.array(r["pca"]["variance_explained"]),
        "load": np.array(list(r["pca"]["loadings"].values())),
        "proj": np.array(list(r["projection"]["norms"].values())),
        "res": np.array(r["residual"]["cosine_after"]),
        "ind": np.array([ind[t]["statistic"] for t in independence.TESTS]),
        "merge": np.array(r["clustering"]["linkage"])[:, 2],
        "mds": np.array(list(r["mds"]["coords"].values())),
    }


def test_invariant_to_rotation_and_rescaling():
    d = 24
    V = from_gram(SEED_GRAM, d)
    clusters = {"medical": ["med", "med2"], "persona": ["prof", "mal"]}
    base = analyze(dict(zip(SEED_NAMES, V, strict=True)), clusters, n_null=20, n_perm=20)
    Q = random_rotation(d)
    scales = np.array([0.01, 3.0, 70.0, 0.5])
    moved = analyze(
        dict(zip(SEED_NAMES, (V @ Q.T) * scales[:, None], strict=True)),
        clusters,
        n_null=20,
        n_perm=20,
    )
    a, b = _points(base), _points(moved)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    assert (
        base["independence"]["medical|persona"]["verdict"]
        == (moved["independence"]["medical|persona"]["verdict"])
    )


def test_two_vectors_colinear_and_small_d():
    v = RNG.standard_normal(8)
    r = analyze({"a": v, "b": -2 * v}, n_null=10)
    assert r["cosine"]["matrix"][0][1] == pytest.approx(-1.0)
    assert "triangles" not in r and "residual" not in r
    r = analyze({"a": v, "b": 3 * v, "c": RNG.standard_normal(8)}, n_null=10)
    assert r["cosine"]["matrix"][0][1] == pytest.approx(1.0)
    assert r["subspace"]["rank"] == 2
    # More vectors than dimensions.
    W = RNG.standard_normal((6, 3))
    r = analyze(
        {f"v{i}": w for i, w in enumerate(W)},
        {"x": ["v0", "v1", "v2"], "y": ["v3", "v4", "v5"]},
        n_null=10,
    )
    assert r["subspace"]["rank"] == 3
    np.testing.assert_allclose(r["cosine"]["matrix"], np_cos(W), atol=1e-9)
    with pytest.raises(ValueError, match="unknown vector 'q'"):
        analyze({"a": v, "b": -v}, {"x": ["a", "q"]}, n_null=5)


def test_seed_001_gram_passes_thresholds_but_not_the_null():
    """Seed 001's 5.6% shared variance is small by its threshold yet far above what independent
    clusters give in d = 4096; its obtuse 100 deg angle is beyond the null on the far side."""
    V, cl = seed_clusters()
    rng = np.random.default_rng(0)
    th = independence.Thresholds()
    st = independence.independence_statistics(V, SEED_NAMES, cl, "medical", "persona")
    nulls = independence.independence_null(V, SEED_NAMES, cl, "medical", "persona", 60, rng)
    # Projection of a unit vector on a random 2-D span has E[norm^2] = 2/d.
    assert np.mean(nulls["projection"] ** 2) == pytest.approx(2 / 4096, rel=0.3)
    s = {t: st[t]["statistic"] for t in independence.TESTS}
    assert independence.decide("projection", s["projection"], None, th) == "independent"
    assert independence.null_side("projection", s["projection"], nulls["projection"], th) == (
        "shared"
    )
    assert (
        independence.null_side("cluster_angle", s["cluster_angle"], nulls["cluster_angle"], th)
        == "independent"
    )
    tests = {
        t: {
            "decision": independence.decide(t, s[t], None, th),
            "null_side": independence.null_side(t, s[t], nulls[t], th),
        }
        for t in independence.TESTS
    }
    tests["cross_pca"]["decision"] = "inconclusive"
    text = independence.verdict(tests)
    assert text.startswith("4/5 tests support independent mechanisms by the thresholds")
    assert " 1 inconclusive (the 95% interval crosses the threshold): cross_pca." in text
    assert "more overlap than chance in: projection" in text
