"""Supervised LoRA fine-tuning with optax: loss on assistant tokens, AdamW with warmup and a
decay schedule, gradient clipping and accumulation, optional KL-to-base regulariser and a
`Steering` applied while training (preventative steering / concept ablation).

The step is one jitted function of `(lora, opt_state, params, batch, steering, key)`; params
stay frozen (any dtype, possibly sharded over a mesh), the LoRA factors and optimizer state
are fp32. Batches are `[B, T]` dicts from `emgeo_jax.train.data.train_batch`. The adapters
run unmerged inside the layer scan (`emgeo_jax.train.lora.lora_input`), with PEFT's
`lora_dropout` on their inputs when `TrainConfig.lora_dropout > 0` (`key`: the micro-batch's
dropout key, `dropout_key(seed, index)`).

Memory: with `TrainConfig.remat` each decoder block is recomputed in the backward pass (only
the residual entering each block is kept), and with a mesh the residual stream, logits and
LoRA state are pinned to their `emgeo_jax.parallel` shardings (batch over `data x fsdp`), so
each device holds its own rows' activations and logits and gathers one layer's weights at a
time (`emgeo plan --task train` measures it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from emgeo_jax.models.lm import train_forward
from emgeo_jax.models.scan import RunOptions
from emgeo_jax.models.steering import Steering
from emgeo_jax.parallel import activation_sharding, lora_shardings
from emgeo_jax.train.lora import Lora, LoraSpec, lora_input

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. `steps` counts optimizer updates; each takes `grad_accum`
    micro-batches of `batch_size` rows (gradients averaged over micro-batches). The learning
    rate rises linearly over `warmup_steps`, then follows `schedule` down to
    `end_lr_fraction * lr` at `steps`. `kl_weight > 0` adds `kl_weight * KL(p_lora || p_base)`
    averaged over answer tokens. `lora_dropout`: PEFT's dropout on the adapter inputs, a
    fresh mask per micro-batch (`dropout_key`). `remat`: recompute each decoder block in the
    backward pass instead of keeping its activations (same gradients, ~1/3 more FLOPs)."""

    steps: int = 100
    lr: float = 1e-4
    warmup_steps: int = 5
    schedule: str = "linear"
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    kl_weight: float = 0.0
    checkpoint_every: int = 50
    lora_dropout: float = 0.0
    remat: bool = True

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: use one of {SCHEDULES}")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be in 0..steps={self.steps} "
                "(flags --warmup_steps, --steps)"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")


