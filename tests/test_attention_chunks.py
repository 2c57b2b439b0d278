"""Query-chunked attention (`chunked_attention`, `RunOptions.query_chunk`) against one-shot
attention.

Every model function runs twice on the same parameters: with `RunOptions(query_chunk=CHUNK)`
(calls of `T > CHUNK` queries loop over chunks) and as shipped (`T <= 512`: one shot).
Every comparison also checks, in the jaxpr, that the chunk loop ran (or did not), so none
passes with chunking silently unused. `T = 11` is not a multiple of `CHUNK = 3` and its 4
chunks differ from the 3 layers of the tiny Llama (loop trip counts tell them apart)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import emgeo_jax
from emgeo_jax.models.attention import chunked_attention
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import LoraInput, default_positions, init_cache
from emgeo_jax.models.lm import (
    decode_step,
    forward,
    init_params,
    prefill,
    score_tree,
    train_forward,
)
from emgeo_jax.models.scan import RunOptions
from emgeo_jax.models.taps import Taps
from emgeo_jax.parallel import make_mesh
from emgeo_jax.plan import make_plan
from tests.tiny_models import LLAMA, hf_forward, hf_model, padded_batch, save_hf_folder

CHUNK = 3
TOL = 1e-5


def scan_lengths(fn, *args) -> list[int]:
    """Trip counts of every `scan` (the layer scan, `lax.map` over chunks) in `fn`'s jaxpr."""
    lengths = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                lengths.append(eqn.params["length"])
            for p in eqn.params.values():
                for sub in p if isinstance(p, tuple | list) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return sorted(lengths)


def numpy_attention(q, k, v, mask):
    """Independent reference: `q [B, T, H, Dh]`, `k, v [B, K, S, Dh]` (query head h reads
    key/value head h // (H / K)), `mask [B, T, S]`."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, dh = q.shape
    q = q.reshape(b, t, k.shape[1], h // k.shape[1], dh)
    scores = np.einsum("btkgd,bksd->bkgts", q, k) / np.sqrt(dh)
    scores = np.where(np.asarray(mask)[:, None, None], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, dh)


def random_qkv(b=2, t=11, s=11, k=2, g=3, dh=8, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, k * g, dh)), jnp.float32)
    key, value = (jnp.asarray(r.normal(size=(b, k, s, dh)), jnp.float32) for _ in range(2))
    mask = r.random((b, t, s)) < 0.6
    mask[0, 2] = False  # a fully masked row (a left-padding query): uniform, finite
    return q, key, value, jnp.asarray(mask)


def test_chunked_attention_matches_numpy_and_one_shot():
    q, k, v, mask = random_qkv()
    chunked = chunked_attention(q, k, v, mask, CHUNK)
    np.testing.assert_allclose(chunked, numpy_attention(q, k, v, mask), atol=1e-5, rtol=0)
    one_shot = chunked_attention(q, k, v, mask, 11)
    assert np.max(np.abs(chunked - one_shot)) < TOL
    assert scan_lengths(lambda q: chunked_attention(q, k, v, mask, CHUNK), q) == [4]
    assert scan_lengths(lambda q: chunked_attention(q, k, v, mask, 11), q) == []


def test_chunked_attention_keeps_bfloat16_probabilities():
    q, k, v, mask = (a.astype(jnp.bfloat16) if a.dtype != bool else a for a in random_qkv())
    chunked = chunked_attention(q, k, v, mask, CHUNK)
    assert chunked.dtype == jnp.bfloat16
    ref = numpy_attention(q, k, v, mask)
    assert np.max(np.abs(np.asarray(chunked, np.float32) - ref)) < 0.05
    one_shot = np.asarray(chunked_attention(q, k, v, mask, 11), np.float32)
    np.testing.assert_array_equal(np.asarray(chunked, np.float32), one_shot)


@pytest.mark.parametrize("grad", [False, True])
def test_chunks_bound_compiled_temporaries(grad):
    """The point of chunking: the compiler's temporaries shrink (forward, and backward
    thanks to the per-chunk `jax.checkpoint`: otherwise the loop would keep every chunk's
    probabilities, as many bytes as the one-shot scores)."""
    q, k, v, mask = random_qkv(b=1, t=256, s=256, k=2, g=2, dh=8)
    scores = 4 * 256 * 256 * 4  # [B, H, T, S] float32

    def temp(chunk):
        def f(q, k, v):
            return jnp.sum(jnp.sin(chunked_attention(q, k, v, mask, chunk)))

        fn = jax.jit(jax.grad(f, argnums=(0, 1, 2)) if grad else f)
        return fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    one_shot, chunked = temp(256), temp(32)
    assert one_shot > scores
    assert chunked < one_shot / 3


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.from_hf(LLAMA, source="tests.tiny_models.LLAMA")


CHUNKED = RunOptions(query_chunk=CHUNK)
ONE_SHOT = RunOptions()  # T <= 512: one shot


@pytest.fixture(scope="module")
def params(cfg):
    """`(graphdef, params)` of the tiny Llama."""
    return init_params(cfg, seed=3)


def assert_close_trees(a, b, relative=False):
    """Every leaf within `TOL` (times the leaf's largest magnitude if `relative`, for
    gradients, whose float32 sums reach tens)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape
        x, y = np.asarray(x), np.asarray(y)
        scale = max(1.0, float(np.max(np.abs(y), initial=0.0))) if relative else 1.0
        assert np.max(np.abs(x - y), initial=0.0) < TOL * scale


