"""The Llama / Qwen2 decoder blocks in Flax NNX, their layers stacked on a leading `[L]` axis
(or, for decoding, unstacked: `Transformer(..., scan_layers=False)`).

Both families are the same network: token embedding, `L` pre-norm decoder blocks
(RMSNorm -> rotary GQA attention -> residual add, RMSNorm -> SwiGLU MLP -> residual add),
a final RMSNorm and an LM head (tied to the embedding or not). They differ only in config:
Qwen2 has q/k/v biases; Llama-3 has frequency-scaled rope. Axis names are those of
`emgeo_jax.models.config` (B, T, D, L, H, K, Dh, F, V).

Weights use the Flax layout `kernel [in, out]`; `emgeo_jax.convert.hf` maps HF names to
these paths. The stacked layer parameters carry a leading `[L]` axis.

The residual stream "after block l" (`resid_post[l]`) is HF `hidden_states[l + 1]`.

This module holds the network's pieces and nothing about how a call runs them: the one
layer scan is `emgeo_jax.models.scan`, and the functions per use (forward, prefill,
decode_step, ...) are in `emgeo_jax.models.lm`.

Numerics (`dtype`, the compute dtype, e.g. bfloat16 as on accelerators): parameters, the
residual stream, projections, the KV cache and the MLP are in `dtype`; the RMSNorm statistics,
rotary embedding, attention scores and softmax, steering edits, pooled taps and the logits are
float32 (matmuls feeding them accumulate in float32 via `preferred_element_type`). With
`dtype=float32` all of these are simply float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from emgeo_jax.models.config import ModelConfig, rope_inv_freq
from emgeo_jax.models.params import LORA_MODULES
from emgeo_jax.models.taps import BlockOut


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32 and cast back before the scale, as transformers does."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        del rngs
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)


def rotary_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`sin, cos` of shape `[B, T, Dh/2]` (fp32) for integer `positions [B, T]`."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate `x [B, T, heads, Dh]` in the HF "rotate_half" layout (first/second half pairs)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@struct.dataclass
class LoraInput:
    """Unmerged LoRA factors, applied inside the layer scan (training, LoRA dropout).

    `factors[module] = {"a": [L, in, r], "b": [L, r, out]}` (float32) for some of
    `LORA_MODULES`, zero rows for blocks without an adapter, `b` already multiplied by the
    LoRA scale. At block `l` the module's output gains `dropout(x) @ a[l] @ b[l]` (float32,
    cast to the output dtype), `x [B, T, in]` its input: PEFT's `lora_dropout`, zeroing each
    element of the adapter's input (never the base path's) with probability `rate` and
    scaling the rest by `1 / (1 - rate)`; the mask is `jax.random.bernoulli(k, 1 - rate,
    x.shape)` with `k = fold_in(fold_in(key, l), LORA_MODULES.index(module))`. `rate` is
    static; with `rate = 0`, `key` is unused. Inside the scan the same class holds one
    block's factors and `fold_in(key, l)`."""

    factors: dict[str, dict[str, jax.Array]]
    key: jax.Array | None = None
    rate: float = struct.field(pytree_node=False, default=0.0)

    def project(self, module: nnx.Linear, x: jax.Array, name: str) -> jax.Array:
        """`module(x)` plus this block's adapter on `name` (if any)."""
        y = module(x)
        if name not in self.factors:
            return y
        h = x.astype(jnp.float32)
        if self.rate > 0:
            key = jax.random.fold_in(self.key, LORA_MODULES.index(name))
            keep = jax.random.bernoulli(key, 1.0 - self.rate, h.shape)
            h = jnp.where(keep, h / (1.0 - self.rate), 0.0)
        f = self.factors[name]
        return y + ((h @ f["a"]) @ f["b"]).astype(y.dtype)