def dropout_key(seed: int, index: int) -> jax.Array:
    """The LoRA-dropout key of micro-batch `index` of a run seeded `seed` (a pure function, so
    a resumed run draws the same masks; a stream apart from the LoRA init's `key(seed)`)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), index)


def learning_rate(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then `tc.schedule` decay to `end_lr_fraction * lr`."""
    decay_steps = max(tc.steps - tc.warmup_steps, 1)
    end = tc.lr * tc.end_lr_fraction
    if tc.schedule == "cosine":
        decay = optax.cosine_decay_schedule(tc.lr, decay_steps, alpha=tc.end_lr_fraction)
    elif tc.schedule == "linear":
        decay = optax.linear_schedule(tc.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(tc.lr)
    warm = optax.linear_schedule(0.0, tc.lr, tc.warmup_steps)
    return optax.join_schedules([warm, decay], [tc.warmup_steps])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; wrapped in `optax.MultiSteps` for accumulation."""
    opt = optax.chain(
        optax.clip_by_global_norm(tc.max_grad_norm),
        optax.adamw(learning_rate(tc), weight_decay=tc.weight_decay),
    )
    return optax.MultiSteps(opt, every_k_schedule=tc.grad_accum)


def answer_nll(
    logits: jax.Array, input_ids: jax.Array, answer_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood over answer tokens, and their count.

    `logits [B, T, V]` predict `input_ids [B, T]` one step ahead; token `t+1` counts when
    `answer_mask[b, t+1]` (so prompt tokens, and the logits predicting them, carry no loss)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = input_ids[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    w = answer_mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def answer_kl(logits: jax.Array, base_logits: jax.Array, answer_mask: jax.Array) -> jax.Array:
    """Summed `KL(softmax(logits) || softmax(base_logits))` over the positions that predict
    answer tokens (as in `answer_nll`)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(base_logits[:, :-1].astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    return jnp.sum(kl * answer_mask[:, 1:].astype(jnp.float32))


def lora_loss(
    lora: Lora,
    graphdef: Any,
    params: Any,
    batch: dict[str, jax.Array],
    spec: LoraSpec,
    steering: Steering | None = None,
    kl_weight: float = 0.0,
    dropout: float = 0.0,
    key: jax.Array | None = None,
    *,
    remat: bool = False,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean answer-token NLL of the model with `lora` applied unmerged, with `dropout` on the
    adapter inputs drawn from `key` (plus `kl_weight` * mean KL to the base model, which runs
    with the same steering). `steering` acts on every token in mode "all"; its
    "prompt"/"generated" modes mean question/answer tokens here. `remat` (static): recompute
    blocks in the backward pass. `mesh`: pin the residual stream `[B, T, D]` and the logits
    `[B, T, V]` to their activation shardings (rows over `data x fsdp`)."""
    ids, mask, answer = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
    b, t = ids.shape
    resid_sharding = None
    if mesh is not None:
        width = jax.tree.leaves(params["embed"])[0].shape[-1]  # embedding [V, D]
        resid_sharding = activation_sharding(mesh, "hidden", (b, t, width))
    run = functools.partial(
        train_forward,
        graphdef,
        input_ids=ids,
        positions=batch["positions"],
        attention_mask=mask,
        steering=steering,
        is_generated=answer.astype(bool),
        options=RunOptions(remat=remat, resid_sharding=resid_sharding),
    )

    def logits_of(logits):
        if mesh is None:
            return logits
        pinned = activation_sharding(mesh, "logits", logits.shape)
        return jax.lax.with_sharding_constraint(logits, pinned)

    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    logits = logits_of(run(params, lora=lora_input(lora, spec, num_layers, dropout, key)))
    nll, count = answer_nll(logits, ids, answer)
    count = jnp.maximum(count, 1.0)
    loss = nll / count
    aux = {"nll": loss, "tokens": count}
    if kl_weight:
        base = jax.lax.stop_gradient(logits_of(run(params)))
        kl = answer_kl(logits, base, answer) / count
        loss = loss + kl_weight * kl
        aux["kl"] = kl
    return loss, aux


def make_train_step(graphdef: Any, spec: LoraSpec, tc: TrainConfig, mesh: Mesh | None = None):
    """`step(lora, opt_state, params, batch, steering, key) -> (lora, opt_state, metrics)`,
    jitted with the LoRA and optimizer state donated; `key` seeds the LoRA dropout (unused
    when `tc.lora_dropout` is 0). `metrics`: loss, nll, tokens, grad_norm (and kl). With
    `mesh`, activations are pinned as in `lora_loss` and the new LoRA and optimizer state
    keep `parallel.lora_shardings` (place the initial ones there too)."""
    optimizer = make_optimizer(tc)
    grad_fn = jax.value_and_grad(
        functools.partial(lora_loss, remat=tc.remat, mesh=mesh), has_aux=True
    )

    def pin(tree):
        return (
            tree
            if mesh is None
            else jax.lax.with_sharding_constraint(tree, lora_shardings(mesh, tree))
        )

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(lora, opt_state, params, batch, steering, key):
        (loss, aux), grads = grad_fn(
            lora, graphdef, params, batch, spec, steering, tc.kl_weight, tc.lora_dropout, key
        )
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return pin(lora), pin(opt_state), metrics

    return step, optimizer
