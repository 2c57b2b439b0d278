"""Nulls, permutation tests, bootstrap intervals and split-half reliability."""

import numpy as np
import pytest
from scipy import stats

from emgeo_jax.geometry import analyze, null


def test_cosine_null_std_is_one_over_sqrt_d():
    rng = np.random.default_rng(0)
    for d in (16, 256, 2048):
        assert null.cosine_null(d).std() == pytest.approx(1 / np.sqrt(d), rel=1e-12)
        X = null.random_directions(np.array([1.0, 5.0]), d, rng)
        assert np.linalg.norm(X[1]) == pytest.approx(5.0)
        draws = null.monte_carlo(lambda X: X[0] @ X[1] / 5.0, np.array([1.0, 5.0]), d, 2000, rng)
        assert draws.std() == pytest.approx(1 / np.sqrt(d), rel=0.06)
        # The Monte Carlo sample follows the exact distribution.
        assert stats.kstest(draws, null.cosine_null(d).cdf).pvalue > 1e-3


def test_projection_null_matches_monte_carlo():
    rng = np.random.default_rng(1)
    d, k = 50, 3
    X = null.random_directions(np.ones(4000), d, rng)
    sq = np.sum(X[:, :k] ** 2, axis=1)  # projection on the first k coordinates
    assert stats.kstest(sq, null.projection_null(k, d).cdf).pvalue > 1e-3
    assert sq.mean() == pytest.approx(k / d, rel=0.05)


def test_cosine_p_value_two_sided():
    d = 100
    p = null.cosine_p_value(np.array([0.0, 1.96 / np.sqrt(d), -1.96 / np.sqrt(d)]), d)
    assert p[0] == pytest.approx(1.0)
    assert p[1] == pytest.approx(p[2]) and p[1] == pytest.approx(0.05, abs=0.01)


def _examples(n, d, shift, rng):
    labels = np.repeat([0, 1], n // 2)
    pooled = rng.standard_normal((n, d))
    pooled[labels == 1] += shift
    return pooled, labels


def test_bootstrap_interval_shrinks_with_examples():
    rng = np.random.default_rng(2)
    d = 32
    shift = np.zeros(d)
    shift[0] = 1.0
    ref = np.eye(d)[0] + 0.5 * np.eye(d)[1]

    def cos_to_ref(v):
        return v @ ref / np.linalg.norm(v) / np.linalg.norm(ref)

    widths = []
    for n in (40, 640):
        pooled, labels = _examples(n, d, shift, rng)
        reps = null.bootstrap_direction_statistic(pooled, labels, cos_to_ref, 200, rng)
        point = cos_to_ref(null.mean_diff(pooled, labels))
        lo, hi = null.bootstrap_ci(reps, point)
        q_lo, q_hi = np.quantile(reps, [0.025, 0.975])
        assert (lo, hi) == pytest.approx((2 * point - q_hi, 2 * point - q_lo))
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]
    assert lo <= cos_to_ref(shift) <= hi  # with many examples the truth is covered


def test_stratified_resample_keeps_class_sizes():
    rng = np.random.default_rng(3)
    labels = np.array([0] * 7 + [1] * 3)
    idx = null.stratified_resample(labels, rng)
    assert np.sum(labels[idx] == 1) == 3 and len(idx) == 10


def test_split_half_and_permutation_see_signal_only_when_present():
    rng = np.random.default_rng(4)
    d = 20
    shift = np.full(d, 0.8)
    strong = _examples(200, d, shift, rng)
    noise = _examples(200, d, np.zeros(d), rng)
    rel_strong = null.split_half_reliability(*strong, 50, rng)
    rel_noise = null.split_half_reliability(*noise, 50, rng)
    assert rel_strong["mean_cosine"] > 0.9 > 0.5 > abs(rel_noise["mean_cosine"])
    r = rel_strong["mean_cosine"]
    assert rel_strong["spearman_brown"] == pytest.approx(2 * r / (1 + r))

    def norm(p):
        return lambda lab: float(np.linalg.norm(null.mean_diff(p, lab)))

    assert null.permutation_test(norm(strong[0]), strong[1], 99, rng)["p_value"] == 0.01
    assert null.permutation_test(norm(noise[0]), noise[1], 99, rng)["p_value"] > 0.01


