"""The two model calls the SAE tools need, and their implementations on our model's forward.

Interfaces (any callable with these signatures will do):

    ResidFn(input_ids [B, T], attention_mask [B, T], layer, steering_add [D] | None)
        -> residual after block `layer` [B, T, D], with `steering_add` added to the residual
           after block `layer - 1` at every real token (seed 000's "steer L-1, read L").
    NllFn(input_ids [B, T], attention_mask [B, T], layer, sae)
        -> next-token NLL [3, B, T-1] (float32) with the residual after block `layer`
           left alone (0), replaced by the SAE reconstruction (1), replaced by zeros (2),
           at real tokens; entries whose target is padding are 0.

`make_resid_fn(lm)` is one forward (`emgeo_jax.models.lm.forward`) with a `Steering` at
block `layer - 1`, stopped after block `layer`. `make_nll_fn(lm)` runs blocks `0..layer`,
edits their output, and resumes from the edited residual (`emgeo_jax.models.lm.resume_from`
at block `layer + 1`), so the edit flows through the real remaining blocks.

On `lm.mesh` both split their rows over `data x fsdp`, padding a batch those axes do not
divide (`LM.place_rows`; the added rows are dropped from the result), so the figures equal
one device's within float tolerance. They return arrays on the mesh of one process's run;
`np.asarray` them in single-process use (several processes: `emgeo_jax.hosts.to_host`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from emgeo_jax.models.llama import default_positions
from emgeo_jax.models.lm import forward, pad_rows, resume_from
from emgeo_jax.models.steering import Steering
from emgeo_jax.models.taps import Taps
from emgeo_jax.vectors.sae.model import SAE, check_fits, reconstruct

ResidFn = Callable[..., jax.Array]
NllFn = Callable[..., jax.Array]


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _resid(graphdef, params, input_ids, attention_mask, steering, layer: int):
    """Residual after block `layer` `[B, T, D]`, with `steering` (or None) applied inside."""
    out = forward(
        graphdef,
        params,
        input_ids,
        default_positions(attention_mask),
        attention_mask,
        steering=steering,
        taps=Taps(resid="full"),
        num_layers=layer + 1,
    )
    return out.resid_post[layer]


def make_resid_fn(lm) -> ResidFn:
    """A `ResidFn` on a loaded `emgeo_jax.LM` (see module docstring)."""
    n_layers = lm.config.num_layers

    def resid_fn(input_ids, attention_mask, layer: int, steering_add=None) -> jax.Array:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} outside 0..{n_layers - 1}")
        if steering_add is not None and layer == 0:
            raise ValueError("steering at layer -1 (the embeddings) is not supported")
        host = {
            "ids": np.asarray(input_ids, np.int32),
            "mask": np.asarray(attention_mask, np.int32),
        }
        rows, n = lm.place_rows(host)
        steering = None
        if steering_add is not None:
            real = pad_rows(host, lm.batch_multiple)["mask"].astype(bool)
            steering = Steering.addition(lm, steering_add, layers=layer - 1, positions=real)
        out = _resid(lm.graphdef, lm.params, rows["ids"], rows["mask"], steering, layer)
        return out if len(out) == n else out[:n]

    return resid_fn


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def _nll_with_sae(graphdef, params, sae: SAE, input_ids, attention_mask, layer: int):
    positions = default_positions(attention_mask)
    h = _resid(graphdef, params, input_ids, attention_mask, None, layer)
    real = attention_mask[..., None].astype(bool)
    recon = jnp.where(real, reconstruct(sae, h).astype(h.dtype), h)
    zero = jnp.where(real, jnp.zeros_like(h), h)
    tile = lambda a: jnp.concatenate([a] * 3)  # noqa: E731
    logits = resume_from(
        graphdef,
        params,
        jnp.concatenate([h, recon, zero]),  # [3B, T, D]: the residual entering block layer+1
        layer + 1,
        tile(positions),
        tile(attention_mask),
    ).logits
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
        host = {
            "ids": np.asarray(input_ids, np.int32),
            "mask": np.asarray(attention_mask, np.int32),
        }
        rows, n = lm.place_rows(host)
        out = _nll_with_sae(lm.graphdef, lm.params, sae, rows["ids"], rows["mask"], layer)
        return out if out.shape[1] == n else out[:, :n]

    return nll_fn


def valid_targets(attention_mask) -> np.ndarray:
    """`[B, T-1]` 1 where both a token and its next-token target are real."""
    m = np.asarray(attention_mask)
    return m[:, 1:] * m[:, :-1]
