"""Our Flax model against transformers (PyTorch, fp32) on tiny random HF folders."""

from __future__ import annotations

import numpy as np
import pytest

import emgeo_jax
from tests.tiny_models import LLAMA, QWEN2, hf_forward, hf_model, padded_batch, save_hf_folder

TOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    spec = {"llama": LLAMA, "qwen2": QWEN2}[request.param]
    model = hf_model(spec)
    folder = tmp_path_factory.mktemp(request.param)
    # Llama is saved sharded (index + several files) to exercise that path too.
    save_hf_folder(model, folder, max_shard_size="100KB" if request.param == "llama" else None)
    return model, folder, spec


def test_sharded_folder_was_written(pair):
    _, folder, spec = pair
    if spec["model_type"] == "llama":
        assert (folder / "model.safetensors.index.json").exists()
        assert len(list(folder.glob("model-*.safetensors"))) > 1


def test_logits_and_every_layer_match_transformers(pair):
    model, folder, spec = pair
    lm = emgeo_jax.load(folder)
    ids, mask = padded_batch(spec["vocab_size"], [11, 7, 3, 11], seed=1)
    ref_logits, ref_resid, ref_hidden = hf_forward(model, ids, mask)
    out = lm.forward(ids, mask)
    real = mask.astype(bool)
    assert out.resid_post.shape == (spec["num_hidden_layers"], *ids.shape, spec["hidden_size"])
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref_logits[real], atol=TOL, rtol=0)
    for layer in range(spec["num_hidden_layers"]):
        np.testing.assert_allclose(
            np.asarray(out.resid_post[layer])[real], ref_resid[layer][real], atol=TOL, rtol=0
        )
    # HF hidden_states[l + 1] is the output of block l for every block but (possibly) the last,
    # which some transformers versions replace by the final-normed state.
    for layer in range(spec["num_hidden_layers"] - 1):
        np.testing.assert_allclose(
            np.asarray(out.resid_post[layer])[real], ref_hidden[layer + 1][real], atol=TOL, rtol=0
        )


def test_padding_does_not_change_real_tokens(pair):
    _, folder, spec = pair
    lm = emgeo_jax.load(folder)
    ids, mask = padded_batch(spec["vocab_size"], [9, 4], seed=2)
    batched = np.asarray(lm.forward(ids, mask).logits)
    alone = np.asarray(lm.forward(ids[1:, -4:], mask[1:, -4:]).logits)
    np.testing.assert_allclose(batched[1, -4:], alone[0], atol=TOL, rtol=0)


def test_bfloat16_is_close_to_float32(pair):
    _, folder, spec = pair
    ids, mask = padded_batch(spec["vocab_size"], [8, 8], seed=3)
    f32 = np.asarray(emgeo_jax.load(folder).forward(ids, mask).logits)
    lm16 = emgeo_jax.load(folder, dtype="bfloat16")
    assert lm16.dtype == np.dtype("bfloat16")
    bf16 = np.asarray(lm16.forward(ids, mask).logits, np.float32)
    assert np.max(np.abs(bf16 - f32)) < 0.05 * np.max(np.abs(f32)) + 0.05
