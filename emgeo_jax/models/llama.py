"""The Llama / Qwen2 decoder in Flax NNX, with its layers stacked and run by one `lax.scan`.

Both families are the same network: token embedding, `L` pre-norm decoder blocks
(RMSNorm -> rotary GQA attention -> residual add, RMSNorm -> SwiGLU MLP -> residual add),
a final RMSNorm and an LM head (tied to the embedding or not). They differ only in config:
Qwen2 has q/k/v biases; Llama-3 has frequency-scaled rope. Axis names are those of
`emgeo_jax.models.config` (B, T, D, L, H, K, Dh, F, V).

Weights use the Flax layout `kernel [in, out]`; `emgeo_jax.convert.hf` maps HF names to
these paths. The stacked layer parameters carry a leading `[L]` axis.

The residual stream "after block l" (`resid_post[l]`) is HF `hidden_states[l + 1]`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from emgeo_jax.models.config import ModelConfig, rope_inv_freq


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


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d, h * dh, use_bias=cfg.qkv_bias, **lin)
        self.k_proj = nnx.Linear(d, k * dh, use_bias=cfg.qkv_bias, **lin)
        self.v_proj = nnx.Linear(d, k * dh, use_bias=cfg.qkv_bias, **lin)
        self.o_proj = nnx.Linear(h * dh, d, use_bias=cfg.o_bias, **lin)
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, dh

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, mask: jax.Array) -> jax.Array:
        """`x [B, T, D]`, `mask [B, T, T]` (True = query may attend to key) -> `[B, T, D]`."""
        b, t, _ = x.shape
        k_heads, group, dh = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = apply_rotary(self.q_proj(x).reshape(b, t, self.num_heads, dh), sin, cos)
        k = apply_rotary(self.k_proj(x).reshape(b, t, k_heads, dh), sin, cos)
        v = self.v_proj(x).reshape(b, t, k_heads, dh)
        q = q.reshape(b, t, k_heads, group, dh)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * dh**-0.5
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, self.num_heads * dh)
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(d, f, **lin)
        self.up_proj = nnx.Linear(d, f, **lin)
        self.down_proj = nnx.Linear(f, d, **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, dtype=dtype, **kw)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, dtype=dtype, **kw)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, mask: jax.Array) -> jax.Array:
        h = x + self.attn(self.input_norm(x), sin, cos, mask)
        return h + self.mlp(self.post_attn_norm(h))


class ForwardOutput(NamedTuple):
    """`logits [B, T, V]` (None when not computed); `resid_post [L, B, T, D]` (None unless
    requested): the residual stream after each block, `resid_post[l] == hidden_states[l+1]`."""

    logits: jax.Array | None
    resid_post: jax.Array | None


class Transformer(nnx.Module):
    """The whole decoder. `Transformer(cfg, rngs=...)` gives a randomly initialised model;
    converters build it abstractly (`nnx.eval_shape`) and fill in real weights."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
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

        self.layers = stacked_blocks(rngs)
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
                rngs=rngs,
            )
        )

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        *,
        return_residual: bool = False,
        return_logits: bool = True,
    ) -> ForwardOutput:
        """`input_ids, positions, attention_mask: [B, T]` (mask: 1 = real token)."""
        cfg = self.config
        t = input_ids.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = causal[None] & attention_mask.astype(bool)[:, None, :]
        sin, cos = rotary_tables(cfg, positions)

        block_def, block_params = nnx.split(self.layers)

        def run_block(h, layer_params):
            h = nnx.merge(block_def, layer_params)(h, sin, cos, mask)
            return h, (h if return_residual else None)

        h, resid = jax.lax.scan(run_block, self.embed(input_ids), block_params)
        logits = None
        if return_logits:
            h = self.final_norm(h)
            logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        return ForwardOutput(logits=logits, resid_post=resid)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions `[B, T]` that count real tokens only, so left padding does not shift rope."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
