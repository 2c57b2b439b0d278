"""Query-chunked attention (`chunked_attention`, `QUERY_CHUNK`) against one-shot attention.

Models are built twice from the same parameters: with the chunk size patched to `CHUNK`
(calls of `T > CHUNK` queries loop over chunks) and as shipped (`T <= QUERY_CHUNK`: one
shot). Every comparison also checks, in the jaxpr, that the chunk loop ran (or did not), so
none passes with chunking silently unused. `T = 11` is not a multiple of `CHUNK = 3` and
its 4 chunks differ from the 3 layers of the tiny Llama (loop trip counts tell them apart)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import emgeo_jax
from emgeo_jax.models import llama
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import LoraInput, chunked_attention, init_cache
from emgeo_jax.models.lm import forward, init_params
from emgeo_jax.parallel import make_mesh
from emgeo_jax.plan import make_plan
from emgeo_jax.models.taps import Taps
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
    """Independent reference: `q [B, T, K, G, Dh]`, `k, v [B, S, K, Dh]`, `mask [B, T, S]`."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("btkgd,bskd->bkgts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.asarray(mask)[:, None, None], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bkgts,bskd->btkgd", probs, v)


def random_qkv(b=2, t=11, s=11, k=2, g=3, dh=8, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, k, g, dh)), jnp.float32)
    key, value = (jnp.asarray(r.normal(size=(b, s, k, dh)), jnp.float32) for _ in range(2))
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
    scores = 4 * 256 * 256 * 4  # [B, K, G, T, S] float32

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


@pytest.fixture(scope="module")
def models(cfg):
    """`(chunked graphdef, one-shot graphdef, params)`: the same weights."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llama, "QUERY_CHUNK", CHUNK)
        chunked, params = init_params(cfg, seed=3)
    one_shot, _ = init_params(cfg, seed=3)
    assert chunked != one_shot  # the chunk size is static: jit compiles each on its own
    return chunked, one_shot, params


def assert_close_trees(a, b, relative=False):
    """Every leaf within `TOL` (times the leaf's largest magnitude if `relative`, for
    gradients, whose float32 sums reach tens)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape
        x, y = np.asarray(x), np.asarray(y)
        scale = max(1.0, float(np.max(np.abs(y), initial=0.0))) if relative else 1.0
        assert np.max(np.abs(x - y), initial=0.0) < TOL * scale


