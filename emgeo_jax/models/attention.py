"""Grouped-query attention through `jax.nn.dot_product_attention`, in query chunks.

`jax.nn.dot_product_attention` does GQA without repeating keys/values (query head n reads
key/value head n // G), computes the scores in float32 (for bf16 inputs too), the softmax in
float32, and casts the probabilities to the value dtype before mixing, as transformers does.
Its implementation is left to JAX: XLA on CPU and TPU, the cuDNN fused kernel on GPU when
the inputs qualify. A masked score is a large negative number, so a fully masked row gets
uniform weights, never NaN.

Memory: the scores of one call are `[B, H, C, S]` float32 for `C` queries. A call with more
than `query_chunk` queries (`RunOptions.query_chunk`) attends `query_chunk` of them at a
time, each over all keys (its whole softmax row: exact, not an approximation): for a 7B
model at `B = 8, T = S = 2048` about 0.9 GB of scores per layer instead of 3.7 GB. Shorter
calls, every decode step among them, run in one shot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """`q [B, C, H, Dh]` over `k, v [B, S, K, Dh]` (`H` a multiple of `K`) with `mask
    [B, C, S]` (True = may attend) -> `[B, C, H, Dh]`, scaled by `Dh ** -0.5`."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int
) -> jax.Array:
    """`attend` (same shapes, `C = T`) computed `chunk` queries at a time when `T > chunk`.

    The queries and mask rows are padded to a multiple of `chunk` (padded rows are fully
    masked, their output dropped) and `jax.lax.map` runs one chunk per step against all `S`
    keys, so only one chunk's scores exist at a time. Each step is a `jax.checkpoint`: the
    backward pass recomputes a chunk's probabilities instead of keeping all of them.
    `T <= chunk` is one `attend` call, nothing else."""
    b, t = q.shape[:2]
    if t <= chunk:
        return attend(q, k, v, mask)
    n = -(-t // chunk)
    pad = n * chunk - t
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    # [n, B, chunk, ...]: lax.map runs over the leading axis
    q_chunks = jnp.moveaxis(q.reshape(b, n, chunk, *q.shape[2:]), 1, 0)
    mask_chunks = jnp.moveaxis(mask.reshape(b, n, chunk, mask.shape[-1]), 1, 0)
    step = jax.checkpoint(lambda qm: attend(qm[0], k, v, qm[1]), prevent_cse=False)
    out = jax.lax.map(step, (q_chunks, mask_chunks))  # [n, B, chunk, H, Dh]
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, *out.shape[3:])[:, :t]
