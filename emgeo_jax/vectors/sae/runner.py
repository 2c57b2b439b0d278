"""The two model calls the SAE tools need, and their default implementations on our model.

Interfaces (any callable with these signatures will do, e.g. one built on the steering
forward of `emgeo_jax.steer` once that is the standard path):

    ResidFn(input_ids [B, T], attention_mask [B, T], layer, steering_add [D] | None)
        -> residual after block `layer` [B, T, D], with `steering_add` added to the residual
           after block `layer - 1` at every real token (seed 000's "steer L-1, read L").
    NllFn(input_ids [B, T], attention_mask [B, T], layer, sae)
        -> next-token NLL [3, B, T-1] (float32) with the residual after block `layer`
           left alone (0), replaced by the SAE reconstruction (1), replaced by zeros (2),
           at real tokens; entries whose target is padding are 0.

`make_resid_fn(lm)` / `make_nll_fn(lm)` implement them by running the stacked decoder
blocks of `emgeo_jax.models.llama.Transformer` in two slices (blocks `0..layer`, then the
rest), so the edited residual flows through the real remaining blocks. This mirrors
`Transformer.__call__` (mask, rotary tables, embed, scan, final norm, head); it would shrink
to a single call if the model forward accepted an edit at one layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emgeo_jax.models.llama import default_positions, rotary_tables
from emgeo_jax.vectors.sae.model import SAE, check_fits, reconstruct

ResidFn = Callable[..., jax.Array]
NllFn = Callable[..., jax.Array]


def _run_blocks(model, h, lo: int, hi: int, sin, cos, mask):
    """Run decoder blocks `lo..hi-1` of `model` on `h [B, T, D]`."""
    block_def, block_params = nnx.split(model.layers)
    part = jax.tree.map(lambda p: p[lo:hi], block_params)

    def step(x, layer_params):
        return nnx.merge(block_def, layer_params)(x, sin, cos, mask)[0], None

    return jax.lax.scan(step, h, part)[0]


def _prefix(model, input_ids, attention_mask):
    t = input_ids.shape[1]
    positions = default_positions(attention_mask)
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask.astype(bool)[:, None, :]
    sin, cos = rotary_tables(model.config, positions)
    return model.embed(input_ids), sin, cos, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _steered_resid(graphdef, params, input_ids, attention_mask, vec, layer: int):
    model = nnx.merge(graphdef, params)
    h, sin, cos, mask = _prefix(model, input_ids, attention_mask)
    h = _run_blocks(model, h, 0, layer, sin, cos, mask)
    h = h + attention_mask[..., None].astype(h.dtype) * vec.astype(h.dtype)
    return _run_blocks(model, h, layer, layer + 1, sin, cos, mask)


def make_resid_fn(lm) -> ResidFn:
    """A `ResidFn` on a loaded `emgeo_jax.LM` (see module docstring)."""
    d, n_layers = lm.config.hidden_size, lm.config.num_layers

    def resid_fn(input_ids, attention_mask, layer: int, steering_add=None) -> jax.Array:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} outside 0..{n_layers - 1}")
        if steering_add is not None and layer == 0:
            raise ValueError("steering at layer -1 (the embeddings) is not supported")
        vec = jnp.zeros((d,)) if steering_add is None else jnp.asarray(steering_add, jnp.float32)
        if vec.shape != (d,):
            raise ValueError(f"steering_add has shape {vec.shape}, model width is {d}")
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = jnp.asarray(attention_mask, jnp.int32)
        return _steered_resid(lm.graphdef, lm.params, ids, mask, vec, layer)

    return resid_fn


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _nll_with_sae(graphdef, params, sae: SAE, input_ids, attention_mask, layer: int):
    model = nnx.merge(graphdef, params)
    h, sin, cos, mask = _prefix(model, input_ids, attention_mask)
    h = _run_blocks(model, h, 0, layer + 1, sin, cos, mask)
    real = attention_mask[..., None].astype(bool)
    recon = jnp.where(real, reconstruct(sae, h).astype(h.dtype), h)
    zero = jnp.where(real, jnp.zeros_like(h), h)
    variants = jnp.concatenate([h, recon, zero])  # [3B, T, D]
    tile = lambda a: jnp.concatenate([a] * 3)  # noqa: E731
    out = _run_blocks(
        model, variants, layer + 1, model.config.num_layers, tile(sin), tile(cos), tile(mask)
    )
    out = model.final_norm(out)
    logits = model.embed.attend(out) if model.lm_head is None else model.lm_head(out)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = tile(input_ids)[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    valid = tile(attention_mask)[:, 1:] * tile(attention_mask)[:, :-1]
    b = input_ids.shape[0]
    return (nll * valid).reshape(3, b, -1)


def make_nll_fn(lm) -> NllFn:
    """A `NllFn` on a loaded `emgeo_jax.LM` (see module docstring)."""

    def nll_fn(input_ids, attention_mask, layer: int, sae: SAE) -> jax.Array:
        check_fits(sae, lm.config.hidden_size, layer)
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = jnp.asarray(attention_mask, jnp.int32)
        return _nll_with_sae(lm.graphdef, lm.params, sae, ids, mask, layer)

    return nll_fn


def valid_targets(attention_mask) -> np.ndarray:
    """`[B, T-1]` 1 where both a token and its next-token target are real."""
    m = np.asarray(attention_mask)
    return m[:, 1:] * m[:, :-1]
