"""Grouped-query attention over head-major keys and values, in query chunks.

Keys and values are head-major, `k, v [B, K, S, Dh]`: the layout of the KV cache (each
head's slots contiguous, what a matmul over the slots and the TPU kernels read in place) and
of a call's fresh keys (transposed once after the projection). Query head `n` reads key/value
head `n // G` (`G = H / K`) without repeating keys/values. The numerics are those of
`jax.nn.dot_product_attention`'s XLA path (which takes `[B, S, K, Dh]`): scores in float32
(for bf16 inputs too) scaled by `Dh ** -0.5`, a masked score -0.7 x the float32 maximum (so a
fully masked row gets uniform weights, never NaN), softmax in float32, the probabilities cast
to the value dtype before mixing, as transformers does.

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
    """`q [B, C, H, Dh]` over `k, v [B, K, S, Dh]` (`H` a multiple of `K`) with `mask
    [B, C, S]` (True = may attend) -> `[B, C, H, Dh]` in `q.dtype`."""
    b, c, h, dh = q.shape
    kh = k.shape[1]
    q = q.reshape(b, c, kh, h // kh, dh)
    scores = jnp.einsum("bckgd,bksd->bkgcs", q, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(dh**-0.5)
    scores = jnp.where(mask[:, None, None], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgcs,bksd->bckgd", probs, v)
    return out.reshape(b, c, h, dh).astype(q.dtype)


MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)
"""The score of a key a query may not attend (as `jax.nn.dot_product_attention`)."""


def chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int
) -> jax.Array:
    """`attend` (`q [B, T, H, Dh]`, `k, v [B, K, S, Dh]`, `mask [B, T, S]`) computed `chunk`
    queries at a time when `T > chunk`.

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
