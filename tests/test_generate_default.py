"""Generation on the embedded default model (SmolLM2-135M-Instruct) against transformers
`generate` with an equivalent forward hook: greedy, 32 new tokens, 4 chat prompts of
different lengths, unsteered and steered at a middle layer (all / generated-only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emgeo_jax.generate import chat_token_ids, eos_token_ids, generate
from emgeo_jax.models.steering import Steering
from tests.test_default_model import PROMPTS

NEW = 32
LAYER = 15


def hf_greedy(model, rows, eos, pad, hook=None):
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :], mask[i, t - len(r) :] = torch.tensor(r), 1
    handle = model.model.layers[LAYER].register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
                top_k=None,
                top_p=None,
                temperature=None,
            )
    finally:
        if handle:
            handle.remove()
    result = []
    for row in out[:, t:].tolist():
        stops = [i for i, x in enumerate(row) if x in eos]
        result.append(row[: stops[0]] if stops else row)
    return result


def adder(vector, decode_only):
    add = torch.tensor(vector)

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if decode_only and h.shape[1] != 1:
            return output
        return (h + add, *output[1:]) if isinstance(output, tuple) else h + add

    return hook


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "all", "generated"])
def test_greedy_generation_matches_transformers(default_lm, hf_default, mode):
    lm = default_lm
    rows = chat_token_ids(lm.tokenizer, PROMPTS, None)
    assert len(set(map(len, rows))) > 1
    eos = eos_token_ids(lm)
    v = np.random.default_rng(0).normal(size=lm.config.hidden_size).astype(np.float32)
    v *= 6.0 / np.linalg.norm(v)
    steering = None
    hook = None
    if mode is not None:
        steering = Steering.addition(lm, v, layers=[LAYER], positions=mode)
        hook = adder(v, decode_only=mode == "generated")
    ours = generate(lm, PROMPTS, steering, max_new_tokens=NEW)
    ref = hf_greedy(hf_default, rows, eos, lm.tokenizer.pad_token_id or 0, hook)
    assert ours.tokens == ref
    assert all(len(t) > 0 for t in ours.tokens)
    if mode is not None:
        plain = generate(lm, PROMPTS, None, max_new_tokens=NEW)
        assert plain.tokens != ours.tokens
