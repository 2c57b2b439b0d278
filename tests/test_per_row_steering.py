"""Per-row steering (`Steering.per_row`): every row of a batch runs its own intervention and
gets exactly what a batch of that intervention alone gives (forward logits and taps, greedy
generation, number scoring), and changing which row runs which intervention is data."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from emgeo_jax.generate import generate_ids
from emgeo_jax.generate.numbers import number_logprobs, number_trie
from emgeo_jax.models.llama import default_positions
from emgeo_jax.models.lm import forward
from emgeo_jax.models.steering import Steering
from emgeo_jax.models.taps import Taps
from emgeo_jax.parallel import make_mesh
from emgeo_jax.serve import TokenText
from tests.tiny_models import padded_batch

TOL = 1e-5


@pytest.fixture(scope="module")
def interventions(tiny_chat_llama):
    """Four different interventions: an addition at two layers, an ablation of two
    directions, an addition on generated tokens only, and none."""
    cfg = tiny_chat_llama.config
    r = np.random.default_rng(0)
    d = cfg.hidden_size
    return [
        Steering.addition(cfg, r.normal(size=d), layers=[0, 2], scale=4.0),
        Steering.ablation(cfg, r.normal(size=(2, d)), layers=[1]),
        Steering.addition(cfg, r.normal(size=d), layers=[1], scale=6.0, positions="generated"),
        Steering.none(cfg),
    ]


def rows_of(variant, specs, run):
    """`run(steering, rows)` per intervention on the rows that run it, stitched by row."""
    out = {}
    for v, spec in enumerate(specs):
        rows = np.flatnonzero(np.asarray(variant) == v)
        if len(rows):
            for row, value in zip(rows, run(spec, rows), strict=True):
                out[int(row)] = value
    return [out[i] for i in range(len(variant))]


def test_forward_rows_equal_their_intervention_alone(tiny_chat_llama, interventions):
    lm = tiny_chat_llama
    ids, mask = padded_batch(lm.config.vocab_size, [7, 5, 9, 6, 8, 4], seed=3)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    positions = default_positions(mask)
    generated = jnp.asarray(np.arange(ids.shape[1])[None] >= 6).repeat(6, 0)
    variant = [2, 0, 3, 1, 0, 2]
    taps = Taps(resid="full", mlp="pooled")

    def run(steering, rows):
        rows = np.asarray(rows)
        out = forward(
            lm.graphdef, lm.params, ids[rows], positions[rows], mask[rows],
            steering=steering, taps=taps, is_generated=generated[rows],
        )  # fmt: skip
        sites = (out.logits, out.resid_post.swapaxes(0, 1), out.mlp_out.swapaxes(0, 1))
        return list(zip(*sites, strict=True))

    together = run(Steering.per_row(interventions, variant), np.arange(6))
    alone = rows_of(variant, interventions, run)
    real = np.asarray(mask, bool)
    for row, (got, want) in enumerate(zip(together, alone, strict=True)):
        for a, b in zip(got, want, strict=True):
            a, b = np.asarray(a), np.asarray(b)
            if a.ndim == 3:  # resid [L, T, D]: real tokens only
                a, b = a[:, real[row]], b[:, real[row]]
            elif a.shape[0] == real.shape[1]:  # logits [T, V]
                a, b = a[real[row]], b[real[row]]
            assert np.max(np.abs(a - b)) < TOL * max(1.0, np.abs(b).max())
    # the interventions differ: a shared one would not give these rows
    shared = run(interventions[0], np.arange(6))
    assert np.abs(np.asarray(shared[0][0]) - np.asarray(together[0][0]))[real[0]].max() > 1e-2


def test_changing_the_mix_does_not_recompile(tiny_chat_llama, interventions):
    lm = tiny_chat_llama
    ids, mask = padded_batch(lm.config.vocab_size, [5, 5, 5, 5], seed=4)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    positions = default_positions(mask)
    steering = Steering.per_row(interventions, [0, 1, 2, 3])
    first = forward(lm.graphdef, lm.params, ids, positions, mask, steering=steering)
    size = forward._cache_size()
    other = [
        Steering.addition(lm.config, np.ones(lm.config.hidden_size), layers=[2], scale=-3.0),
        *interventions[1:],
    ]
    for spec in (Steering.per_row(interventions, [3, 3, 0, 1]), Steering.per_row(other, [0] * 4)):
        out = forward(lm.graphdef, lm.params, ids, positions, mask, steering=spec)
        assert np.abs(np.asarray(out.logits - first.logits)).max() > 1e-3
    assert forward._cache_size() == size
    # the position modes are data too
    forward(lm.graphdef, lm.params, ids, positions, mask, steering=steering.at_positions("prompt"))
    assert forward._cache_size() == size


@pytest.mark.parametrize("mesh", [None, {"data": 1}])
def test_generation_rows_equal_their_intervention_alone(tiny_chat_llama, interventions, mesh):
    """Greedy tokens and logprobs per row, with the rows' own prompt lengths, position modes
    ("generated" applies to decode steps only) and the padding of a mesh's row split."""
    lm = tiny_chat_llama
    if mesh is not None:
        lm = lm.on_mesh(make_mesh(mesh))
    r = np.random.default_rng(5)
    prompts = [r.integers(3, lm.config.vocab_size, n).tolist() for n in (4, 7, 5, 6, 3)]
    variant = [2, 2, 0, 1, 3]
    kw = dict(max_new_tokens=6, eos_ids=[])

    def run(steering, rows):
        out = generate_ids(lm, [prompts[i] for i in rows], steering, **kw)
        return list(zip(out.tokens, out.logprobs, strict=True))

    together = run(Steering.per_row(interventions, variant), range(5))
    alone = rows_of(variant, interventions, run)
    for (tokens, lps), (want_tokens, want_lps) in zip(together, alone, strict=True):
        assert tokens == want_tokens
        np.testing.assert_allclose(lps, want_lps, atol=1e-4, rtol=0)
    assert len({tuple(t) for t, _ in together}) > 2  # the interventions changed the tokens


