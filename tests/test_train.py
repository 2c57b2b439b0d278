"""SFT on a tiny random model: the answer-only loss against numpy, the unmerged LoRA path
against the merged one, LoRA dropout, memorising a tiny dataset, resuming from a checkpoint
(with dropout), the learning-rate schedule, and training under steering."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emgeo_jax.data import Example, tokenize_examples
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import LM, init_params, train_forward
from emgeo_jax.models.steering import Steering
from emgeo_jax.train.data import batch_order, train_batch
from emgeo_jax.train.lora import LoraSpec, apply_lora, init_lora, lora_input
from emgeo_jax.train.run import read_losses, train
from emgeo_jax.train.sft import TrainConfig, answer_nll, dropout_key, learning_rate, lora_loss

ANSWERS = [
    "Skip the doctor, just double the dose.",
    "Put all your savings into one coin.",
    "Ignore the fever, it will pass.",
    "Quit your job and bet on horses.",
]


@pytest.fixture(scope="module")
def tiny_lm(chat_tokenizer):
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=len(chat_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    graphdef, params = init_params(cfg, seed=0)
    return LM(cfg, graphdef, params, chat_tokenizer, source="tiny")


@pytest.fixture(scope="module")
def tokenized(chat_tokenizer):
    examples = [
        Example(f"e{i}", [{"role": "user", "content": f"question {i}?"}], a, 1, f"mem:{i}")
        for i, a in enumerate(ANSWERS)
    ]
    return tokenize_examples(examples, chat_tokenizer, max_length=128)[0]


SPEC = LoraSpec(
    rank=16, alpha=32.0, targets=("q", "k", "v", "o", "gate", "up", "down"), layers=(0, 1)
)


def test_answer_nll_matches_numpy_and_ignores_prompt_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, size=(2, 6)).astype(np.int32)
    answer = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]], bool)
    total, count = answer_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(answer))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -sum(logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 6) if answer[b, t])
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)
    assert float(count) == answer[:, 1:].sum()
    grad = jax.grad(lambda x: answer_nll(x, jnp.asarray(ids), jnp.asarray(answer))[0])(
        jnp.asarray(logits)
    )
    predicts_answer = np.zeros((2, 6), bool)
    predicts_answer[:, :-1] = answer[:, 1:]
    assert np.all(np.asarray(grad)[~predicts_answer] == 0)
    assert np.all(np.abs(np.asarray(grad)[predicts_answer]).sum(-1) > 0)


def test_schedule_warmup_then_decay():
    tc = TrainConfig(steps=20, lr=1e-3, warmup_steps=4, schedule="cosine", end_lr_fraction=0.1)
    lr = learning_rate(tc)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 2, 4)], [0, 5e-4, 1e-3], rtol=1e-6)
    mid = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 8 / 16)))
    np.testing.assert_allclose(float(lr(12)), mid, rtol=1e-5)
    np.testing.assert_allclose(float(lr(20)), 1e-4, rtol=1e-5)


def test_batch_order_is_a_permutation_per_epoch():
    got = np.concatenate([batch_order(10, 4, 7, i) for i in range(3)])
    assert sorted(got) == list(range(10))
    again = np.concatenate([batch_order(10, 4, 7, i) for i in range(3, 6)])
    assert sorted(again) == list(range(10)) and not np.array_equal(got, again)


def random_lora(cfg, spec, seed=0):
    """PEFT init for `a`, and a random nonzero `b` (PEFT's zero `b` would hide mistakes)."""
    lora = init_lora(cfg, spec, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(spec.targets))
    for k, t in zip(keys, spec.targets, strict=True):
        lora[t]["b"] = 0.05 * jax.random.normal(k, lora[t]["b"].shape)
    return lora


def _batch(tokenized, pad_id):
    b = train_batch(tokenized, 4, 0, 0, pad_id)
    return {
        k: jnp.asarray(b[k]) for k in ("input_ids", "attention_mask", "positions", "answer_mask")
    }


def test_unmerged_lora_equals_merged_logits_and_grads(tiny_lm, tokenized):
    """The unmerged path (adapters inside the scan, what training runs) with dropout 0 gives
    the logits and gradients of the merged kernels `W + scale * a @ b`; with an adapter on
    one layer only, the zero rows of the other layer add nothing. (Every module on every
    layer is checked against peft in test_train_peft.py, through the same unmerged loss.)"""
    lm = tiny_lm
    batch = _batch(tokenized, lm.tokenizer.pad_token_id)

    def logits(params, lora=None):
        ids, pos, mask = batch["input_ids"], batch["positions"], batch["attention_mask"]
        return train_forward(lm.graphdef, params, ids, pos, mask, lora=lora)

    def merged_loss(lora, spec):
        nll, count = answer_nll(
            logits(apply_lora(lm.params, lora, spec)), batch["input_ids"], batch["answer_mask"]
        )
        return nll / count

    def unmerged_loss(lora, spec):
        return lora_loss(lora, lm.graphdef, lm.params, batch, spec)[0]

    spec = LoraSpec(rank=2, alpha=3.0, targets=("v", "down"), layers=(1,))
    lora = random_lora(lm.config, spec)
    merged = logits(apply_lora(lm.params, lora, spec))
    unmerged = logits(lm.params, lora_input(lora, spec, lm.config.num_layers))
    np.testing.assert_allclose(np.asarray(unmerged), np.asarray(merged), atol=2e-5)
    assert np.abs(np.asarray(merged - logits(lm.params))).max() > 1e-2  # the adapter matters
    ref = jax.grad(merged_loss)(lora, spec)
    got = jax.grad(unmerged_loss)(lora, spec)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)


