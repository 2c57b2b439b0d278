"""The demo's SAE stage on a tiny random model: the token rows it trains on are the model's
residuals at the tokens the module docstring names (checked against per-example forwards),
its held-out fit figures are those of the saved SAE, and the exported directions are the
decoder rows numpy ranks first; a second call reuses the finished stage."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from emgeo_jax.data import load_contrast_pairs, shipped_contrast_path, tokenize_examples
from emgeo_jax.experiments.pipeline import contrast_directions
from emgeo_jax.experiments.sae_stage import report_blocks, sae_directions
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import LM, init_params
from emgeo_jax.vectors.sae import load_sae
from emgeo_jax.vectors.sae.metrics import activation_fit
from tests.tiny_models import LLAMA

PAIRS, LAYER = 4, 1


@pytest.fixture(scope="module")
def stage(chat_tokenizer, tmp_path_factory):
    spec = {k: v for k, v in LLAMA.items() if k != "model_type"}
    spec["vocab_size"] = len(chat_tokenizer)
    cfg = ModelConfig.from_hf({"model_type": "llama", **spec, "architectures": ["X"]})
    lm = LM(cfg, *init_params(cfg, seed=1), tokenizer=chat_tokenizer, source="tiny")
    tmp = tmp_path_factory.mktemp("stage")
    dirs = contrast_directions(
        lm, shipped_contrast_path(), tmp / "extract", max_pairs=PAIRS, progress=False
    )
    result = sae_directions(lm, tmp / "extract", LAYER, tmp / "sae", quick=True)
    return lm, dirs, result


def expected_rows(lm):
    """Independently: per example, its own unpadded forward; answer tokens + first-seen prompt
    tokens, past the prefix all examples share. Returns (all rows, answer rows, labels)."""
    examples, _ = load_contrast_pairs(shipped_contrast_path())
    tok, _ = tokenize_examples(examples[: 2 * PAIRS], lm.tokenizer, 256)
    first, prefix = tok[0].input_ids, 0
    while all(ex.length > prefix and ex.input_ids[prefix] == first[prefix] for ex in tok):
        prefix += 1
    prefix = max(prefix, 1)  # the first token (attention sink) is dropped in any case
    t = max(ex.length for ex in tok)  # one left-padded batch (the stage buckets by length)
    ids = np.zeros((len(tok), t), np.int32)
    mask = np.zeros((len(tok), t), np.int32)
    for i, ex in enumerate(tok):
        ids[i, t - ex.length :], mask[i, t - ex.length :] = ex.input_ids, 1
    resid = np.asarray(lm.forward(ids, mask).resid_post[LAYER])
    rows, answers, labels, seen = [], [], [], set()
    for ex, h in zip(tok, resid, strict=True):
        h = h[t - ex.length :]
        prompt = tuple(ex.input_ids[: ex.prompt_length])
        start = prefix if prompt not in seen else ex.prompt_length
        seen.add(prompt)
        rows.append(h[start:])
        answers.append(h[ex.prompt_length : ex.answer_end])
        labels += [ex.label] * (ex.answer_end - ex.prompt_length)
    return np.concatenate(rows), np.concatenate(answers), np.array(labels)


def numpy_topk(sae, x):
    pre = (x - np.asarray(sae.b_dec)) @ np.asarray(sae.W_enc) + np.asarray(sae.b_enc)
    post = np.maximum(pre, 0)
    f = np.zeros_like(post)
    top = np.argsort(-post, axis=1)[:, : sae.k]
    np.put_along_axis(f, top, np.take_along_axis(post, top, 1), 1)
    return f


def test_stage_rows_fit_and_directions(stage):
    lm, dirs, result = stage
    folder, s = result.folder, result.summary
    stored = np.load(folder / f"tokens_L{LAYER}.npy")
    rows, answers, labels = expected_rows(lm)
    assert stored.shape == rows.shape
    assert s["n_tokens_train"] + s["n_tokens_held_out"] == len(rows)
    assert 0 < s["n_tokens_held_out"] < s["n_tokens_train"]
    # the same multiset of rows (identical rows occur: prompts sharing their first words)
    tol = 1e-8 * (rows**2).sum(-1).max()

    def close(a, b):
        return (((a[:, None] - b[None]) ** 2).sum(-1) < tol).sum(1)

    np.testing.assert_array_equal(close(rows, stored), close(rows, rows))
    np.testing.assert_array_equal(close(stored, rows), close(stored, stored))
    assert close(rows, stored).min() >= 1

    sae = load_sae(folder / "sae", lm.config.hidden_size, LAYER)
    held = stored[s["n_tokens_train"] :]
    fit = activation_fit(sae, [held])
    assert s["fit_held_out"]["fve"] == pytest.approx(fit.fve, rel=1e-5)
    assert s["fit_held_out"]["l0"] == pytest.approx(fit.l0) and fit.l0 <= sae.k
    assert s["fit_held_out"]["dead"] == fit.dead
    # measured 0.45 on unseen pairs; reconstructing by b_dec alone gives ~0
    assert s["fit_held_out"]["fve"] > 0.3

    w = np.asarray(sae.W_dec)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    md = dirs["mean_diff"][LAYER]
    f = numpy_topk(sae, answers)
    expect = {
        "cosine": np.argsort(-(unit @ md))[:5],
        "class_diff": np.argsort(-(f[labels == 1].mean(0) - f[labels == 0].mean(0)))[:5],
    }
    for method, features in expect.items():
        saved = load_file(str(folder / f"sae_{method}.safetensors"))
        np.testing.assert_array_equal(saved["features"], features)
        np.testing.assert_allclose(saved["feature_directions"], unit[features], atol=1e-6)
        assert s["rankings"][method]["features"] == features.tolist()
    assert list(result.directions)[0] == "cosine"
    for method, v in result.directions.items():
        np.testing.assert_allclose(v, unit[expect[method][0]], atol=1e-6)
    html = "".join(report_blocks(result))
    assert "fraction of variance explained" in html and str(s["width"]) in html


def test_stage_resumes_without_retraining(stage):
    lm, _, result = stage
    weights = result.folder / "sae" / "sae_weights.safetensors"
    before = weights.stat().st_mtime_ns
    again = sae_directions(lm, result.folder.parent / "extract", LAYER, result.folder, True)
    assert weights.stat().st_mtime_ns == before
    assert again.summary == result.summary
    with pytest.raises(ValueError, match="layer 7 not extracted"):
        sae_directions(lm, result.folder.parent / "extract", 7, result.folder, True)