def test_number_scores_rows_equal_their_intervention_alone(tiny_chat_llama, interventions):
    lm = tiny_chat_llama
    trie = number_trie(lm.tokenizer, lm.config.vocab_size, TokenText(lm.tokenizer).bytes)
    r = np.random.default_rng(6)
    prompts = [r.integers(3, lm.config.vocab_size, n).tolist() for n in (5, 8, 6)]
    variant = [1, 0, 2]

    def run(steering, rows):
        return list(number_logprobs(lm, [prompts[i] for i in rows], trie, steering).logprobs)

    together = run(Steering.per_row(interventions, variant), range(3))
    alone = rows_of(variant, interventions, run)
    np.testing.assert_allclose(np.stack(together), np.stack(alone), atol=1e-4, rtol=0)


def test_bad_per_row_steering_is_refused(tiny_chat_llama, interventions):
    lm = tiny_chat_llama
    with pytest.raises(ValueError, match=r"variant \[0, 4\] outside 0..3"):
        Steering.per_row(interventions, [0, 4])
    masked = interventions[0].at_positions(np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="token mask"):
        Steering.per_row([masked], [0, 0])
    with pytest.raises(ValueError, match="before Steering.per_row"):
        Steering.per_row(interventions, [0, 1]) + interventions[0]
    with pytest.raises(ValueError, match="names 2 rows for 3 prompts"):
        generate_ids(lm, [[5, 6]] * 3, Steering.per_row(interventions, [0, 1]), max_new_tokens=2)


def test_sampled_rows_keep_their_streams_when_packed(tiny_chat_llama, interventions):
    """Rows of two differently seeded batches, each with its own intervention, packed into one
    batch in another order with their `(seed, lane)` streams, sample the tokens their own
    batches sampled (temperature 1, nucleus 0.9)."""
    lm = tiny_chat_llama
    r = np.random.default_rng(8)
    batch_a = [r.integers(3, lm.config.vocab_size, n).tolist() for n in (4, 7, 5)]
    batch_b = [r.integers(3, lm.config.vocab_size, n).tolist() for n in (6, 3, 5, 4)]
    kw = dict(max_new_tokens=6, eos_ids=[], temperature=1.0, top_p=0.9)
    alone_a = generate_ids(lm, batch_a, interventions[0], seed=11, **kw).tokens
    alone_b = generate_ids(lm, batch_b, interventions[1], seed=12, **kw).tokens
    order = [("b", 2), ("a", 0), ("b", 0), ("a", 2), ("b", 3), ("a", 1), ("b", 1)]
    prompts = [(batch_a if s == "a" else batch_b)[i] for s, i in order]
    streams = [(11 if s == "a" else 12, i) for s, i in order]
    variant = [0 if s == "a" else 1 for s, _ in order]
    packed = generate_ids(
        lm, prompts, Steering.per_row(interventions, variant), streams=streams, **kw
    ).tokens
    want = [(alone_a if s == "a" else alone_b)[i] for s, i in order]
    assert packed == want
    # the streams matter: the default streams (seed 0, lane = row) sample other tokens
    other = generate_ids(lm, prompts, Steering.per_row(interventions, variant), **kw).tokens
    assert other != want
