"""Unstacked layers (`LM.unstacked`, MaxText's `scan_layers=false` for inference): every
inference function gives what the stacked model gives, and a decode step reads the weights
and the KV cache in place (checked in the compiled HLO; the stacked scan is the positive
control: it does slice each layer's weights out of the stack)."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emgeo_jax.generate import generate_ids
from emgeo_jax.generate.layout import place_prompts
from emgeo_jax.generate.loop import decode, decode_inputs, prefill
from emgeo_jax.generate.numbers import number_logprobs, number_trie
from emgeo_jax.generate.sampling import SamplingParams
from emgeo_jax.models.steering import Steering
from emgeo_jax.models.taps import Taps
from emgeo_jax.serve import TokenText
from tests.tiny_models import padded_batch

# instructions that materialise a (part of a) buffer: `%name = f32[2,3]{1,0} copy(...)`
MATERIALISE = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* (copy|slice|dynamic-slice|transpose)\(")


@pytest.fixture(scope="module")
def models(tiny_chat_llama):
    return tiny_chat_llama, tiny_chat_llama.unstacked()


@pytest.fixture(scope="module")
def steering(tiny_chat_llama):
    cfg = tiny_chat_llama.config
    r = np.random.default_rng(0)
    return Steering.per_row(
        [
            Steering.addition(cfg, r.normal(size=cfg.hidden_size), layers=[0, 2], scale=4.0),
            Steering.ablation(cfg, r.normal(size=(2, cfg.hidden_size)), layers=[1]),
        ],
        [0, 1, 0],
    )


def test_unstacking_keeps_every_weight(models):
    stacked, unstacked = models
    assert stacked.scan_layers and not unstacked.scan_layers
    assert unstacked.param_count() == stacked.param_count()
    layers = nnx.to_pure_dict(stacked.params)["layers"]
    blocks = nnx.to_pure_dict(unstacked.params)["layers"]
    assert sorted(blocks) == list(range(stacked.config.num_layers))
    for i, block in blocks.items():
        jax.tree.map(lambda x, y, i=i: np.testing.assert_array_equal(x, y[i]), block, layers)


def test_forward_and_resume_equal_the_stacked_model(models, steering):
    stacked, unstacked = models
    ids, mask = padded_batch(stacked.config.vocab_size, [7, 5, 9], seed=3)
    taps = Taps(resid="full", mlp="pooled", attn="last")
    a, b = (m.forward(ids, mask, steering=steering, taps=taps) for m in models)
    for field in ("logits", "resid_post", "mlp_out", "attn_out", "counts"):
        np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-6, atol=1e-6)
    resid = a.resid_post[0]
    a, b = (m.forward(ids, mask, resid_in=resid, start_layer=1) for m in models)
    np.testing.assert_allclose(b.resid_post, a.resid_post, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b.logits, a.logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(temperature=1.0, top_p=0.9, seed=4),
        dict(monitor=(1, np.ones(64)), top_logprobs=3),
    ],
    ids=["greedy", "sampled", "monitor"],
)
def test_generation_equals_the_stacked_model(models, steering, kw):
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]
    a, b = (generate_ids(m, prompts, steering, max_new_tokens=6, eos_ids=[], **kw) for m in models)
    assert b.tokens == a.tokens
    for x, y in zip(b.logprobs, a.logprobs, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    if "monitor" in kw:
        for x, y in zip(b.projections, a.projections, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_number_scores_equal_the_stacked_model(models, steering):
    lm = models[0]
    trie = number_trie(lm.tokenizer, lm.config.vocab_size, TokenText(lm.tokenizer).bytes)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    a, b = (number_logprobs(m, prompts, trie, steering) for m in models)
    for field in ("logprobs", "top_logprobs"):
        np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(b.top_ids, a.top_ids)


def materialised(lm, batch: int = 2, prompt: int = 8, new: int = 4) -> list[tuple[int, ...]]:
    """Shapes of every copy/slice/dynamic-slice/transpose in the compiled decode loop of `lm`."""
    cfg = lm.config
    ids = np.full((batch, prompt), 5, np.int32)
    ids, mask, cache, _ = place_prompts(lm, ids, np.ones_like(ids), prompt + new + 1)
    steering = Steering.none(cfg)
    cache, logits, position = prefill(lm.graphdef, lm.params, ids, mask, steering, cache)
    compiled = decode.lower(
        lm.graphdef,
        lm.params,
        cache,
        steering,
        decode_inputs(cfg, logits, position, [2]),
        SamplingParams.make(0.0, 1.0, 0, rows=batch),
        max_new_tokens=new,
        top_k=0,
        monitor=False,
    ).compile()
    return materialised_in(compiled.as_text())


def materialised_in(hlo: str) -> list[tuple[int, ...]]:
    found = MATERIALISE.findall(hlo)
    assert found, "no copy or slice at all: the pattern no longer matches XLA's HLO text"
    return [tuple(int(d) for d in dims.split(",") if d) for _, dims, _ in found]


def test_a_decode_step_reads_weights_and_cache_in_place(models):
    stacked, unstacked = models
    cfg = stacked.config
    weights = {
        shape
        for leaf in jax.tree.leaves(stacked.params["layers"])
        for shape in (leaf.shape[1:], (1, *leaf.shape[1:]))
        if leaf.ndim > 2  # matrices; vectors [D] are too common a shape to tell apart
    }
    layer_cache = (2, cfg.num_kv_heads, 8 + 4 + 1, cfg.head_dim)
    caches = {layer_cache, (1, *layer_cache), (cfg.num_layers, *layer_cache)}
    scan = materialised(stacked)
    assert weights & set(scan), "positive control: the scan slices weights out of the stack"
    assert caches & set(scan), "positive control: the scan slices each layer's cache"
    loop = materialised(unstacked)
    assert not weights & set(loop), sorted(weights & set(loop))
    assert not caches & set(loop), sorted(caches & set(loop))
    # nor a transposed copy of a layer's keys or values: the head-major cache is what the
    # attention's dots read (any array of a layer cache's size, whatever its dims)
    size = math.prod(layer_cache)
    assert not [x for x in loop if math.prod(x) == size], loop
    # (the positive control: attention over a sequence-major [B, S, K, Dh] cache, as the
    # model kept it before, copies it into a transposed layout on this backend)
    b, k, s, dh = layer_cache
    q = jnp.zeros((b, 1, cfg.num_heads, dh))
    seq_major = jax.ShapeDtypeStruct((b, s, k, dh), jnp.float32)
    hlo = jax.jit(jax.nn.dot_product_attention).lower(q, seq_major, seq_major).compile()
    assert [x for x in materialised_in(hlo.as_text()) if math.prod(x) == size]


def test_the_decode_loop_updates_the_cache_buffers_in_place(tiny_chat_llama):
    """The per-layer cache is donated to the decode loop and comes back as the same buffers
    (no copy of the whole cache per call)."""
    lm = tiny_chat_llama.unstacked()
    cfg = lm.config
    ids = jnp.full((2, 8), 5, jnp.int32)
    ids, mask, cache, _ = place_prompts(lm, np.asarray(ids), np.ones((2, 8), np.int32), 13)
    assert isinstance(cache.k, tuple) and len(cache.k) == cfg.num_layers
    steering = Steering.none(cfg)
    cache, logits, position = prefill(lm.graphdef, lm.params, ids, mask, steering, cache)
    before = [x.unsafe_buffer_pointer() for x in (*cache.k, *cache.v)]
    out = decode(
        lm.graphdef,
        lm.params,
        cache,
        steering,
        decode_inputs(cfg, logits, position, [2]),
        SamplingParams.make(0.0, 1.0, 0, rows=2),
        max_new_tokens=4,
        top_k=0,
        monitor=False,
    )
    after = [x.unsafe_buffer_pointer() for x in (*out.cache.k, *out.cache.v)]
    assert after == before


def test_training_refuses_unstacked_layers(models, tmp_path):
    from emgeo_jax.train.lora import LoraSpec
    from emgeo_jax.train.run import train
    from emgeo_jax.train.sft import TrainConfig

    spec = LoraSpec(rank=2, alpha=4.0, targets=("down",), layers=(1,))
    with pytest.raises(ValueError, match="stacked layers"):
        train(models[1], [], spec, TrainConfig(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_extraction_equals_the_stacked_model(models, chat_tokenizer):
    """Extraction places the params on its mesh (`place_params`): unstacked blocks are split
    as their row of the stacked parameter, and the sums come out the same."""
    from emgeo_jax.data import load_examples, shipped_contrast_path, tokenize_examples
    from emgeo_jax.extract import ExtractSettings, extract

    examples, _ = load_examples(shipped_contrast_path())
    examples = [e for e in examples if e.label == 0][:3] + [e for e in examples if e.label][:3]
    tokenized = tokenize_examples(examples, chat_tokenizer, max_length=512)[0]
    settings = ExtractSettings(layers=(0, 2), per_example=True, batch_size=4)
    a, b = (extract(m, tokenized, settings) for m in models)
    np.testing.assert_allclose(b.token_sum, a.token_sum, rtol=1e-5)
    np.testing.assert_allclose(b.pooled, a.pooled, rtol=1e-5, atol=1e-6)