def run_both(models, cfg, fn, *args):
    """`fn(graphdef, params, *args)` with both graphdefs; checks that loops over the chunks
    of `T = args[0].shape[1]` queries ran in the chunked one only (besides the layer scan
    and, under `jax.grad`, its transpose)."""
    chunked, one_shot, params = models
    chunks = -(-args[0].shape[1] // CHUNK)
    assert set(scan_lengths(lambda *a: fn(chunked, params, *a), *args)) == {cfg.num_layers, chunks}
    assert set(scan_lengths(lambda *a: fn(one_shot, params, *a), *args)) == {cfg.num_layers}
    return fn(chunked, params, *args), fn(one_shot, params, *args)


def test_causal_left_padded_forward_matches(models, cfg):
    ids, mask = padded_batch(cfg.vocab_size, [11, 7, 3], seed=1)
    positions = llama.default_positions(jnp.asarray(mask))

    def fn(graphdef, params, ids, positions, mask):
        return forward(graphdef, params, ids, positions, mask, taps=Taps(resid="full"))

    a, b = run_both(models, cfg, fn, jnp.asarray(ids), positions, jnp.asarray(mask))
    assert_close_trees((a.logits, a.resid_post), (b.logits, b.resid_post))


def test_cached_prefill_and_decode_match(models, cfg):
    ids, mask = padded_batch(cfg.vocab_size, [11, 6], seed=2)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    positions = llama.default_positions(mask)
    cache = init_cache(cfg, batch=2, length=16)

    def prefill(graphdef, params, ids, positions, mask):
        return forward(graphdef, params, ids, positions, mask, cache=cache)

    a, b = run_both(models, cfg, prefill, ids, positions, mask)
    assert_close_trees((a.logits, a.cache), (b.logits, b.cache))
    # a decode step (T = 1) takes the one-shot path in both models
    chunked, one_shot, params = models
    step = (jnp.argmax(a.logits[:, -1:], -1), positions[:, -1:] + 1, jnp.ones((2, 1), jnp.int32))

    def decode(graphdef, *args):
        return forward(graphdef, params, *args, cache=a.cache)

    assert scan_lengths(lambda *s: decode(chunked, *s), *step) == [cfg.num_layers]
    assert_close_trees(decode(chunked, *step).logits, decode(one_shot, *step).logits)


def test_tree_attention_mask_matches(models, cfg):
    """`attend [B, T, T]` (tree attention) reaches the chunks inside `mask`: two branches
    after a shared 5-token trunk, each blind to the other."""
    t = 11
    attend = np.ones((1, t, t), bool)
    attend[0, 5:8, 8:] = attend[0, 8:, 5:8] = False
    ids, mask = padded_batch(cfg.vocab_size, [t], seed=4)
    positions = jnp.asarray(np.r_[0:8, 5:8][None], jnp.int32)

    def fn(graphdef, params, ids, positions, mask, attend):
        return forward(graphdef, params, ids, positions, mask, attend=attend)

    args = jnp.asarray(ids), positions, jnp.asarray(mask), jnp.asarray(attend)
    a, b = run_both(models, cfg, fn, *args)
    assert_close_trees(a.logits, b.logits)
    # the tree mask mattered: branch 2 alone (trunk + branch) gives the same logits
    alone = np.r_[0:5, 8:11]
    c = fn(models[0], models[2], args[0][:, alone], positions[:, alone], args[2][:, alone], None)
    assert np.max(np.abs(np.asarray(a.logits[:, 8:]) - np.asarray(c.logits[:, 5:]))) < TOL


@pytest.mark.parametrize("remat", [False, True])
def test_gradients_wrt_params_and_lora_match(models, cfg, remat):
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
    positions = llama.default_positions(mask)
    weights = jnp.asarray(r.normal(size=(*ids.shape, cfg.vocab_size)), jnp.float32)

    def grads(graphdef, params, ids, positions, mask):
        def loss(params, factors):
            out = forward(
                graphdef, params, ids, positions, mask, lora=LoraInput(factors), remat=remat
            )
            return jnp.sum(out.logits * weights)

        return jax.grad(loss, argnums=(0, 1))(params, factors)

    a, b = run_both(models, cfg, grads, ids, positions, mask)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(b)) > 1.0  # not trivial
    assert_close_trees(a, b, relative=True)


def test_logits_match_transformers_with_small_chunks(tmp_path, monkeypatch):
    model = hf_model(LLAMA)
    folder = save_hf_folder(model, tmp_path / "llama")
    monkeypatch.setattr(llama, "QUERY_CHUNK", CHUNK)
    lm = emgeo_jax.load(folder)
    ids, mask = padded_batch(LLAMA["vocab_size"], [11, 7, 3, 11], seed=1)
    ref_logits, _, _ = hf_forward(model, ids, mask)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    positions = llama.default_positions(mask)
    assert scan_lengths(
        lambda *a: forward(lm.graphdef, lm.params, *a), ids, positions, mask
    ) == sorted([LLAMA["num_hidden_layers"], 4])
    real = np.asarray(mask, bool)
    logits = np.asarray(lm.forward(ids, mask).logits)
    np.testing.assert_allclose(logits[real], ref_logits[real], atol=1e-4, rtol=0)


def test_plan_counts_every_chunk(cfg, monkeypatch):
    """XLA counts a loop body once; the plan's FLOPs must not drop when attention loops."""
    mesh = make_mesh({}, jax.devices()[:1])
    kw = dict(task="extract", batch=2, seq=16, dtype="float32")
    one_shot = make_plan(cfg, mesh, **kw)
    monkeypatch.setattr(llama, "QUERY_CHUNK", CHUNK)
    chunked = make_plan(cfg, mesh, **kw)
    assert chunked.flops_per_device == pytest.approx(one_shot.flops_per_device, rel=1e-3)