def run_both(cfg, fn, queries, *args):
    """`fn(options, *args)` with `CHUNKED` and `ONE_SHOT`; checks that loops over the chunks
    of `queries` tokens ran in the chunked call only (besides the layer scans and, under
    `jax.grad`, their transposes)."""
    chunks = -(-queries // CHUNK)
    assert set(scan_lengths(lambda *a: fn(CHUNKED, *a), *args)) == {cfg.num_layers, chunks}
    assert set(scan_lengths(lambda *a: fn(ONE_SHOT, *a), *args)) == {cfg.num_layers}
    return fn(CHUNKED, *args), fn(ONE_SHOT, *args)


def test_causal_left_padded_forward_matches(params, cfg):
    ids, mask = padded_batch(cfg.vocab_size, [11, 7, 3], seed=1)
    positions = default_positions(jnp.asarray(mask))

    def fn(options, ids, positions, mask):
        return forward(*params, ids, positions, mask, taps=Taps(resid="full"), options=options)

    a, b = run_both(cfg, fn, 11, jnp.asarray(ids), positions, jnp.asarray(mask))
    assert_close_trees((a.logits, a.resid_post), (b.logits, b.resid_post))


def test_cached_prefill_and_decode_match(params, cfg):
    ids, mask = padded_batch(cfg.vocab_size, [11, 6], seed=2)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    positions = default_positions(mask)
    cache = init_cache(cfg, batch=2, length=16)

    def fill(options, ids, positions, mask):
        return prefill(*params, cache, ids, positions, mask, options=options)

    a, b = run_both(cfg, fill, 11, ids, positions, mask)
    assert_close_trees(a, b)
    # a decode step (T = 1) takes the one-shot path in both
    cache, logits = a
    step = (jnp.argmax(logits, -1), positions[:, -1] + 1)

    def decode(options, *step):
        return decode_step(*params, cache, *step, options=options)

    assert scan_lengths(lambda *s: decode(CHUNKED, *s), *step) == [cfg.num_layers]
    assert_close_trees(decode(CHUNKED, *step).logits, decode(ONE_SHOT, *step).logits)


def test_tree_attention_mask_matches(params, cfg):
    """`score_tree`'s ancestor mask reaches the chunks: after a 2-token prompt, a root and
    two branches of 4 and 5 tokens (10 nodes: 4 chunks), each branch blind to the other."""
    r = np.random.default_rng(4)
    prompt = jnp.asarray(r.integers(1, cfg.vocab_size, (1, 2)), jnp.int32)
    nodes = jnp.asarray(r.integers(1, cfg.vocab_size, (1, 10)), jnp.int32)
    depth = np.r_[0, 1:5, 1:6]
    parent = np.r_[0, 0:4, 0, 5:9]
    ancestors = np.eye(10, dtype=bool)
    for i in range(1, 10):
        ancestors[i] = ancestors[parent[i]]
        ancestors[i, i] = True

    def fn(options, nodes, depth, ancestors):
        m = nodes.shape[1]
        cache = init_cache(cfg, batch=1, length=2 + m)
        ones = jnp.ones((1, 2), jnp.int32)
        cache, _ = prefill(*params, cache, prompt, default_positions(ones), ones)
        return score_tree(*params, cache, nodes, 2 + depth, ancestors, options=options)

    args = nodes, jnp.asarray(depth[None]), jnp.asarray(ancestors[None])
    a, b = run_both(cfg, fn, 10, *args)
    assert_close_trees(a, b)
    # the tree mask mattered: branch 2 alone (root + its 5 nodes) gives the same logits
    alone = np.r_[0, 5:10]
    c = fn(
        CHUNKED, nodes[:, alone], args[1][:, alone], jnp.asarray(ancestors[alone][:, alone])[None]
    )
    assert np.max(np.abs(np.asarray(a[:, 5:]) - np.asarray(c[:, 1:]))) < TOL
    assert np.max(np.abs(np.asarray(a[:, 1:5]) - np.asarray(c[:, 1:5]))) > 1e-3


@pytest.mark.parametrize("remat", [False, True])
def test_gradients_wrt_params_and_lora_match(params, cfg, remat):
    r = np.random.default_rng(5)
    d, n, rank = cfg.hidden_size, cfg.num_layers, 2
    outs = {"q_proj": cfg.num_heads * cfg.head_dim, "v_proj": cfg.num_kv_heads * cfg.head_dim}
    factors = {
        name: {
            "a": jnp.asarray(0.1 * r.normal(size=(n, d, rank)), jnp.float32),
            "b": jnp.asarray(0.1 * r.normal(size=(n, rank, out)), jnp.float32),
        }
        for name, out in outs.items()
    }
    ids, mask = padded_batch(cfg.vocab_size, [11, 9], seed=6)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    positions = default_positions(mask)
    weights = jnp.asarray(r.normal(size=(*ids.shape, cfg.vocab_size)), jnp.float32)
    graphdef, values = params

    def grads(options, ids, positions, mask):
        options = dataclasses.replace(options, remat=remat)

        def loss(values, factors):
            logits = train_forward(
                graphdef, values, ids, positions, mask, lora=LoraInput(factors), options=options
            )
            return jnp.sum(logits * weights)

        return jax.grad(loss, argnums=(0, 1))(values, factors)

    a, b = run_both(cfg, grads, 11, ids, positions, mask)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(b)) > 1.0  # not trivial
    assert_close_trees(a, b, relative=True)