def _project(module: nnx.Linear, x: jax.Array, lora: LoraInput | None, name: str) -> jax.Array:
    return module(x) if lora is None else lora.project(module, x, name)


Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""`attend(q [B, T, H, Dh], k, v [B, K, S, Dh]) -> [B, T, H, Dh]`: the attention of one call,
its mask and implementation bound (`emgeo_jax.models.scan.BlockContext.attend`)."""


class Attention(nnx.Module):
    """Rotary grouped-query attention: `H` query heads in `K` groups of `G = H / K`, each
    group sharing one key/value head (`emgeo_jax.models.attention`)."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d, h * dh, use_bias=cfg.qkv_bias, **lin)
        self.k_proj = nnx.Linear(d, k * dh, use_bias=cfg.qkv_bias, **lin)
        self.v_proj = nnx.Linear(d, k * dh, use_bias=cfg.qkv_bias, **lin)
        self.o_proj = nnx.Linear(h * dh, d, use_bias=cfg.o_bias, **lin)
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, dh

    def __call__(
        self,
        x: jax.Array,
        sin: jax.Array,
        cos: jax.Array,
        attend: Attend,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | int = 0,
        lora: LoraInput | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """`x [B, T, D]` -> `([B, T, D], kv)`. Keys and values are head-major, `[B, K, T, Dh]`
        (transposed once after the projection). Without a cache, `attend` runs over this
        call's `T` keys. With `kv = (k, v)`, each `[B, K, S, Dh]`, this call's keys and values
        are written at slots `index .. index+T-1`, `attend` runs over all `S` slots, and the
        updated `kv` is returned. `attend` carries the call's mask and implementation
        (`Attend`). `lora`: this block's unmerged adapters (`LoraInput`)."""
        b, t, _ = x.shape
        k_heads, dh = self.num_kv_heads, self.head_dim
        q = _project(self.q_proj, x, lora, "q_proj").reshape(b, t, self.num_heads, dh)
        k = _project(self.k_proj, x, lora, "k_proj").reshape(b, t, k_heads, dh)
        q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
        v = _project(self.v_proj, x, lora, "v_proj").reshape(b, t, k_heads, dh)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # head-major [B, K, T, Dh]
        if kv is not None:
            start = (0, 0, index, 0)
            kv = tuple(
                jax.lax.dynamic_update_slice(c, n.astype(c.dtype), start)
                for c, n in zip(kv, (k, v), strict=True)
            )
            k, v = kv
        out = attend(q, k, v)
        return _project(self.o_proj, out.reshape(b, t, self.num_heads * dh), lora, "o_proj"), kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(d, f, **lin)
        self.up_proj = nnx.Linear(d, f, **lin)
        self.down_proj = nnx.Linear(f, d, **lin)

    def __call__(self, x: jax.Array, lora: LoraInput | None = None) -> tuple[jax.Array, jax.Array]:
        """SwiGLU: `x [B, T, D]` -> `(out [B, T, D], hidden [B, T, F])`, `hidden =
        silu(gate(x)) * up(x)` the down projection's input."""
        gate = _project(self.gate_proj, x, lora, "gate_proj")
        hidden = jax.nn.silu(gate) * _project(self.up_proj, x, lora, "up_proj")
        return _project(self.down_proj, hidden, lora, "down_proj"), hidden


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, dtype=dtype, **kw)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, dtype=dtype, **kw)

    def __call__(
        self,
        x: jax.Array,
        sin: jax.Array,
        cos: jax.Array,
        attend: Attend,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | int = 0,
        lora: LoraInput | None = None,
    ) -> tuple[BlockOut, tuple[jax.Array, jax.Array] | None]:
        """`x [B, T, D]` (the residual entering the block) -> `(BlockOut, kv)`: the block's
        named intermediates (`emgeo_jax.models.taps`), `resid_post = x + attn_out +
        mlp_out`; `attend`, `kv`, `index`, `lora` as in `Attention`."""
        attn_in = self.input_norm(x)
        attn_out, kv = self.attn(attn_in, sin, cos, attend, kv, index, lora)
        h = x + attn_out
        mlp_in = self.post_attn_norm(h)
        mlp_out, mlp_hidden = self.mlp(mlp_in, lora)
        return BlockOut(h + mlp_out, attn_out, mlp_out, attn_in, mlp_in, mlp_hidden), kv


