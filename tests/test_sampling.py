"""Sampling without a sort: the nucleus (`top_p_mask`) against a numpy full-sort reference,
the inverse-CDF draw on hand-derived edge cases, and `sample_tokens`' empirical distribution
against the exact nucleus distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from emgeo_jax.generate.sampling import (
    NUCLEUS_ROWS,
    SamplingParams,
    inverse_cdf,
    sample_tokens,
    top_p_mask,
)


def nucleus_reference(row: np.ndarray, top_p: float) -> np.ndarray:
    """Full sort (float64): keep the sorted-descending tokens whose preceding cumulative
    probability is < top_p, then every logit >= the smallest kept one."""
    desc = np.sort(row.astype(np.float64))[::-1]
    probs = np.exp(desc - desc[0])
    probs /= probs.sum()
    kept = (np.cumsum(probs) - probs) < top_p
    return row >= desc[kept].min()


def random_logits(rng, rows, vocab, scale):
    logits = rng.normal(size=(rows, vocab)) * scale
    logits[0, :3] = -np.inf  # masked vocabulary entries
    logits[1] = np.round(logits[1])  # many ties, some at the threshold
    return logits.astype(np.float32)


def test_top_p_mask_equals_full_sort():
    # flat logits (scale 0.05) put most of the vocabulary in the nucleus, peaked ones (20)
    # a single token; 11 rows are not a multiple of the row chunk
    rng = np.random.default_rng(0)
    mask = jax.jit(top_p_mask)
    for scale in (0.05, 1.0, 4.0, 20.0):
        logits = random_logits(rng, NUCLEUS_ROWS + 3, 3000, scale)
        sizes = []
        for top_p in (1e-6, 0.2, 0.5, 0.9, 0.97, 0.999):  # sample_tokens skips the mask at 1
            got = np.asarray(mask(jnp.asarray(logits), jnp.float32(top_p)))
            want = np.stack([nucleus_reference(r, top_p) for r in logits])
            np.testing.assert_array_equal(got, want, err_msg=f"{scale=} {top_p=}")
            sizes.append(want.sum(-1))
        assert np.min(sizes) >= 1
        if scale <= 1.0:
            assert np.max(sizes) > 1000  # the large-nucleus regime is exercised


def test_inverse_cdf_edges():
    # weights [0, 0 | 0, 5 | 2, 0 | 0] in blocks of 2: cumulative 0, 0, 0, 5, 7, 7, 7
    draw = jax.jit(inverse_cdf, static_argnames="block")
    w = jnp.asarray([[0, 0, 0, 5, 2, 0, 0]] * 5, jnp.float32)
    u = jnp.asarray([0.0, 5 / 7 - 1e-3, 5 / 7 + 1e-3, 1 - 2**-24, 0.5], jnp.float32)
    np.testing.assert_array_equal(draw(w, u, block=2), [3, 3, 4, 4, 3])
    # a single positive weight is always chosen, at any u and block size
    one = jnp.zeros((3, 700)).at[:, 513].set(1e-30)
    for block in (1, 256, 1024):
        got = draw(one, jnp.asarray([0.0, 0.5, 1 - 2**-24]), block=block)
        np.testing.assert_array_equal(got, [513] * 3)


@pytest.mark.parametrize("top_p", [0.7, 1.0])
def test_sample_tokens_draws_the_nucleus_distribution(top_p):
    temperature, n = 0.7, 20000
    rng = np.random.default_rng(1)
    row = rng.normal(size=600).astype(np.float32)  # 600: a partial last block
    row[:5] = -np.inf
    draws = sample_tokens(
        jnp.broadcast_to(jnp.asarray(row), (n, row.size)),
        jax.random.uniform(jax.random.key(0), (n,)),
        jnp.float32(temperature),
        jnp.float32(top_p),
    )
    draws = np.asarray(draws)
    scaled = row.astype(np.float64) / temperature
    keep = nucleus_reference(scaled, top_p) & np.isfinite(scaled)
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    assert keep.sum() > 20
    assert keep[draws].all()  # never outside the nucleus
    # chi-square over tokens expected >= 5 times, the rarer ones pooled into one bin
    counts, expected = np.bincount(draws, minlength=row.size), n * probs
    big, rare = keep & (expected >= 5), keep & (expected < 5)
    observed, expected = (
        np.r_[counts[big], counts[rare].sum()],
        np.r_[expected[big], expected[rare].sum()],
    )
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > 1e-3, p_value


def test_default_streams_are_one_seeded_batch():
    """Row b's uniform at step i is entry b of `uniform(fold_in(PRNGKey(seed), i), (B,))`; a
    row given stream `(seed, lane)` draws entry `lane` of that batch, in a batch of any size."""
    batch = SamplingParams.make(1.0, 1.0, seed=7, rows=5)
    for step in (0, 3):
        want = jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(7), step), (5,))
        np.testing.assert_array_equal(batch.uniforms(step), want)
    moved = SamplingParams.make(1.0, 1.0, rows=6, streams=[(7, 4), (3, 0), (7, 0)] * 2)
    u3 = jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(3), 2), (1,))
    np.testing.assert_array_equal(
        moved.uniforms(2)[:3], [batch.uniforms(2)[4], u3[0], batch.uniforms(2)[0]]
    )
    padded = batch.padded_rows(8)
    assert padded.keys.shape == (8, 2) and padded.lanes.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    np.testing.assert_array_equal(padded.uniforms(1)[:5], batch.uniforms(1))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rows=2, streams=[(0, 0)]), "1 for 2 rows"),
        (dict(rows=2, streams=[(0, 0), (0, 2)]), "outside 0..1"),
        (dict(rows=2, streams=[(0, -1), (0, 0)]), "outside 0..1"),
    ],
)
def test_bad_streams_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams.make(1.0, 1.0, **kw)
