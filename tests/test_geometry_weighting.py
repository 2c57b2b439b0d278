"""The mean difference of `emgeo geometry` built from examples: token-weighted by default (as
`emgeo vectors`), example-weighted on request, recorded; resampling draws examples and
rebuilds the weighted statistic."""

from __future__ import annotations

import numpy as np
import pytest

from emgeo_jax.geometry import null
from emgeo_jax.geometry.analyze import analyze

D = 6


def _token_rows(seed: int = 0):
    """Hand-made per-token activations of 10 examples with very unequal lengths: returns
    (per-example token arrays, labels [N], pooled means [N, D], tokens [N])."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    lengths = np.array([1, 2, 40, 3, 5, 30, 1, 2, 4, 7])
    shift = np.where(np.arange(D) < 3, 1.0, -1.0)
    rows = [
        rng.standard_normal((n, D)) + (2.0 * lab + (n > 20)) * shift + (n > 20) * np.arange(D)
        for n, lab in zip(lengths, labels, strict=True)
    ]
    pooled = np.stack([r.mean(axis=0) for r in rows])
    return rows, labels, pooled, lengths


def _numpy_directions(rows, labels):
    tok = [
        np.concatenate([r for r, lab in zip(rows, labels, strict=True) if lab == c]) for c in (0, 1)
    ]
    token_md = tok[1].mean(axis=0) - tok[0].mean(axis=0)  # all tokens of a class / their count
    means = [
        np.mean([r.mean(0) for r, lab in zip(rows, labels, strict=True) if lab == c], 0)
        for c in (0, 1)
    ]
    return token_md, means[1] - means[0]


def test_mean_diff_token_and_example_weighting_match_numpy():
    rows, labels, pooled, tokens = _token_rows()
    token_md, example_md = _numpy_directions(rows, labels)
    np.testing.assert_allclose(null.mean_diff(pooled, labels, tokens), token_md, atol=1e-12)
    np.testing.assert_allclose(null.mean_diff(pooled, labels), example_md, atol=1e-12)
    assert np.linalg.norm(token_md - example_md) > 0.5  # the two really differ on this data


@pytest.mark.parametrize("weighting", ["token", "example"])
def test_analyze_direction_and_record_follow_the_weighting(weighting):
    rows, labels, pooled, tokens = _token_rows()
    token_md, example_md = _numpy_directions(rows, labels)
    want = token_md if weighting == "token" else example_md
    other = example_md if weighting == "token" else token_md
    r = analyze(
        {"want": want, "other": other},
        examples={"md": (pooled, labels, tokens)},
        weighting=weighting,
        n_null=5,
        n_boot=5,
        n_perm=5,
    )
    names = r["inputs"]["names"]
    C = np.array(r["cosine"]["matrix"])
    assert C[names.index("md"), names.index("want")] == pytest.approx(1.0, abs=1e-9)
    assert C[names.index("md"), names.index("other")] < 0.999
    assert r["inputs"]["norms"]["md"] == pytest.approx(np.linalg.norm(want))
    assert r["inputs"]["weighting"] == weighting
    rec = r["inputs"]["from_examples"]["md"]
    assert rec["weighting"] == weighting and rec["n"] == 10
    if weighting == "token":
        assert rec["tokens"] == [51.0, 44.0]


def test_token_weighting_needs_tokens():
    _, labels, pooled, tokens = _token_rows()
    with pytest.raises(ValueError, match="'md': token weighting needs the tokens"):
        analyze({"a": np.ones(D)}, examples={"md": (pooled, labels)}, n_null=2)
    with pytest.raises(ValueError, match="'md': tokens must be"):
        analyze({"a": np.ones(D)}, examples={"md": (pooled, labels, tokens[:3])}, n_null=2)
    with pytest.raises(ValueError, match="weighting="):
        analyze({"a": np.ones(D)}, examples={"md": (pooled, labels)}, weighting="tok")


def test_bootstrap_resamples_examples_and_recomputes_token_weighting():
    rows, labels, pooled, tokens = _token_rows()
    ref = np.ones(D) / np.sqrt(D)
    stat = lambda v: float(v @ ref / np.linalg.norm(v))  # noqa: E731
    got = null.bootstrap_direction_statistic(
        pooled, labels, stat, 20, np.random.default_rng(3), tokens
    )
    rng = np.random.default_rng(3)  # the same draws, rebuilt from the token rows in numpy
    want = []
    for _ in range(20):
        idx = null.stratified_resample(labels, rng)
        token_md, _ = _numpy_directions([rows[i] for i in idx], labels[idx])
        want.append(stat(token_md))
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_analyze_resampling_passes_each_examples_tokens(monkeypatch):
    """Every direction analyze rebuilds (bootstrap, permutations, split halves) is
    token-weighted with the tokens of the examples drawn."""
    _, labels, pooled, tokens = _token_rows()
    pooled_rows = {tuple(p): t for p, t in zip(pooled, tokens, strict=True)}
    calls = []

    def spy(p, lab, w=None):
        assert w is not None and len(w) == len(p) == len(lab)
        for row, t in zip(p, w, strict=True):
            assert pooled_rows[tuple(row)] == t  # the example's own token count
        calls.append(len(p))
        return real(p, lab, w)

    real = null.mean_diff
    monkeypatch.setattr(null, "mean_diff", spy)
    analyze({"a": np.ones(D)}, examples={"md": (pooled, labels, tokens)}, n_null=2, n_boot=4,
            n_perm=3)  # fmt: skip
    assert len(calls) >= 1 + 4 + 2 * (1 + 3)  # point, bootstrap, both permutation tests
    assert {4, 6} <= set(calls)  # split halves (2 + 2 and 3 + 3 examples)