def test_logits_match_transformers_with_small_chunks(tmp_path):
    model = hf_model(LLAMA)
    folder = save_hf_folder(model, tmp_path / "llama")
    lm = emgeo_jax.load(folder)
    ids, mask = padded_batch(LLAMA["vocab_size"], [11, 7, 3, 11], seed=1)
    ref_logits, _, _ = hf_forward(model, ids, mask)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    positions = default_positions(mask)

    def run(*a):
        return forward(lm.graphdef, lm.params, *a, options=CHUNKED)

    assert scan_lengths(run, ids, positions, mask) == sorted([LLAMA["num_hidden_layers"], 4])
    real = np.asarray(mask, bool)
    logits = np.asarray(run(ids, positions, mask).logits)
    np.testing.assert_allclose(logits[real], ref_logits[real], atol=1e-4, rtol=0)


def test_plan_counts_every_chunk(cfg):
    """XLA counts a loop body once; the plan's FLOPs must not drop when attention loops.
    An extraction's FLOPs are exactly quadratic in the length `T` (projections linear,
    scores and mixing quadratic): fitted on three one-shot lengths (`T <= 512`), they
    predict the count at `T = 520`, where attention runs in two query chunks."""
    mesh = make_mesh({}, jax.devices()[:1])

    def flops(seq):
        return make_plan(cfg, mesh, task="extract", batch=1, seq=seq, dtype="float32")

    seqs = np.asarray([128.0, 320.0, 512.0])
    fit = np.polyfit(seqs, [flops(int(s)).flops_per_device for s in seqs], 2)
    assert ONE_SHOT.query_chunk < 520
    assert flops(520).flops_per_device == pytest.approx(np.polyval(fit, 520.0), rel=1e-3)