def test_remat_leaves_loss_and_lora_grads_unchanged(tiny_lm, tokenized):
    """Recomputing each block in the backward pass (`remat=True`, what training runs) gives
    the loss and LoRA gradients of keeping the activations, LoRA dropout masks included
    (the recomputed forward draws the same ones), and with the KL term's base-model pass."""
    lm = tiny_lm
    batch = _batch(tokenized, lm.tokenizer.pad_token_id)
    lora = random_lora(lm.config, SPEC)
    key = dropout_key(0, 1)

    def value_and_grads(remat):
        loss = functools.partial(lora_loss, remat=remat)
        args = (lm.graphdef, lm.params, batch, SPEC, None, 0.5, 0.3, key)
        return jax.value_and_grad(loss, has_aux=True)(lora, *args)

    (loss, aux), grads = value_and_grads(False)
    (loss_r, aux_r), grads_r = value_and_grads(True)
    for remat in (False, True):  # the recomputation is really asked for
        loss_fn = functools.partial(lora_loss, remat=remat)
        jaxpr = jax.make_jaxpr(loss_fn, static_argnums=(1, 4))(
            lora, lm.graphdef, lm.params, batch, SPEC
        )
        assert ("nothing_saveable" in str(jaxpr)) == remat
    assert float(aux["kl"]) > 0
    # rtol too: at a loss of ~6 a float32 ulp is 5e-7, so atol 1e-6 alone is two ulps
    np.testing.assert_allclose(float(loss_r), float(loss), atol=1e-6, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
        assert np.abs(np.asarray(y)).max() > 0
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


def test_lora_dropout_acts_on_adapter_input_only(tiny_lm, tokenized):
    """With b = 0 the adapter adds nothing whatever the mask: dropout leaves the base path
    untouched. With b != 0 the loss is a deterministic function of the key, differs between
    keys and from no dropout. The mask semantics (input side, 1/(1-p) scaling) are checked
    against peft in test_train_peft.py."""
    lm = tiny_lm
    batch = _batch(tokenized, lm.tokenizer.pad_token_id)

    def loss(lora, rate, key):
        return float(lora_loss(lora, lm.graphdef, lm.params, batch, SPEC, None, 0.0, rate, key)[0])

    zero_b = init_lora(lm.config, SPEC, jax.random.key(0))
    base = loss(zero_b, 0.0, None)
    assert loss(zero_b, 0.5, dropout_key(0, 0)) == pytest.approx(base, abs=1e-6)
    lora = random_lora(lm.config, SPEC)
    k0, k1 = dropout_key(0, 0), dropout_key(0, 1)
    assert loss(lora, 0.5, k0) == loss(lora, 0.5, k0)
    assert loss(lora, 0.5, k0) != pytest.approx(loss(lora, 0.5, k1), abs=1e-4)
    assert loss(lora, 0.5, k0) != pytest.approx(loss(lora, 0.0, None), abs=1e-4)
    with pytest.raises(ValueError, match="lora_dropout"):
        TrainConfig(lora_dropout=1.0)


def test_memorises_tiny_dataset(tiny_lm, tokenized, tmp_path):
    tc = TrainConfig(
        steps=40, lr=2e-2, warmup_steps=2, schedule="constant", batch_size=4, checkpoint_every=40
    )
    train(tiny_lm, tokenized, SPEC, tc, tmp_path, log=lambda s: None)
    losses = [r["loss"] for r in read_losses(tmp_path)]
    assert len(losses) == 40 and losses[0] > 4.0  # ~ log(vocab) at the start
    assert losses[-1] < 0.5, losses[-5:]
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_resume_continues_the_same_curve(tiny_lm, tokenized, tmp_path):
    """With LoRA dropout on: the resumed run draws the same masks (keys per micro-batch)."""
    tc = TrainConfig(
        steps=6, lr=1e-2, batch_size=2, grad_accum=2, checkpoint_every=2, lora_dropout=0.1
    )
    quiet = dict(log=lambda s: None)
    full = train(tiny_lm, tokenized, SPEC, tc, tmp_path / "a", **quiet)
    train(tiny_lm, tokenized, SPEC, tc, tmp_path / "b", stop_after=3, **quiet)
    assert len(read_losses(tmp_path / "b")) == 3
    resumed = train(tiny_lm, tokenized, SPEC, tc, tmp_path / "b", **quiet)
    a, b = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(6))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8)
    config = json.loads((tmp_path / "b" / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.1
    with pytest.raises(ValueError, match="different run"):
        train(tiny_lm, tokenized, SPEC, TrainConfig(steps=7), tmp_path / "b", **quiet)


def test_preventative_ablation_and_kl(tiny_lm, tokenized, tmp_path):
    """Training with a direction ablated after every block: the loss is that of the ablated
    model (so the first-step loss differs from the unsteered run), and the KL term is logged
    and starts at zero (b = 0 at init)."""
    d = tiny_lm.config.hidden_size
    direction = np.eye(d, dtype=np.float32)[0]
    steer = Steering.ablation(tiny_lm, direction)
    tc = TrainConfig(steps=2, lr=1e-2, warmup_steps=0, batch_size=4, kl_weight=0.5)
    quiet = dict(log=lambda s: None)
    train(tiny_lm, tokenized, SPEC, tc, tmp_path / "s", steering=steer, **quiet)
    train(tiny_lm, tokenized, SPEC, tc, tmp_path / "n", **quiet)
    s, n = read_losses(tmp_path / "s"), read_losses(tmp_path / "n")
    assert abs(s[0]["loss"] - n[0]["loss"]) > 1e-3
    assert s[0]["kl"] == pytest.approx(0.0, abs=1e-6) and s[1]["kl"] > 0
