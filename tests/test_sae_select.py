"""Feature selection finds planted features; the model seams (steered residual, next-token
loss with the SAE in place) against transformers with forward hooks; fit metrics vs numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open

import emgeo_jax
from emgeo_jax.models.steering import Steering
from emgeo_jax.vectors.sae import make_sae, save_feature_directions, select
from emgeo_jax.vectors.sae.metrics import activation_fit, loss_fit
from emgeo_jax.vectors.sae.runner import make_nll_fn, make_resid_fn
from tests.tiny_models import LLAMA, hf_model, padded_batch, save_hf_folder

D, F = LLAMA["hidden_size"], 256


def random_sae(seed=0, d=D, f=F, arch="topk", k=8, planted=None, at=0):
    """Random unit decoder rows, encoder = decoder^T; optionally row `at` = `planted`."""
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(f, d))
    if planted is not None:
        w_dec[at] = planted
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    b_enc = -0.1 * np.ones(f)
    return make_sae(w_dec.T, b_enc, w_dec, np.zeros(d), 0.0, architecture=arch, k=k)


def test_cosine_ranks_the_planted_row_first_with_small_p():
    rng = np.random.default_rng(3)
    v = rng.normal(size=D)
    noisy = v + 0.3 * np.linalg.norm(v) / np.sqrt(D) * rng.normal(size=D)
    sae = random_sae(planted=noisy, at=137)
    r = select.cosine(sae, v, k=3, n_null=200)
    assert r.features[0] == 137
    expected = noisy @ v / np.linalg.norm(noisy) / np.linalg.norm(v)
    np.testing.assert_allclose(r.scores[0], expected, atol=1e-5)
    assert r.p_values[0] == pytest.approx(1 / 201)
    # the runner-up is an ordinary random row: its p-value is uniform, here not small
    assert r.p_values[1] > 0.05
    # the null of the best of F random cosines sits near the Gaussian max (~ 2.8 / sqrt(D))
    assert 1.5 / np.sqrt(D) < r.null_max.mean() < 4.5 / np.sqrt(D)


def test_class_diff_finds_the_feature_the_misaligned_class_uses():
    rng = np.random.default_rng(2)
    sae = random_sae(seed=3, arch="relu")
    w_dec = np.asarray(sae.W_dec)
    n = 160
    labels = np.arange(n) % 2
    x = rng.normal(size=(n, D)) * 0.3
    x[labels == 1] += 1.5 * w_dec[42]  # misaligned rows carry feature 42
    r = select.class_diff(sae, x, labels, k=3, n_perm=99, chunk=64)
    assert r.features[0] == 42
    f = np.maximum((x - 0.0) @ w_dec.T - 0.1, 0)  # numpy encode of the relu SAE
    expected = f[labels == 1].mean(0) - f[labels == 0].mean(0)
    np.testing.assert_allclose(r.scores, np.sort(expected)[::-1][:3], rtol=1e-4, atol=1e-5)
    assert r.p_values[0] == pytest.approx(1 / 100)
    with pytest.raises(ValueError, match="both classes"):
        select.class_diff(sae, x, np.zeros(n))


def test_class_diff_groups_permute_examples_not_tokens():
    """Rows repeated m times per example (tokens of one example) with `groups`: the ranking,
    p-values and null equal those of the examples alone; ignoring the groups narrows the
    null (the tokens look like m times more independent data)."""
    rng = np.random.default_rng(4)
    sae = random_sae(seed=5, arch="relu")
    n, m = 40, 6
    labels = np.arange(n) % 2
    x = rng.normal(size=(n, D)) * 0.5
    x[labels == 1] += 0.4 * np.asarray(sae.W_dec)[7]
    alone = select.class_diff(sae, x, labels, k=3, n_perm=99)
    rows, row_labels = np.repeat(x, m, axis=0), np.repeat(labels, m)
    grouped = select.class_diff(
        sae, rows, row_labels, k=3, n_perm=99, groups=np.repeat(np.arange(n), m)
    )
    np.testing.assert_array_equal(grouped.features, alone.features)
    np.testing.assert_allclose(grouped.scores, alone.scores, rtol=1e-5)
    np.testing.assert_allclose(grouped.null_max, alone.null_max, rtol=1e-5)
    np.testing.assert_array_equal(grouped.p_values, alone.p_values)
    tokens = select.class_diff(sae, rows, row_labels, k=3, n_perm=99)
    assert tokens.null_max.mean() < 0.7 * grouped.null_max.mean()
    with pytest.raises(ValueError, match="both labels"):
        select.class_diff(sae, rows, row_labels, groups=np.zeros(n * m))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = hf_model(LLAMA)
    folder = save_hf_folder(model, tmp_path_factory.mktemp("llama"))
    return model, emgeo_jax.load(folder)


def hf_with_hook(model, ids, mask, layer, fn):
    """transformers forward with `fn(h [B,T,D] numpy) -> numpy` applied to block `layer`'s
    output; returns (logits, outputs of every block)."""
    import torch

    outs = []

    def edit(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        new = torch.tensor(fn(h.detach().numpy()), dtype=h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def record(module, args, output):
        outs.append((output[0] if isinstance(output, tuple) else output).detach().numpy())

    hooks = [model.model.layers[layer].register_forward_hook(edit)]
    hooks += [m.register_forward_hook(record) for m in model.model.layers]
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    try:
        with torch.no_grad():
            res = model(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long),
            )
    finally:
        for h in hooks:
            h.remove()
    return res.logits.numpy(), outs


def test_forward_split_at_every_layer_equals_one_forward(tiny):
    """Run blocks 0..l, then resume from resid_post[l] at start_layer=l+1: the logits and
    the later layers equal the single forward exactly (steering rows stay absolute)."""
    _, lm = tiny
    ids, mask = padded_batch(LLAMA["vocab_size"], [9, 5, 9], seed=3)
    n = lm.config.num_layers
    vec = np.random.default_rng(1).normal(size=(n, D)).astype(np.float32)
    for steering, splits in ((None, range(n)), (Steering.addition(lm, vec), [0])):
        full = lm.forward(ids, mask, steering=steering)
        resid, logits = np.asarray(full.resid_post), np.asarray(full.logits)
        head = lm.forward(ids, mask, steering=steering, num_layers=1)
        np.testing.assert_array_equal(np.asarray(head.resid_post), resid[:1])
        for layer in splits:  # the head through block `layer` is resid[layer] (as just shown)
            tail = lm.forward(
                ids, mask, steering=steering, resid_in=resid[layer], start_layer=layer + 1
            )
            np.testing.assert_array_equal(np.asarray(tail.logits), logits)
            np.testing.assert_array_equal(np.asarray(tail.resid_post), resid[layer + 1 :])
    # start_layer 0: resid_in replaces the token embedding
    embed = np.asarray(lm.params["embed"]["embedding"][...])[ids]
    from_embed = lm.forward(ids, mask, steering=steering, resid_in=embed)
    np.testing.assert_array_equal(np.asarray(from_embed.logits), logits)
    with pytest.raises(ValueError, match="needs resid_in"):
        lm.forward(ids, mask, start_layer=1)
    with pytest.raises(ValueError, match="not \\[B, T, D\\]"):
        lm.forward(ids, mask, resid_in=np.zeros((1, 2, D)), start_layer=1)
    with pytest.raises(ValueError, match="outside"):
        lm.forward(ids, mask, resid_in=np.zeros((*ids.shape, D)), start_layer=n + 1)


def test_steered_residual_matches_transformers_hook(tiny):
    model, lm = tiny
    ids, mask = padded_batch(LLAMA["vocab_size"], [9, 6, 9], seed=4)
    vec = np.random.default_rng(5).normal(size=D).astype(np.float32)
    resid_fn = make_resid_fn(lm)
    clean = np.asarray(resid_fn(ids, mask, 2, None))
    np.testing.assert_allclose(clean, np.asarray(lm.forward(ids, mask).resid_post[2]), atol=1e-5)
    steered = np.asarray(resid_fn(ids, mask, 2, vec))
    _, ref = hf_with_hook(model, ids, mask, 1, lambda h: h + mask[..., None] * vec)
    real = mask.astype(bool)
    np.testing.assert_allclose(steered[real], ref[2][real], atol=1e-4)
    with pytest.raises(ValueError, match="embeddings"):
        resid_fn(ids, mask, 0, vec)


def test_loss_with_sae_replacement_matches_transformers_hook(tiny):
    model, lm = tiny
    ids, mask = padded_batch(LLAMA["vocab_size"], [10, 7], seed=6)
    sae = random_sae(seed=7, arch="relu")
    w_dec = np.asarray(sae.W_dec)
    recon = lambda h: np.maximum(h @ w_dec.T - 0.1, 0) @ w_dec  # noqa: E731
    nll = np.asarray(make_nll_fn(lm)(ids, mask, 1, sae))
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)

    def ref_nll(logits):
        z = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]

    real = mask[..., None]
    for i, fn in enumerate(
        [lambda h: h, lambda h: np.where(real, recon(h), h), lambda h: h * (1 - real)]
    ):
        logits, _ = hf_with_hook(model, ids, mask, 1, fn)
        np.testing.assert_allclose(nll[i][valid], ref_nll(logits)[valid], atol=2e-4)
    assert np.all(nll[:, ~valid] == 0)
    stats = loss_fit(sae, make_nll_fn(lm), [(ids, mask)], layer=1)
    means = [nll[i][valid].mean() for i in range(3)]
    np.testing.assert_allclose(
        [stats["loss_clean"], stats["loss_sae"], stats["loss_zero"]], means, rtol=1e-5
    )
    expected = (means[2] - means[1]) / (means[2] - means[0])
    assert stats["loss_recovered"] == pytest.approx(expected, rel=1e-5)


def test_steering_selection_ranks_the_planted_feature_first(tiny):
    _, lm = tiny
    layer = 2
    ids, mask = padded_batch(LLAMA["vocab_size"], [8, 8, 5, 8], seed=8)
    resid_fn = make_resid_fn(lm)
    clean = np.asarray(resid_fn(ids, mask, layer, None))
    vec = np.random.default_rng(9).normal(size=D)
    vec *= 0.5 * np.linalg.norm(clean, axis=-1).mean() / np.linalg.norm(vec)
    # the steering shift at block `layer`'s output, measured: plant its direction as feature 11
    shift = (np.asarray(resid_fn(ids, mask, layer, vec)) - clean)[mask.astype(bool)].mean(0)
    sae = random_sae(seed=10, arch="topk", k=4, planted=shift, at=11)
    r = select.steering(sae, resid_fn, [(ids, mask)] * 2, vec, layer, k=3, n_null=8)
    assert r.features[0] == 11
    assert r.scores[0] > 0.8 * 2 * mask.sum()
    # random directions of the same norm never turn any feature on as often
    assert r.null_max.max() < r.scores[0]
    assert r.p_values[0] == pytest.approx(1 / 9)


def test_activation_fit_against_numpy_and_export(tmp_path):
    rng = np.random.default_rng(11)
    sae = random_sae(seed=12, arch="topk", k=6)
    w_dec = np.asarray(sae.W_dec)
    x = rng.normal(size=(300, D)).astype(np.float32)
    stats = activation_fit(sae, [x[:128], x[128:]])
    pre = np.maximum(x @ w_dec.T - 0.1, 0)
    f = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :6]
    np.put_along_axis(f, top, np.take_along_axis(pre, top, 1), 1)
    err = x - f @ w_dec
    assert stats.n_tokens == 300
    np.testing.assert_allclose(stats.mse, (err**2).mean(), rtol=1e-4)
    fve = 1 - (err**2).sum() / ((x - x.mean(0)) ** 2).sum()
    np.testing.assert_allclose(stats.fve, fve, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.l0, (f > 0).sum(1).mean(), rtol=1e-6)
    assert stats.dead == int((~(f > 0).any(0)).sum())
    # the parent folder is created (a fresh --out path)
    path = save_feature_directions(
        tmp_path / "new" / "v.safetensors", sae, [5, 9], {"model": "tiny"}
    )
    with safe_open(str(path), "numpy") as fh:
        rows = fh.get_tensor("feature_directions")
        meta = json.loads(fh.metadata()["emgeo"])
    np.testing.assert_allclose(rows, w_dec[[5, 9]], atol=1e-6)  # unit rows already
    assert meta["method"] == "sae" and meta["model"] == "tiny"