class KVCache(NamedTuple):
    """A preallocated key/value cache shared by all rows of a batch.

    `k, v [L, B, K, S, Dh]`, head-major (each head's slots contiguous: attention reads them in
    place; for unstacked layers: tuples of `L` arrays `[B, K, S, Dh]`, one buffer per layer,
    updated in place); `mask [B, S]` int32 (1 = slot holds a real token);
    `index []` int32: the next slot to write (all rows advance together, left padding
    keeps prompts aligned)."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array


def cache_shapes(
    cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32, *, per_layer: bool = False
) -> KVCache:
    """The shapes and dtypes (`jax.ShapeDtypeStruct`) of an empty cache for `batch` rows of
    `length` slots (prompt + new tokens): `k, v [L, B, K, S, Dh]` (`per_layer`: `L` buffers
    `[B, K, S, Dh]`, the layout unstacked layers run on), `mask [B, S]` and `index []` int32."""
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    if per_layer:
        kv = (jax.ShapeDtypeStruct(shape, dtype),) * cfg.num_layers
    else:
        kv = jax.ShapeDtypeStruct((cfg.num_layers, *shape), dtype)
    return KVCache(
        k=kv,
        v=kv,
        mask=jax.ShapeDtypeStruct((batch, length), jnp.int32),
        index=jax.ShapeDtypeStruct((), jnp.int32),
    )


def init_cache(
    cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32, *, per_layer: bool = False
) -> KVCache:
    """An empty cache of `cache_shapes` (zeros)."""
    shapes = cache_shapes(cfg, batch, length, dtype, per_layer=per_layer)
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


class Transformer(nnx.Module):
    """The whole decoder. `Transformer(cfg, rngs=...)` gives a randomly initialised model;
    converters build it abstractly (`nnx.eval_shape`) and fill in real weights.

    `layers`: the `L` blocks, stacked (one `DecoderBlock` whose parameters have a leading
    `[L]` axis, run by one `jax.lax.scan`) or, with `scan_layers=False`, unstacked (an
    `nnx.List` of `L` blocks with their own weight buffers, run by an unrolled loop: a decode
    step then reads every weight in place instead of slicing it out of the stack; MaxText's
    `scan_layers=false` for inference; `emgeo_jax.models.lm.unstack_layers`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        self.config = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs: nnx.Rngs) -> DecoderBlock:
            return DecoderBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        if scan_layers:
            self.layers = stacked_blocks(rngs)
        else:
            kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.layers = nnx.List([DecoderBlock(cfg, **kw) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                preferred_element_type=jnp.float32,
                rngs=rngs,
            )
        )

    @property
    def scan_layers(self) -> bool:
        """True when `layers` is one stacked block (`[L, ...]` parameters)."""
        return not isinstance(self.layers, nnx.List)

    def logits(self, h: jax.Array) -> jax.Array:
        """The LM head on final-normed `h [B, T, D]` -> float32 logits `[B, T, V]`: the
        matmul reads `h` and the weights in the model dtype and accumulates and returns
        float32 (bf16 logits would be rounded to ~3 significant digits)."""
        if self.lm_head is not None:
            return self.lm_head(h)
        embedding = self.embed.embedding[...]
        h = h.astype(embedding.dtype)
        return jnp.dot(h, embedding.T, preferred_element_type=jnp.float32)

    def head(self, h: jax.Array) -> jax.Array:
        """The final norm and LM head on the last block's output `h [B, T, D]` -> float32
        logits `[B, T, V]`."""
        return self.logits(self.final_norm(h))


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions `[B, T]` that count real tokens only, so left padding does not shift rope."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
