"""Activation extraction: pooled per-class means against transformers' hidden_states (fp32),
8 simulated devices and 2 processes against 1, resume, CLI, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import emgeo_jax
from emgeo_jax.data import load_examples, shipped_contrast_path, tokenize_examples
from emgeo_jax.extract import (
    POOLS,
    ExtractSettings,
    extract,
)
from tests.tiny_models import LLAMA, QWEN2, hf_forward, hf_model, save_hf_folder

ROOT = Path(__file__).resolve().parents[1]
NUM_PAIRS = 3


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """The first NUM_PAIRS shipped contrast pairs, as a file of their own."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    lines = shipped_contrast_path().read_text().splitlines()[:NUM_PAIRS]
    path.write_text("\n".join(lines) + "\n")
    return path


def _tiny(spec, tokenizer, folder: Path):
    """HF model with the chat tokenizer's vocabulary, saved with the tokenizer; our LM of it."""
    model = hf_model({**spec, "vocab_size": len(tokenizer)}, seed=3)
    save_hf_folder(model, folder)
    tokenizer.save_pretrained(str(folder))
    return model, emgeo_jax.load(folder)


@pytest.fixture(scope="module")
def llama(chat_tokenizer, tmp_path_factory):
    return _tiny(LLAMA, chat_tokenizer, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tokenized(data_file, chat_tokenizer):
    examples, _ = load_examples(data_file)
    return tokenize_examples(examples, chat_tokenizer, max_length=512)[0]


def _block_outputs(model, tokenized) -> list[np.ndarray]:
    """transformers, one unpadded example at a time: block outputs `[L, T, D]` float64 (HF
    `hidden_states[l + 1]`, read by hooks on `model.layers[l]`, because transformers applies
    the final norm to the last `hidden_states` entry)."""
    out = []
    for ex in tokenized:
        _, resid, hidden = hf_forward(model, ex.input_ids[None], np.ones((1, ex.length), int))
        np.testing.assert_array_equal(resid[0, 0], hidden[1][0])  # the layer convention
        out.append(resid[:, 0].astype(np.float64))
    return out


@pytest.fixture(scope="module")
def llama_blocks(llama, tokenized):
    return _block_outputs(llama[0], tokenized)


def _reference(blocks, tokenized, pool: str, layers):
    """Per-example pooled rows [N, L, D] and per-class token- and example-weighted means."""
    d = blocks[0].shape[-1]
    rows, sums, counts = [], np.zeros((2, len(layers), d)), np.zeros(2)
    for ex, resid in zip(tokenized, blocks, strict=True):
        h = resid[list(layers)]
        mask = {
            "answer": ex.answer_mask,
            "question": ex.question_mask,
            "all": np.ones(ex.length, bool),
            "last_prompt": np.arange(ex.length) == ex.last_prompt_index,
        }[pool]
        rows.append(h[:, mask].mean(axis=1))
        sums[ex.label] += h[:, mask].sum(axis=1)
        counts[ex.label] += mask.sum()
    rows = np.stack(rows)
    labels = np.array([ex.label for ex in tokenized])
    token_means = sums / counts[:, None, None]
    example_means = np.stack([rows[labels == c].mean(axis=0) for c in (0, 1)])
    return rows, token_means, example_means


@pytest.mark.parametrize("pool", POOLS)
def test_means_match_transformers_hidden_states(llama, llama_blocks, tokenized, pool):
    model, lm = llama
    layers = (0, 2)
    # batch 4 over 6 examples: empty padding rows in the last batch of a bucket
    settings = ExtractSettings(pool=pool, layers=layers, per_example=True, batch_size=4)
    res = extract(lm, tokenized, settings)
    rows, token_means, example_means = _reference(llama_blocks, tokenized, pool, layers)
    np.testing.assert_allclose(res.pooled, rows, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(res.example_index, np.arange(len(tokenized)))
    np.testing.assert_allclose(res.means("token"), token_means, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(res.means("example"), example_means, atol=2e-5, rtol=1e-5)
    assert res.example_count.tolist() == [NUM_PAIRS, NUM_PAIRS]
    if pool != "last_prompt":  # the two weightings differ (unequal token counts)
        assert not np.allclose(res.means("token"), res.means("example"), atol=1e-4)


def test_qwen2_answer_means_match_transformers(chat_tokenizer, tokenized, tmp_path):
    model, lm = _tiny(QWEN2, chat_tokenizer, tmp_path)
    res = extract(lm, tokenized, ExtractSettings(batch_size=4))
    layers = tuple(range(QWEN2["num_hidden_layers"]))
    blocks = _block_outputs(model, tokenized)
    _, token_means, example_means = _reference(blocks, tokenized, "answer", layers)
    assert res.layers == layers
    np.testing.assert_allclose(res.means("token"), token_means, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(res.means("example"), example_means, atol=2e-5, rtol=1e-5)
