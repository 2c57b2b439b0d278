"""Directions built from examples in `analyze`: PCA directions (first principal component,
signed towards the mean difference) and joint resampling of directions built from the same
examples, each checked against a bootstrap written out by hand in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from emgeo_jax.geometry import null
from emgeo_jax.geometry.analyze import analyze

N, D = 30, 8


def _rows(seed: int = 0, rotate: bool = True):
    """The same 30 examples at two "layers": labels [N], tokens [N], rows [N, D] each; the
    second layer the first (rotated, unless not `rotate`) plus noise, both with a dominant
    axis of variance."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], N // 2)
    tokens = rng.integers(2, 20, size=N)
    spread = np.diag(np.linspace(3.0, 0.5, D))
    first = rng.standard_normal((N, D)) @ spread
    first[labels == 1] += 1.5 * np.ones(D) / np.sqrt(D)
    rotation = np.linalg.qr(rng.standard_normal((D, D)))[0] if rotate else np.eye(D)
    second = first @ rotation + 0.7 * rng.standard_normal((N, D))
    return labels, tokens, first, second


def _numpy_pc1(rows: np.ndarray, labels: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """PC1 of the centred rows in float64, sign towards the token-weighted mean difference."""
    _, _, vt = np.linalg.svd(rows - rows.mean(0), full_matrices=False)
    md = null.mean_diff(rows, labels, tokens)
    return vt[0] * np.sign(vt[0] @ md)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _basic_ci(reps: list[float], point: float) -> np.ndarray:
    return np.clip(null.bootstrap_ci(np.array(reps), point), -1.0, 1.0)


def test_pca_direction_is_the_first_principal_component_signed_to_the_mean_diff():
    labels, tokens, first, _ = _rows()
    want = _numpy_pc1(first, labels, tokens)
    r = analyze(
        {"ref": want, "flipped": -want},
        pca_examples={"pc": (first, labels, tokens)},
        n_null=2, n_boot=0, n_perm=2,
    )  # fmt: skip
    names, C = r["inputs"]["names"], np.array(r["cosine"]["matrix"])
    assert C[names.index("pc"), names.index("ref")] == pytest.approx(1.0, abs=1e-6)
    assert r["inputs"]["norms"]["pc"] == pytest.approx(1.0, abs=1e-6)  # unit length
    rec = r["inputs"]["from_examples"]["pc"]
    assert rec["method"] == "pca" and rec["n"] == N and rec["resampled_with"] == []
    assert "pc" not in r.get("examples", {})  # no label permutations for a PCA direction


@pytest.mark.parametrize("joint", [True, False])
def test_bootstrap_draws_one_resample_per_group_of_the_same_examples(joint):
    """Two mean differences of the same examples at two layers and the first layer's PCA: the
    cosine intervals equal a hand-written bootstrap drawing one resample per replicate for
    all three (`same_examples`), or one per direction (the default)."""
    labels, tokens, first, second = _rows()
    fixed = np.ones(D)
    r = analyze(
        {"fixed": fixed},
        examples={"md0": (first, labels, tokens), "md1": (second, labels, tokens)},
        pca_examples={"pc0": (first, labels, tokens)},
        same_examples=[["md0", "md1", "pc0"]] if joint else None,
        n_null=2, n_boot=40, n_perm=2, seed=7,
    )  # fmt: skip
    names = r["inputs"]["names"]
    assert names == ["fixed", "md0", "md1", "pc0"]
    point = {
        "md0": null.mean_diff(first, labels, tokens),
        "md1": null.mean_diff(second, labels, tokens),
        "pc0": _numpy_pc1(first, labels, tokens),
    }
    rng = np.random.default_rng(7)  # analyze's draws, in its order: md0, md1, pc0
    reps = {pair: [] for pair in [("md0", "md1"), ("md0", "pc0"), ("fixed", "pc0")]}
    for _ in range(40):
        draws = [null.stratified_resample(labels, rng) for _ in range(1 if joint else 3)]
        i0, i1, i2 = draws * 3 if joint else draws
        rep = {
            "md0": null.mean_diff(first[i0], labels[i0], tokens[i0]),
            "md1": null.mean_diff(second[i1], labels[i1], tokens[i1]),
            "pc0": _numpy_pc1(first[i2], labels[i2], tokens[i2]),
            "fixed": fixed,
        }
        for a, b in reps:
            reps[a, b].append(_cos(rep[a], rep[b]))
    ci = r["cosine"]["ci95"]
    for (a, b), values in reps.items():
        want = _basic_ci(values, _cos(point.get(a, fixed), point[b]))
        np.testing.assert_allclose(ci[names.index(a)][names.index(b)], want, atol=1e-5)
    if joint:
        assert r["inputs"]["from_examples"]["md0"]["resampled_with"] == ["md1", "pc0"]


def test_directions_of_the_same_examples_need_one_draw():
    """Two layers of the same examples, nearly equal (cosine ~0.99): drawn independently, the
    two mean differences each take their own sampling noise, the replicates' cosines fall
    well below the estimate and the basic interval is reflected above it, clipped to the
    degenerate [1, 1]; drawn together, the interval holds the estimate."""
    labels, tokens, first, second = _rows(rotate=False)
    examples = {"md0": (first, labels, tokens), "md1": (second, labels, tokens)}
    intervals = {}
    for same in (None, [["md0", "md1"]]):
        r = analyze(
            {"fixed": np.ones(D)}, examples=examples, same_examples=same,
            n_null=2, n_boot=40, n_perm=2, seed=7,
        )  # fmt: skip
        point = r["cosine"]["matrix"][1][2]
        intervals[same is not None] = r["cosine"]["ci95"][1][2]
    assert point > 0.95
    assert intervals[False] == [1.0, 1.0]
    lo, hi = intervals[True]
    assert lo < point <= hi


def test_bad_groups_and_names_are_refused_by_name():
    labels, tokens, first, second = _rows()
    ex = {"a": (first, labels, tokens), "b": (second, labels, tokens)}
    common = dict(n_null=2, n_boot=2, n_perm=2)
    with pytest.raises(ValueError, match="'zz' is not a direction built from examples"):
        analyze({"v": np.ones(D)}, examples=ex, same_examples=[["a", "zz"]], **common)
    with pytest.raises(ValueError, match="'a' is in two groups"):
        analyze({"v": np.ones(D)}, examples=ex, same_examples=[["a", "b"], ["a"]], **common)
    other = {"a": ex["a"], "b": (second, labels[::-1], tokens)}
    with pytest.raises(ValueError, match="'b' and 'a' are not the same examples"):
        analyze({"v": np.ones(D)}, examples=other, same_examples=[["a", "b"]], **common)
    with pytest.raises(ValueError, match=r"\['a'\] given both as examples and as pca_examples"):
        analyze({"v": np.ones(D)}, examples=ex, pca_examples={"a": ex["a"]}, **common)
