"""What to read out of the blocks, as data: a `Taps` names capture sites and how each is
reduced on device (a pytree passed into the jitted model functions, never a callback).

Every decoder block returns its intermediates under fixed names (`BlockOut`, one field per
capture site, all `[B, T, width]`):

    resid_post  [B, T, D]  the block's output (layer l = HF `hidden_states[l + 1]`)
    attn_out    [B, T, D]  the attention output added into the residual stream
    mlp_out     [B, T, D]  the MLP output added into the residual stream
    attn_in     [B, T, D]  input_norm(residual entering the block): q/k/v projections' input
    mlp_in      [B, T, D]  post_attn_norm(residual + attn_out): gate/up projections' input
    mlp_hidden  [B, T, F]  silu(gate) * up: the down projection's input

A tapped site comes back stacked over the blocks run, `[L', ...]`, reduced per `kind`:
"full" (as is), "pooled" (float32 sum over the `pool_mask` tokens, `[L', B, width]`, with
`counts [B]` in the output) or "last" (`[L', B, width]` at the last `pool_mask` token).
Sites not tapped are never materialised (XLA drops them).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

TAP_KINDS = ("full", "pooled", "last")


class BlockOut(NamedTuple):
    """One block's named intermediates (module docstring), each `[B, T, width]`."""

    resid_post: jax.Array
    attn_out: jax.Array
    mlp_out: jax.Array
    attn_in: jax.Array
    mlp_in: jax.Array
    mlp_hidden: jax.Array


SITES = BlockOut._fields


@struct.dataclass
class Taps:
    """Which sites to read and how (each field: None or one of `TAP_KINDS`, static).

    `resid` reads `resid_post`, `attn` reads `attn_out`, `mlp` reads `mlp_out`; `attn_in`,
    `mlp_in`, `mlp_hidden` read the module inputs of that name (LoRA scalars). `pool_mask
    [B, T]` (default: the attention mask) selects the tokens pooled, or whose last one is
    read."""

    resid: str | None = struct.field(pytree_node=False, default=None)
    attn: str | None = struct.field(pytree_node=False, default=None)
    mlp: str | None = struct.field(pytree_node=False, default=None)
    attn_in: str | None = struct.field(pytree_node=False, default=None)
    mlp_in: str | None = struct.field(pytree_node=False, default=None)
    mlp_hidden: str | None = struct.field(pytree_node=False, default=None)
    pool_mask: jax.Array | None = None

    def __post_init__(self):
        for site, kind in self.kinds().items():
            if kind is not None and kind not in TAP_KINDS:
                raise ValueError(f"Taps: {site}={kind!r}: use None or one of {TAP_KINDS}")

    def kinds(self) -> dict[str, str | None]:
        """`{site name (a BlockOut field): kind or None}`."""
        fields = (self.resid, self.attn, self.mlp, self.attn_in, self.mlp_in, self.mlp_hidden)
        return dict(zip(SITES, fields, strict=True))

    @property
    def pools(self) -> bool:
        """Whether some site is "pooled" (the output then carries `counts [B]`)."""
        return "pooled" in self.kinds().values()


class TapReduction(NamedTuple):
    """The per-call data a reduction needs: `weights [B, T]` float32 (1 = pooled token) and
    `last [B]` int32 (the last pooled token of each row)."""

    weights: jax.Array
    last: jax.Array

    @classmethod
    def of(cls, pool_mask: jax.Array) -> TapReduction:
        t = pool_mask.shape[1]
        last = t - 1 - jnp.argmax(pool_mask[:, ::-1].astype(bool), axis=1)
        return cls(pool_mask.astype(jnp.float32), last)


def reduce_tap(x: jax.Array, kind: str | None, by: TapReduction) -> jax.Array | None:
    """`x [B, T, W]` -> per `kind`: itself, float32 masked sum `[B, W]` or the row at `last`."""
    if kind is None:
        return None
    if kind == "full":
        return x
    if kind == "pooled":
        return jnp.einsum("btd,bt->bd", x.astype(jnp.float32), by.weights)
    return jnp.take_along_axis(x, by.last[:, None, None], axis=1)[:, 0]


def reduce_block(out: BlockOut, taps: Taps, by: TapReduction) -> dict[str, jax.Array]:
    """The tapped sites of one block's `out`, reduced: `{site: array}` (untapped sites absent)."""
    return {
        site: reduce_tap(getattr(out, site), kind, by)
        for site, kind in taps.kinds().items()
        if kind is not None
    }
