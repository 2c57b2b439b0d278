"""Steering, ablation, taps and KV-cached generation against transformers (PyTorch, fp32)
with equivalent forward hooks, on tiny random Llama and Qwen2 folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import emgeo_jax
from emgeo_jax.generate import decode, generate, generate_ids, prefill
from emgeo_jax.models.lm import forward
from emgeo_jax.models.steering import Steering
from emgeo_jax.models.taps import Taps
from tests.tiny_models import LLAMA, QWEN2, hf_model, padded_batch, save_hf_folder

TOL = 1e-4
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3, 4, 5, 6, 7]]
NEW = 8  # every tiny generation shares max_new_tokens, top_logprobs and monitor (one compile)


def gen(lm, prompts, steering=None, monitor_dir=None, **kw):
    r = np.ones(lm.config.hidden_size) if monitor_dir is None else monitor_dir
    return generate_ids(
        lm, prompts, steering, max_new_tokens=NEW, top_logprobs=3, monitor=(1, r), **kw
    )


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    spec = {"llama": LLAMA, "qwen2": QWEN2}[request.param]
    model = hf_model(spec, seed=4)
    folder = save_hf_folder(model, tmp_path_factory.mktemp(request.param))
    return model, emgeo_jax.load(folder), spec


def hook_edit(add: dict[int, np.ndarray], ablate: dict[int, np.ndarray], select):
    """Forward hooks on `model.model.layers[l]` that edit the block output like the
    reference code: ablate (QR basis of the raw directions, computed here independently),
    then add; `select(h) -> [B, T] bool` picks the tokens."""

    def make(layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            e = h
            if layer in ablate:
                q, _ = torch.linalg.qr(
                    torch.tensor(ablate[layer], dtype=h.dtype).reshape(-1, h.shape[-1]).T
                )
                e = e - (e @ q) @ q.T
            if layer in add:
                e = e + torch.tensor(add[layer], dtype=h.dtype)
            h = torch.where(select(h)[..., None], e, h)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    return {layer: make(layer) for layer in set(add) | set(ablate)}


def hf_logits(model, ids, mask, hooks):
    handles = [model.model.layers[layer].register_forward_hook(h) for layer, h in hooks.items()]
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    try:
        with torch.no_grad():
            out = model(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long),
            )
    finally:
        for h in handles:
            h.remove()
    return out.logits.numpy()


@pytest.mark.parametrize("mode", ["all", "prompt", "generated"])
def test_steered_logits_match_transformers_hooks(pair, mode):
    model, lm, spec = pair
    d, n_layers = spec["hidden_size"], spec["num_hidden_layers"]
    rng = np.random.default_rng(7)
    v, v2 = rng.normal(size=d), rng.normal(size=(n_layers, d))
    dirs = rng.normal(size=(2, d))
    # several layers at once; layer 1 gets both ablation (2 directions) and two additions
    steering = (
        Steering.addition(lm, v, layers=[0, 1], scale=0.7)
        + Steering.addition(lm, v2, layers=[1, n_layers - 1], scale=-0.4)
        + Steering.ablation(lm, dirs, layers=[1, 2])
    ).at_positions(mode)
    add = {0: 0.7 * v, 1: 0.7 * v - 0.4 * v2[1], n_layers - 1: -0.4 * v2[n_layers - 1]}
    ablate = {1: dirs, 2: dirs}
    ids, mask = padded_batch(spec["vocab_size"], [10, 6, 10], seed=5)
    is_gen = np.zeros(ids.shape, bool)
    is_gen[:, -3:] = True  # pretend the last 3 tokens were generated
    sel = {"all": np.ones_like(is_gen), "prompt": ~is_gen, "generated": is_gen}[mode]
    ref = hf_logits(model, ids, mask, hook_edit(add, ablate, lambda h: torch.tensor(sel)))
    out = lm.forward(ids, mask, steering=steering, is_generated=is_gen, return_residual=False)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref[real], atol=TOL, rtol=0)
    plain = hf_logits(model, ids, mask, {})
    assert np.max(np.abs(plain[real] - ref[real])) > 1e-2  # the edit did something


def test_explicit_mask_matches_hook(pair):
    model, lm, spec = pair
    d = spec["hidden_size"]
    v = np.random.default_rng(8).normal(size=d)
    ids, mask = padded_batch(spec["vocab_size"], [7, 7], seed=6)
    sel = np.random.default_rng(9).random(ids.shape) < 0.5
    steering = Steering.addition(lm, v, layers=[1], positions=sel)
    ref = hf_logits(model, ids, mask, hook_edit({1: v}, {}, lambda h: torch.tensor(sel)))
    out = lm.forward(ids, mask, steering=steering, return_residual=False)
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=TOL, rtol=0)


def test_changing_steering_does_not_recompile(pair):
    _, lm, spec = pair
    d, n_layers = spec["hidden_size"], spec["num_hidden_layers"]
    ids, mask = padded_batch(spec["vocab_size"], [6, 4], seed=1)
    rng = np.random.default_rng(0)
    specs = [
        Steering.none(lm),
        Steering.addition(lm, rng.normal(size=d), layers=[0], scale=2.0),
        Steering.addition(lm, rng.normal(size=(n_layers, d)), scale=-1.0).at_positions("prompt"),
        Steering.ablation(lm, rng.normal(size=d), layers=[1]).at_positions("generated"),
        Steering.ablation(lm, rng.normal(size=d)) + Steering.addition(lm, np.ones(d), layers=2),
    ]
    lm.forward(ids, mask, steering=specs[0], return_residual=False)
    before = forward._cache_size()
    outs = [lm.forward(ids, mask, steering=s, return_residual=False).logits for s in specs[1:]]
    assert forward._cache_size() == before
    assert len({float(np.asarray(o).sum()) for o in outs}) == len(outs)  # all different


def test_ablated_layers_have_no_component_along_r(pair):
    _, lm, spec = pair
    d = spec["hidden_size"]
    r = np.random.default_rng(3).normal(size=d)
    r_unit = r / np.linalg.norm(r)
    ids, mask = padded_batch(spec["vocab_size"], [8, 5], seed=2)
    out = lm.forward(ids, mask, steering=Steering.ablation(lm, 5 * r, layers=[0, 2]))
    comp = np.asarray(out.resid_post) @ r_unit  # [L, B, T]
    assert np.max(np.abs(comp[[0, 2]])) < 1e-5
    assert np.max(np.abs(comp[1])) > 1e-2


def test_ablate_then_add_at_one_layer(pair):
    _, lm, spec = pair
    d = spec["hidden_size"]
    r = np.eye(d)[0]
    ids, mask = padded_batch(spec["vocab_size"], [5], seed=2)
    steer = Steering.ablation(lm, r, layers=[1]) + Steering.addition(lm, 3 * r, layers=[1])
    h = np.asarray(lm.forward(ids, mask, steering=steer).resid_post[1])
    np.testing.assert_allclose(h[..., 0], 3.0, atol=1e-5)


def test_taps_pooled_last_and_early_stop(pair):
    _, lm, spec = pair
    ids, mask = padded_batch(spec["vocab_size"], [9, 4, 6], seed=11)
    pool = mask.copy()
    pool[:, -2:] = 0  # pool all but the last two tokens
    full = lm.forward(ids, mask, taps=Taps(resid="full", attn="full", mlp="full"))
    resid = np.asarray(full.resid_post)
    np.testing.assert_allclose(  # block output = input + attention + MLP output
        resid[1:],
        resid[:-1] + np.asarray(full.attn_out)[1:] + np.asarray(full.mlp_out)[1:],
        atol=1e-5,
    )
    pooled = lm.forward(
        ids, mask, taps=Taps(resid="pooled", mlp="last", pool_mask=pool), num_layers=2
    )
    assert pooled.logits is None and pooled.resid_post.shape[0] == 2
    np.testing.assert_allclose(pooled.counts, pool.sum(1))
    np.testing.assert_allclose(
        pooled.resid_post, np.einsum("lbtd,bt->lbd", resid[:2], pool), atol=1e-4
    )
    last = pool.shape[1] - 1 - np.argmax(pool[:, ::-1], axis=1)
    np.testing.assert_allclose(
        pooled.mlp_out, np.asarray(full.mlp_out)[:2, np.arange(3), last], atol=1e-5
    )


def hf_generate(model, prompts, max_new, hooks=None):
    ids = [torch.tensor(p) for p in prompts]
    t = max(len(p) for p in prompts)
    batch = torch.zeros((len(ids), t), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(ids):
        batch[i, t - len(p) :], mask[i, t - len(p) :] = p, 1
    handles = [model.model.layers[k].register_forward_hook(h) for k, h in (hooks or {}).items()]
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=batch,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
    finally:
        for h in handles:
            h.remove()
    return out[:, t:].tolist()


@pytest.mark.parametrize("mode", ["all", "generated"])
def test_cached_greedy_generation_matches_transformers(pair, mode):
    model, lm, spec = pair
    v = np.random.default_rng(1).normal(size=spec["hidden_size"])
    prompts = PROMPTS
    select = {
        "all": lambda h: torch.ones(h.shape[:2], dtype=torch.bool),
        "generated": lambda h: torch.full(h.shape[:2], h.shape[1] == 1),  # decode steps only
    }[mode]
    ref = hf_generate(model, prompts, NEW, hook_edit({1: 0.8 * v}, {}, select))
    steer = Steering.addition(lm, v, layers=[1], scale=0.8, positions=mode)
    ours = gen(lm, prompts, steer, eos_ids=[])
    assert ours.tokens == ref
    assert ours.tokens != hf_generate(model, prompts, NEW)  # steering changed the text


def test_logprobs_and_monitor_match_uncached_forward(pair):
    _, lm, spec = pair
    r = np.random.default_rng(2).normal(size=spec["hidden_size"])
    prompts = PROMPTS
    g = gen(lm, prompts, monitor_dir=r, eos_ids=[], temperature=1.0, seed=1)
    # the whole sequences, left-padded, through the uncached forward
    seqs = [p + t for p, t in zip(prompts, g.tokens, strict=True)]
    t = max(map(len, seqs))
    ids = np.array([[0] * (t - len(q)) + q for q in seqs])
    mask = np.array([[0] * (t - len(q)) + [1] * len(q) for q in seqs])
    out = lm.forward(ids, mask)
    lsm = torch.log_softmax(torch.tensor(np.asarray(out.logits)), -1).numpy()
    resid = np.asarray(out.resid_post[1]) @ (r / np.linalg.norm(r))
    for i in range(len(prompts)):
        gen_cols = np.arange(t - NEW, t)  # columns of the generated tokens
        np.testing.assert_allclose(g.logprobs[i], lsm[i, gen_cols - 1, g.tokens[i]], atol=1e-4)
        top = np.sort(lsm[i, gen_cols - 1], axis=-1)[:, ::-1][:, :3]
        np.testing.assert_allclose(g.top_logprobs[i][1], top, atol=1e-4)
        np.testing.assert_allclose(g.projections[i], resid[i, gen_cols], atol=1e-4)


def test_sampling_seeds_and_greedy(pair):
    _, lm, _ = pair
    prompts = PROMPTS
    a = gen(lm, prompts, temperature=1.0, seed=0, eos_ids=[]).tokens
    programs = (prefill._cache_size(), decode._cache_size())
    assert a == gen(lm, prompts, temperature=1.0, seed=0, eos_ids=[]).tokens
    assert a != gen(lm, prompts, temperature=1.0, seed=1, eos_ids=[]).tokens
    greedy = gen(lm, prompts, temperature=0.0, seed=0, eos_ids=[]).tokens
    assert greedy == gen(lm, prompts, temperature=0.0, seed=5, eos_ids=[]).tokens
    assert greedy != a
    # a nucleus this small keeps only the top token: sampling becomes greedy
    assert greedy == gen(lm, prompts, temperature=1.0, top_p=1e-6, seed=3, eos_ids=[]).tokens
    v = np.ones(lm.config.hidden_size)
    steer = Steering.addition(lm, v, layers=[0], scale=0.5, positions="generated")
    assert gen(lm, prompts, steer, eos_ids=[]).tokens != greedy
    # temperature, top_p, seed and steering are data: no new programs
    assert (prefill._cache_size(), decode._cache_size()) == programs


def test_eos_stops_each_row(pair):
    _, lm, _ = pair
    prompts = PROMPTS
    free = gen(lm, prompts, eos_ids=[])
    eos = free.tokens[0][2]
    stopped = gen(lm, prompts, eos_ids=[eos])
    first = free.tokens[0].index(eos)
    assert stopped.tokens[0] == free.tokens[0][:first]
    assert stopped.finish_reasons[0] == "stop"
    if eos not in free.tokens[1]:
        assert stopped.tokens[1] == free.tokens[1] and stopped.finish_reasons[1] == "length"


def test_bad_inputs_give_clear_errors(pair):
    _, lm, spec = pair
    d, n_layers = spec["hidden_size"], spec["num_hidden_layers"]
    with pytest.raises(ValueError, match="width"):
        Steering.addition(lm, np.ones(d + 1), layers=[0])
    with pytest.raises(ValueError, match="NaN or inf"):
        Steering.addition(lm, np.r_[np.ones(d - 1), np.nan], layers=[0])
    with pytest.raises(ValueError, match="NaN or inf"):
        Steering.ablation(lm, np.r_[np.ones(d - 1), np.inf])
    with pytest.raises(ValueError, match="out of range"):
        Steering.addition(lm, np.ones(d), layers=[n_layers])
    with pytest.raises(ValueError, match="out of range"):
        Steering.ablation(lm, np.ones(d), layers=[-1])
    with pytest.raises(ValueError, match="positions"):
        Steering.addition(lm, np.ones(d), layers=[0], positions="decode")
    with pytest.raises(ValueError, match="empty prompt list"):
        generate_ids(lm, [])
    with pytest.raises(ValueError, match="empty prompt list"):
        generate(lm, [])
