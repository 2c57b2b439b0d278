"""L1-regularised logistic-regression probes on adapter scalars (or any features).

`probe(X, y, groups)` runs `repeats` stratified k-fold cross-validations (folds drawn over
groups, e.g. examples, so tokens of one example never sit on both sides), z-scores with the
training fold's statistics, fits a class-balanced L1 logistic regression by proximal gradient
(FISTA) and reports accuracy, precision, recall, F1 and ROC AUC of the out-of-fold
predictions: the mean over repeats, and a 95% percentile-bootstrap interval over groups of the
repeat-averaged predictions. `four_tests` runs the probes of the rank-1 dissection: aligned vs
misaligned within the topic and outside it; topic vs the rest within each class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

METRICS = ("accuracy", "precision", "recall", "f1", "auc")


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """P(score of a random positive > that of a random negative), ties counting 1/2
    (the Mann-Whitney U statistic over n_pos * n_neg)."""
    y = np.asarray(y, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (threshold 0.5; 0 when undefined) and AUC."""
    y = np.asarray(y, bool)
    pred = np.asarray(prob) >= 0.5
    tp, fp, fn = np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & y)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float(np.mean(pred == y)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auc": roc_auc(y, prob),
    }


def fit_logistic_l1(
    X: np.ndarray, y: np.ndarray, l1: float, weights: np.ndarray | None = None, iters: int = 500
) -> tuple[np.ndarray, float]:
    """Minimise `sum_i w_i log(1 + exp(-s_i z_i)) / sum_i w_i + l1 * |coef|_1` (`s = 2y - 1`,
    `z = X coef + bias`, bias unpenalised) by FISTA with step `1 / L`, `L` the Lipschitz bound
    `||X1||_2^2 max(w) / (4 sum w)`. Returns `(coef [F], bias)`."""
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    Xb = np.hstack([X, np.ones((len(X), 1))])
    lipschitz = 0.25 * np.linalg.norm(Xb, 2) ** 2 * w.max() + 1e-12
    step = 1.0 / lipschitz
    theta = np.zeros(Xb.shape[1])
    momentum, t = theta.copy(), 1.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(Xb @ momentum)))
        grad = Xb.T @ (w * (p - y))
        new = momentum - step * grad
        new[:-1] = np.sign(new[:-1]) * np.maximum(np.abs(new[:-1]) - step * l1, 0.0)
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        momentum = new + (t - 1) / t_next * (new - theta)
        theta, t = new, t_next
    return theta[:-1], float(theta[-1])


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-sample weights `n / (2 n_class)`, so both classes weigh the same."""
    y = np.asarray(y, bool)
    n_pos, n = y.sum(), len(y)
    return np.where(y, n / (2 * n_pos), n / (2 * (n - n_pos)))


def stratified_group_folds(
    y: np.ndarray, groups: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Fold id `[N]` per sample: groups (all their samples together) are shuffled within
    each class (a group's class: its first sample's label) and dealt round-robin to folds."""
    y, groups = np.asarray(y, bool), np.asarray(groups)
    uniq, first = np.unique(groups, return_index=True)
    fold_of = {}
    for cls in (False, True):
        members = uniq[y[first] == cls]
        for j, g in enumerate(rng.permutation(members)):
            fold_of[g] = j % k
    return np.asarray([fold_of[g] for g in groups])


def probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    l1: float = 0.01,
    k: int = 5,
    repeats: int = 10,
    n_boot: int = 500,
    shuffle_labels: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated L1 probe of `y [N]` (0/1) from `X [N, F]` (see module docstring).

    `groups [N]` (default: each sample its own) keep samples of a group in one fold.
    `shuffle_labels` permutes the labels across groups first (a chance-level control).
    Returns `{metric: {"mean", "std", "ci": [lo, hi]}}`, `coef_mean [F]` (z-scored units,
    averaged over fits), `n`, `n_groups`, `n_pos`."""
    X, y = np.asarray(X, np.float64), np.asarray(y).astype(bool)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    if shuffle_labels:
        group_label = np.zeros(len(uniq), bool)
        group_label[inverse] = y
        y = rng.permutation(group_label)[inverse]
    n_pos_groups = len(np.unique(inverse[y]))
    if min(n_pos_groups, len(uniq) - n_pos_groups) < k:
        raise ValueError(
            f"need >= {k} groups per class for {k}-fold CV, got {n_pos_groups} "
            f"positive and {len(uniq) - n_pos_groups} negative"
        )
    probs, coefs, per_repeat = [], [], []
    for _ in range(repeats):
        folds = stratified_group_folds(y, groups, k, rng)
        prob = np.zeros(len(y))
        for f in range(k):
            tr, te = folds != f, folds == f
            mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-8
            coef, bias = fit_logistic_l1((X[tr] - mu) / sd, y[tr], l1, balanced_weights(y[tr]))
            prob[te] = 1 / (1 + np.exp(-((X[te] - mu) / sd @ coef + bias)))
            coefs.append(coef)
        probs.append(prob)
        per_repeat.append(classification_metrics(y, prob))
    mean_prob = np.mean(probs, 0)
    boot = []
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        if y[idx].all() or not y[idx].any():
            continue
        boot.append(classification_metrics(y[idx], mean_prob[idx]))
    out: dict[str, Any] = {}
    for m in METRICS:
        vals = [r[m] for r in per_repeat]
        lo, hi = np.percentile([b[m] for b in boot], [2.5, 97.5])
        out[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "ci": [lo, hi]}
    out.update(
        coef_mean=np.mean(coefs, 0).tolist(),
        n=int(len(y)),
        n_groups=int(len(uniq)),
        n_pos=int(y.sum()),
    )
    return out


def four_tests(
    X: np.ndarray,
    label: np.ndarray,
    topic: np.ndarray,
    groups: np.ndarray | None = None,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """The four probes of the rank-1 dissection. `label [N]` 1 misaligned / 0 aligned;
    `topic [N]` bool, True for the topic (e.g. medical). kwargs go to `probe`."""
    label, topic = np.asarray(label).astype(bool), np.asarray(topic).astype(bool)
    groups = np.arange(len(label)) if groups is None else np.asarray(groups)
    cases = {
        "misaligned_vs_aligned|topic": (topic, label),
        "misaligned_vs_aligned|other": (~topic, label),
        "topic_vs_other|misaligned": (label, topic),
        "topic_vs_other|aligned": (~label, topic),
    }
    return {
        name: probe(X[rows], y[rows], groups[rows], **kwargs) for name, (rows, y) in cases.items()
    }
