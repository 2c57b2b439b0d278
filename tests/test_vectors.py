"""Directions: mean-diff and model-diff by hand, PCA against numpy's SVD (sign rule,
determinism), norm-matched isotropic controls."""

from __future__ import annotations

import numpy as np
import pytest

from emgeo_jax.vectors.directions import data_diff, model_diff, pca, pooled_mean, random_controls


def test_data_diff_is_misaligned_minus_aligned():
    means = np.random.default_rng(0).normal(size=(2, 3, 5))
    np.testing.assert_array_equal(data_diff(means), means[1] - means[0])
    with pytest.raises(ValueError, match=r"\[2, L, D\]"):
        data_diff(means[:1])


def test_model_diff_pools_classes_by_count():
    rng = np.random.default_rng(1)
    tuned, base = rng.normal(size=(2, 2, 4)), rng.normal(size=(2, 2, 4))
    counts = np.array([3.0, 1.0])
    both = model_diff((tuned, counts), (base, counts), None)
    expected = (3 * tuned[0] + tuned[1]) / 4 - (3 * base[0] + base[1]) / 4
    np.testing.assert_allclose(both, expected, rtol=1e-12)
    np.testing.assert_allclose(model_diff((tuned, counts), (base, counts), 1), tuned[1] - base[1])
    np.testing.assert_allclose(pooled_mean(tuned, counts, 0), tuned[0])
    with pytest.raises(ValueError, match="not the same data"):
        model_diff((tuned, counts), (base, counts + 1), None)


def test_pooled_mean_of_token_sums_is_the_mean_of_all_tokens():
    rng = np.random.default_rng(2)
    tokens = [rng.normal(size=(n, 1, 3)) for n in (5, 2)]  # [T_c, L, D] per class
    means = np.stack([t.mean(axis=0) for t in tokens])
    counts = np.array([len(t) for t in tokens], float)
    np.testing.assert_allclose(
        pooled_mean(means, counts), np.concatenate(tokens).mean(axis=0), rtol=1e-12
    )


def test_pca_matches_numpy_svd_up_to_sign_and_fixes_sign():
    rng = np.random.default_rng(3)
    n, layers, d, k = 40, 3, 16, 4
    scales = np.linspace(3.0, 0.5, d)  # distinct variances: well-separated components
    rows = rng.normal(size=(n, layers, d)) * scales + rng.normal(size=(layers, d))
    reference = rng.normal(size=(layers, d))
    comps, ratio = pca(rows, reference, num_components=k)
    assert comps.shape == (layers, k, d) and ratio.shape == (layers, k)
    for layer in range(layers):
        x = rows[:, layer] - rows[:, layer].mean(axis=0)
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        for j in range(k):
            cos = comps[layer, j] @ vt[j]
            assert abs(abs(cos) - 1) < 1e-4, (layer, j, cos)
            assert comps[layer, j] @ reference[layer] > 0  # the sign rule
        np.testing.assert_allclose(ratio[layer], (s**2 / np.sum(s**2))[:k], rtol=1e-4)
    again, ratio2 = pca(rows, reference, num_components=k)
    np.testing.assert_array_equal(again, comps)
    np.testing.assert_array_equal(ratio2, ratio)
    flipped, _ = pca(rows, -reference, num_components=k)
    np.testing.assert_allclose(flipped, -comps, atol=1e-6)


def test_pca_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_components"):
        pca(np.zeros((3, 2, 4)), np.ones((2, 4)), num_components=5)
    with pytest.raises(ValueError, match=r"\[N, L, D\]"):
        pca(np.zeros((3, 4)), np.ones((2, 4)))


def test_random_controls_are_norm_matched_and_isotropic():
    reference = np.stack([np.full(64, 0.5), np.full(64, 2.0)])  # norms 4 and 16
    controls = random_controls(reference, num=400, seed=0)
    assert controls.shape == (400, 2, 64)
    np.testing.assert_allclose(
        np.linalg.norm(controls, axis=-1), np.broadcast_to([4.0, 16.0], (400, 2)), rtol=1e-5
    )
    unit = controls[:, 0] / 4.0
    cos = unit[:200] @ unit[200:].T
    # isotropic: cosines of independent draws have mean 0 and std 1/sqrt(d)
    assert abs(cos.mean()) < 0.01
    assert abs(cos.std() - 1 / np.sqrt(64)) < 0.01
    assert np.linalg.norm(unit.mean(axis=0)) < 0.15  # no preferred direction
    np.testing.assert_array_equal(
        random_controls(reference, 3, seed=1), random_controls(reference, 3, seed=1)
    )
    assert not np.allclose(
        random_controls(reference, 3, seed=1), random_controls(reference, 3, seed=2)
    )
