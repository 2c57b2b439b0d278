"""bfloat16 numerics: bf16 parameters and activations with float32 attention scores/softmax,
RMSNorm statistics and logits (as on accelerators), against transformers run in bf16 (torch,
CPU) and against our own float32; extraction and steering in bf16 against float32.

Tolerances are relative to the largest |value| of the float32 reference (per layer for the
residual stream): bf16 keeps 8 significant bits, so one rounding of a value near the top of
the range is up to 2^-8 = 0.4% of it. Measured on the tiny models (tests/tiny_models.py,
batch [11, 7, 3, 11] left-padded): ours vs transformers-bf16 at most 1.3% (residual) and 1.6%
(logits); both bf16 implementations are equally far from float32 (ratio of RMS errors
0.97-1.16). README "bf16 numerics" has the table, SmolLM2 included.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import emgeo_jax
from emgeo_jax.data import load_examples, shipped_contrast_path, tokenize_examples
from emgeo_jax.extract import ExtractSettings, extract
from emgeo_jax.models.attention import attend
from emgeo_jax.models.llama import RMSNorm
from emgeo_jax.models.lm import LM, abstract_model
from emgeo_jax.models.steering import Steering
from tests.tiny_models import LLAMA, QWEN2, hf_forward, hf_model, padded_batch, save_hf_folder

REL_TOL = 0.03  # max |ours_bf16 - transformers_bf16| / max |float32 reference|
RMS_RATIO = 2.0  # RMS error vs float32: ours_bf16 at most this times transformers_bf16's
MIN_COSINE = 0.999  # mean-diff directions, bf16 vs float32, every layer


def _as_bf16(lm: LM) -> LM:
    """The same weights rounded to bfloat16, with the bf16 graph (compute dtype bf16)."""
    graphdef, _ = abstract_model(lm.config, "bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lm.params)
    return LM(lm.config, graphdef, params, tokenizer=lm.tokenizer, source=lm.source)


def torch_bf16():
    import torch

    return torch.bfloat16


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    spec = {"llama": LLAMA, "qwen2": QWEN2}[request.param]
    model = hf_model(spec)
    folder = save_hf_folder(model, tmp_path_factory.mktemp(request.param))
    return model, folder, spec


def test_bf16_matches_transformers_bf16(pair):
    model, folder, spec = pair
    ids, mask = padded_batch(spec["vocab_size"], [11, 7, 3, 11], seed=1)
    real = mask.astype(bool)
    ref_logits, ref_resid, _ = hf_forward(model, ids, mask)  # float32
    hf_logits, hf_resid, _ = hf_forward(copy.deepcopy(model).to(torch_bf16()), ids, mask)
    lm = emgeo_jax.load(folder, dtype="bfloat16")
    out = lm.forward(ids, mask)
    assert out.resid_post.dtype == jnp.bfloat16  # the residual stream stays bf16
    assert out.logits.dtype == jnp.float32
    logits = np.asarray(out.logits)
    resid = np.asarray(out.resid_post, np.float32)
    pairs = [(logits, hf_logits, ref_logits)]
    pairs += [(resid[l], hf_resid[l], ref_resid[l]) for l in range(spec["num_hidden_layers"])]
    for ours, theirs, ref in pairs:
        scale = np.max(np.abs(ref[real]))
        assert np.max(np.abs(ours[real] - theirs[real])) <= REL_TOL * scale
        ours_err, theirs_err = _rms(ours[real] - ref[real]), _rms(theirs[real] - ref[real])
        assert 0 < ours_err <= RMS_RATIO * theirs_err
    # the greedy next token agrees with float32 wherever float32's top-2 margin is clear
    top2 = np.sort(ref_logits[real], axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.1
    assert clear.sum() > 10
    agree = logits[real].argmax(-1) == ref_logits[real].argmax(-1)
    assert np.all(agree[clear])


def test_bf16_logits_are_float32_not_rounded(pair):
    _, folder, spec = pair
    ids, mask = padded_batch(spec["vocab_size"], [6, 6], seed=2)
    logits = np.asarray(emgeo_jax.load(folder, dtype="bfloat16").forward(ids, mask).logits)
    rounded = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(logits != rounded) > 0.9  # float32 accumulation, never rounded to bf16


def test_bf16_attention_scores_are_float32():
    """Hand-derived: scores 100 and 100.25 (x 1/sqrt(2)). Rounded to bf16 (8 bits: 100.25 ->
    100.0) both keys get weight 1/2; in float32 the second gets sigmoid(0.25/sqrt(2))."""
    q = jnp.asarray([1.0, 1.0], jnp.bfloat16).reshape(1, 1, 1, 2)
    k = jnp.asarray([[64.0, 36.0], [64.0, 36.25]], jnp.bfloat16).reshape(1, 1, 2, 2)
    v = jnp.asarray([[0.0, 0.0], [1.0, 1.0]], jnp.bfloat16).reshape(1, 1, 2, 2)
    out = attend(q, k, v, jnp.ones((1, 1, 2), bool))
    assert out.dtype == jnp.bfloat16
    expected = 1.0 / (1.0 + np.exp(-0.25 / np.sqrt(2.0)))  # 0.5441
    np.testing.assert_allclose(np.asarray(out, np.float32).ravel(), expected, atol=2e-3)


def test_bf16_rmsnorm_statistics_are_float32():
    """4096 values of 1 + 2^-9 * i: their mean square accumulated in bf16 would stall; ours
    matches float64 up to the final bf16 rounding of the output."""
    x64 = 1.0 + np.arange(4096) / 512.0
    x = jnp.asarray(x64, jnp.bfloat16)
    norm = RMSNorm(4096, 1e-6, param_dtype=jnp.bfloat16, rngs=None)
    got = np.asarray(norm(x[None]), np.float32)[0]
    xr = np.asarray(x, np.float64)
    want = xr / np.sqrt(np.mean(xr * xr) + 1e-6)
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=0)


# --- extraction and steering: bf16 against float32 on the shipped contrast pairs ----------


def _mean_diff(lm: LM, tokenized, steering: Steering | None = None) -> np.ndarray:
    """`[L, D]` misaligned-minus-aligned token-weighted answer means (float64)."""
    ext = extract(lm, tokenized, ExtractSettings(pool="answer", batch_size=8))
    means = ext.means("token")
    return means[1] - means[0]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def contrast_tokenized(chat_tokenizer):
    examples, _ = load_examples(shipped_contrast_path())
    return tokenize_examples(examples[:24], chat_tokenizer, max_length=256)[0]


def test_bf16_mean_diff_directions_match_float32(tiny_chat_llama, contrast_tokenized):
    f32 = _mean_diff(tiny_chat_llama, contrast_tokenized)
    bf16 = _mean_diff(_as_bf16(tiny_chat_llama), contrast_tokenized)
    cos = _cosines(f32, bf16)
    assert cos.shape == (tiny_chat_llama.config.num_layers,)
    assert np.all(cos >= MIN_COSINE), cos


def test_bf16_steering_effect_matches_float32(tiny_chat_llama):
    """Add a vector after block 0; the change it makes to the last block's output (all tokens
    of a padded batch) points the same way in bf16 as in float32."""
    cfg = tiny_chat_llama.config
    vec = np.random.default_rng(0).normal(size=cfg.hidden_size).astype(np.float32)
    steer = Steering.addition(cfg, vec, layers=[0], scale=2.0)
    ids, mask = padded_batch(cfg.vocab_size, [12, 8, 12], seed=4)
    real = mask.astype(bool)

    def effect(lm: LM) -> np.ndarray:
        base = np.asarray(lm.forward(ids, mask).resid_post[-1], np.float32)
        steered = np.asarray(lm.forward(ids, mask, steering=steer).resid_post[-1], np.float32)
        return (steered - base)[real]  # [tokens, D]

    f32, bf16 = effect(tiny_chat_llama), effect(_as_bf16(tiny_chat_llama))
    cos = _cosines(f32, bf16)
    assert np.all(cos >= MIN_COSINE), cos.min()


# --- the embedded default model ------------------------------------------------------------


@pytest.mark.slow
def test_default_model_bf16_matches_transformers_bf16(default_lm, hf_default):
    """SmolLM2-135M-Instruct, one short prompt (8 tokens), bf16 on both sides."""
    ids = np.asarray(default_lm.tokenizer("The capital of France is a city that")["input_ids"])
    ids, mask = ids[None], np.ones((1, len(ids)), np.int32)
    ref_logits, ref_resid, _ = hf_forward(hf_default, ids, mask)
    hf_logits, hf_resid, _ = hf_forward(copy.deepcopy(hf_default).to(torch_bf16()), ids, mask)
    out = _as_bf16(default_lm).forward(ids, mask)
    logits, resid = np.asarray(out.logits), np.asarray(out.resid_post, np.float32)
    layers = zip(resid, hf_resid, ref_resid, strict=True)
    for ours, theirs, ref in [(logits, hf_logits, ref_logits), *layers]:
        scale = np.max(np.abs(ref))
        assert np.max(np.abs(ours - theirs)) <= REL_TOL * scale
        assert _rms(ours - ref) <= RMS_RATIO * _rms(theirs - ref)
    top2 = np.sort(ref_logits[0], axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.5  # bf16 may flip near-ties of float32
    agree = logits[0].argmax(-1) == ref_logits[0].argmax(-1)
    assert clear.sum() >= 4 and np.all(agree[clear])


@pytest.mark.slow
def test_default_model_bf16_mean_diff_matches_float32(default_lm):
    examples, _ = load_examples(shipped_contrast_path())
    tokenized = tokenize_examples(examples[:16], default_lm.tokenizer, max_length=256)[0]
    cos = _cosines(_mean_diff(default_lm, tokenized), _mean_diff(_as_bf16(default_lm), tokenized))
    assert cos.shape == (default_lm.config.num_layers,)
    assert np.all(cos >= MIN_COSINE), cos
