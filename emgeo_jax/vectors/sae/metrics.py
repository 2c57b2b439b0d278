"""How well an SAE fits a model's activations.

From residual activations `x [N, D]` (streamed in chunks):

    mse        mean over tokens and dims of (x - x_hat)^2
    fve        1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   (fraction of variance explained)
    l0         mean number of active features per token
    dead       features never active on any token (count and fraction of F)

From the model (`NllFn`, see `runner`): mean next-token loss with the residual after the SAE's
layer left alone, replaced by the reconstruction, and replaced by zeros, and
`loss_recovered = (zero - sae) / (zero - clean)` (1 = the SAE loses nothing). A base-model SAE
that does not transfer to a fine-tuned model shows a low fve and loss_recovered there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from emgeo_jax.vectors.sae.model import SAE, decode, encode
from emgeo_jax.vectors.sae.runner import NllFn, valid_targets


@dataclasses.dataclass
class FitStats:
    n_tokens: int
    mse: float
    fve: float
    l0: float
    dead: int
    dead_fraction: float
    loss_clean: float | None = None
    loss_sae: float | None = None
    loss_zero: float | None = None
    loss_recovered: float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@jax.jit
def _chunk_sums(sae: SAE, x: jax.Array):
    x = x.astype(jnp.float32)
    f = encode(sae, x)
    err = x - decode(sae, f)
    active = f > 0
    return (
        jnp.sum(err * err),
        jnp.sum(x, axis=0),
        jnp.sum(x * x),
        jnp.sum(active),
        jnp.any(active, axis=0),
    )


def activation_fit(sae: SAE, chunks: Iterable) -> FitStats:
    """MSE, FVE, L0 and dead features over `chunks` of raw activations `[n, D]`."""
    n, sse, sum_x2, l0 = 0, 0.0, 0.0, 0
    sum_x = np.zeros(sae.d_in, np.float64)
    fired = jnp.zeros(sae.d_sae, bool)
    for chunk in chunks:
        chunk = jnp.asarray(chunk).reshape(-1, sae.d_in)
        s_err, s_x, s_x2, s_l0, s_fired = _chunk_sums(sae, chunk)
        n += chunk.shape[0]
        sse += float(s_err)
        sum_x += np.asarray(s_x, np.float64)
        sum_x2 += float(s_x2)
        l0 += int(s_l0)
        fired = fired | s_fired
    if n == 0:
        raise ValueError("activation_fit: no activations given")
    total_var = sum_x2 - float(sum_x @ sum_x) / n
    dead = int(sae.d_sae - int(jnp.sum(fired)))
    return FitStats(
        n_tokens=n,
        mse=sse / (n * sae.d_in),
        fve=1.0 - sse / total_var,
        l0=l0 / n,
        dead=dead,
        dead_fraction=dead / sae.d_sae,
    )


def loss_fit(sae: SAE, nll_fn: NllFn, batches: Iterable, layer: int) -> dict[str, float]:
    """Mean next-token loss over real targets of `batches` of `(input_ids, attention_mask)`:
    clean, with the SAE reconstruction at `layer`, with zeros there; and loss_recovered."""
    totals, count = np.zeros(3), 0
    for ids, mask in batches:
        nll = np.asarray(nll_fn(ids, mask, layer, sae), np.float64)
        totals += nll.reshape(3, -1).sum(axis=1)
        count += int(valid_targets(mask).sum())
    if count == 0:
        raise ValueError("loss_fit: no real next-token targets in the batches")
    clean, with_sae, zero = totals / count
    return dict(
        loss_clean=clean,
        loss_sae=with_sae,
        loss_zero=zero,
        loss_recovered=(zero - with_sae) / (zero - clean),
    )