def test_null_summary_p_value():
    sample = np.random.default_rng(5).standard_normal(999)
    assert null.null_summary(0.0, sample)["p_value"] > 0.9
    assert null.null_summary(10.0, sample)["p_value"] == pytest.approx(1 / 1000)


def test_analyze_with_examples_gives_intervals_nulls_and_is_reproducible():
    rng = np.random.default_rng(6)
    d = 24
    target = rng.standard_normal(d)
    other = rng.standard_normal(d)
    pooled, labels = _examples(60, d, 0.4 * target, rng)
    kw = dict(
        clusters={"m": ["md", "t"], "o": ["o1", "o2"]},
        examples={"md": (pooled, labels)},
        weighting="example",
        n_null=30,
        n_boot=40,
        n_perm=30,
        seed=7,
    )
    vecs = {"t": target, "o1": other, "o2": other + 0.5 * rng.standard_normal(d)}
    r1, r2 = analyze(vecs, **kw), analyze(vecs, **kw)
    assert r1 == r2  # seeded
    assert analyze(vecs, **{**kw, "seed": 8}) != r1
    ci = r1["cosine"]["ci95"]
    names = r1["inputs"]["names"]
    i, j = names.index("md"), names.index("t")
    lo, hi = ci[i][j]
    assert hi - lo > 0.01
    assert ci[names.index("o1")][names.index("o2")] is None  # untouched by resampling
    assert r1["cosine"]["null"]["std"] == pytest.approx(1 / np.sqrt(d))
    ex = r1["examples"]["md"]
    assert ex["label_permutation_abs_cosine"]["t"]["p_value"] < 0.1
    assert ex["split_half"]["mean_cosine"] > 0
    tests = r1["independence"]["m|o"]["tests"]
    assert tests["cluster_angle"]["ci95"] is not None
    assert all("decision" in t for t in tests.values())
    assert "tests support independent mechanisms" in r1["independence"]["m|o"]["verdict"]
    assert r1["sets"]["within:m"]["ci95"] is not None
    assert r1["cluster_permutation"]["n"] == 30


def test_bootstrap_intervals_stay_inside_the_statistics_range():
    """A basic interval 2t - q can pass a bound: a mean-diff whose cosine with the true shift is
    0.92 has replicates shrunk toward 0, so its raw upper end is ~1.06. Cosine intervals are
    clipped to [-1, 1] (projection norms to [0, 1])."""
    rng = np.random.default_rng(0)
    d, n = 16, 40
    labels = np.repeat([0, 1], n // 2)
    shift = np.zeros(d)
    shift[0] = 3.0
    pooled = rng.standard_normal((n, d))
    pooled[labels == 1] += shift
    res = analyze(
        {"t": shift},
        {"m": ["md"], "o": ["t"]},
        examples={"md": (pooled, labels)},
        weighting="example",
        n_null=20,
        n_boot=100,
        n_perm=10,
        seed=0,
    )
    names = res["inputs"]["names"]
    i, j = names.index("md"), names.index("t")
    point, (lo, hi) = res["cosine"]["matrix"][i][j], res["cosine"]["ci95"][i][j]
    assert 0.9 < point < 0.95 and lo < point and hi == 1.0  # raw upper end is above 1
    cis = [c for row in res["cosine"]["ci95"] for c in row if c is not None]
    assert all(-1.0 <= a <= b <= 1.0 for a, b in cis)
    proj = [c for c in res["projection"]["ci95"].values() if c is not None]
    assert proj and all(0.0 <= a <= b <= 1.0 for a, b in proj)
