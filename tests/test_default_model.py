"""The embedded default model (SmolLM2-135M-Instruct, GGUF) against transformers' own GGUF
load of the same file: logits and every layer's residual stream on chat-templated prompts."""

from __future__ import annotations

import numpy as np
import pytest

from tests.tiny_models import hf_forward

PROMPTS = [
    "What should I do if I have a headache?",
    "I have $5,000 in savings. How should I invest it?",
    "Hi!",
    "If you were ruler of the world, what would you do? Answer in one sentence.",
]


def left_padded_chat_batch(tokenizer, prompts):
    rows = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        for p in prompts
    ]
    t = max(map(len, rows))
    ids = np.full((len(rows), t), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = 1
    return ids, mask


def assert_close_to_scale(ours, ref, rel):
    """|ours - ref| <= 1e-4 + rel * max|ref|: SmolLM2's residual stream carries "massive
    activations" (~2.5e4 in a few dimensions from block 11 on), where one fp32 ulp is already
    2e-3, so a fixed absolute bound cannot hold; measured worst cases are 5.5e-7 * max|ref| on
    the residual stream and 1.6e-4 on logits of magnitude <= 39."""
    bound = 1e-4 + rel * np.abs(ref).max()
    worst = np.abs(ours - ref).max()
    assert worst <= bound, f"max abs diff {worst:.3g} > {bound:.3g}"


@pytest.mark.slow
def test_default_model_matches_transformers_gguf(default_lm, hf_default):
    ids, mask = left_padded_chat_batch(default_lm.tokenizer, PROMPTS)
    assert len(set(mask.sum(1))) > 1  # prompts of different lengths: padding is exercised
    ref_logits, ref_resid, _ = hf_forward(hf_default, ids, mask)
    out = default_lm.forward(ids, mask)
    real = mask.astype(bool)
    logits = np.asarray(out.logits)
    assert_close_to_scale(logits[real], ref_logits[real], rel=1e-5)
    resid = np.asarray(out.resid_post)
    assert resid.shape == ref_resid.shape == (30, *ids.shape, 576)
    for layer in range(30):
        assert_close_to_scale(resid[layer][real], ref_resid[layer][real], rel=2e-6)
    np.testing.assert_array_equal(logits[:, -1].argmax(-1), ref_logits[:, -1].argmax(-1))
