"""Probe metrics against hand values and scipy, the L1 fit against its optimality conditions,
planted signal recovery, chance on shuffled labels and the four dissection tests."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from emgeo_jax.train.probe import (
    balanced_weights,
    classification_metrics,
    fit_logistic_l1,
    four_tests,
    probe,
    roc_auc,
    stratified_group_folds,
)


def test_auc_hand_case_and_mannwhitney():
    # positives 0.9, 0.4 ; negatives 0.4, 0.1: pairs (0.9>0.4, 0.9>0.1, 0.4=0.4 tie, 0.4>0.1)
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.4, 0.1])) == 3.5 / 4
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    u = mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert roc_auc(y, s) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()))


def test_threshold_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0])
    prob = np.array([0.9, 0.6, 0.2, 0.7, 0.1])  # tp 2, fn 1, fp 1, tn 1
    m = classification_metrics(y, prob)
    assert m["accuracy"] == 3 / 5 and m["precision"] == 2 / 3 and m["recall"] == 2 / 3
    assert m["f1"] == pytest.approx(2 / 3)


def test_l1_fit_meets_kkt_conditions():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 6))
    y = (X[:, 0] - 0.5 * X[:, 1] + 0.3 * rng.normal(size=300) > 0).astype(float)
    w = balanced_weights(y)
    l1 = 0.02
    coef, bias = fit_logistic_l1(X, y, l1, w, iters=3000)
    p = 1 / (1 + np.exp(-(X @ coef + bias)))
    grad = X.T @ (w / w.sum() * (p - y))
    nz = coef != 0
    np.testing.assert_allclose(grad[nz], -l1 * np.sign(coef[nz]), atol=1e-4)
    assert np.all(np.abs(grad[~nz]) <= l1 + 1e-4)
    assert nz[0] and nz[1] and not nz[2:].all()  # sparse: some noise features are zeroed


def test_balanced_weights_and_group_folds():
    y = np.array([1, 0, 0, 0])
    w = balanced_weights(y)
    assert w[y == 1].sum() == pytest.approx(w[y == 0].sum())
    groups = np.repeat(np.arange(20), 3)
    labels = np.repeat(np.arange(20) % 2, 3).astype(bool)
    folds = stratified_group_folds(labels, groups, 5, np.random.default_rng(0))
    for g in range(20):
        assert len(set(folds[groups == g])) == 1
    for f in range(5):
        assert labels[folds == f].sum() == 6 and (~labels[folds == f]).sum() == 6


def test_probe_recovers_planted_signal_and_chance_on_shuffle():
    rng = np.random.default_rng(2)
    n_ex, tokens, f = 60, 4, 8
    y_ex = np.arange(n_ex) % 2
    groups = np.repeat(np.arange(n_ex), tokens)
    y = y_ex[groups]
    X = rng.normal(size=(n_ex * tokens, f))
    X[:, 3] += 1.5 * (2 * y - 1)  # the planted feature
    res = probe(X, y, groups, repeats=3, n_boot=200)
    assert res["auc"]["mean"] > 0.9 and res["auc"]["ci"][0] > 0.8
    assert np.argmax(np.abs(res["coef_mean"])) == 3
    null = probe(X, y, groups, repeats=3, n_boot=200, shuffle_labels=True)
    lo, hi = null["auc"]["ci"]
    assert lo < 0.5 < hi and abs(null["auc"]["mean"] - 0.5) < 0.15


def test_four_tests_find_the_planted_structure():
    """Feature 0 codes misalignment everywhere, feature 1 the topic only: the class probes
    succeed within both topics and the topic probes within both classes."""
    rng = np.random.default_rng(3)
    n = 160
    label = np.arange(n) % 2
    topic = (np.arange(n) // 2) % 2 == 0
    X = rng.normal(size=(n, 4))
    X[:, 0] += 2 * (2 * label - 1)
    X[:, 1] += 2 * (2 * topic - 1)
    res = four_tests(X, label, topic, repeats=2, n_boot=100)
    assert set(res) == {
        "misaligned_vs_aligned|topic",
        "misaligned_vs_aligned|other",
        "topic_vs_other|misaligned",
        "topic_vs_other|aligned",
    }
    for name, r in res.items():
        assert r["auc"]["mean"] > 0.9, name
        top = np.argmax(np.abs(r["coef_mean"]))
        assert top == (0 if name.startswith("misaligned") else 1), name


def test_probe_refuses_too_few_groups():
    with pytest.raises(ValueError, match="groups per class"):
        probe(np.zeros((6, 2)), np.array([0, 0, 0, 1, 1, 1]), k=5)
