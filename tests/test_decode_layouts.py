"""`benchmarks/decode_layouts.py`'s decode-step variants compute what they claim: the
model's head-major cache with its attention gives the logits of the sequence-major cache
through `jax.nn.dot_product_attention` (an independent implementation), the no-attention
bound differs, and the timing reports every variant and the floor. Tiny random models;
seconds."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.decode_layouts import VARIANTS, compare, decode_step, random_caches
from benchmarks.generate import floor_weights
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import LM, init_params
from tests.tiny_models import LLAMA, QWEN2


@pytest.mark.parametrize("spec", [LLAMA, QWEN2], ids=["llama", "qwen2"])
def test_layouts_agree_and_the_bound_drops_attention(spec):
    cfg = ModelConfig.from_hf(spec)
    lm = LM(cfg, *init_params(cfg, seed=2)).unstacked()
    blocks, head = floor_weights(lm)
    scale = nnx.to_pure_dict(lm.params)["final_norm"]["scale"]
    batch, slots = 3, 11
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, cfg.hidden_size)), jnp.float32)
    mask = np.ones((batch, slots), bool)
    mask[0, :4] = False  # a left-padded row
    logits, caches = {}, {}
    for v in VARIANTS:
        logits[v], caches[v] = decode_step(lm, v)(
            blocks, head, scale, random_caches(lm, batch, slots, v), x, jnp.int32(7),
            jnp.asarray(mask),
        )  # fmt: skip
    np.testing.assert_allclose(logits["bksd"], logits["bskd"], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(logits["no_attn"] - logits["bksd"])).max() > 1e-3
    # this step's keys were written at slot 7 in both layouts, the rest left as they were
    k_bskd, k_bksd = caches["bskd"][1][0], caches["bksd"][1][0]
    np.testing.assert_allclose(k_bksd.transpose(0, 2, 1, 3), k_bskd, atol=1e-5)
    before = random_caches(lm, batch, slots, "bskd")[1][0]
    changed = np.any(np.asarray(k_bskd != before), axis=(0, 2, 3))
    assert changed.tolist() == [s == 7 for s in range(slots)]


def test_compare_times_every_variant_and_the_floor():
    cfg = ModelConfig.from_hf(LLAMA)
    lm = LM(cfg, *init_params(cfg, seed=2)).unstacked()
    t = compare(lm, batch=2, slots=9, repeats=2)
    assert list(t) == [*VARIANTS, "floor"] and all(s > 0 for s in t.values())
