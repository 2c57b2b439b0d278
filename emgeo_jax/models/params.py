"""The one parameter table: every model parameter's Flax path, HF name, GGUF name, logical
partition axes and LoRA target, in one row each.

Everything that must agree about parameter names derives from `PARAMS`:

* HF conversion (`emgeo_jax.convert.hf`): path -> HF tensor name;
* GGUF conversion (`emgeo_jax.convert.gguf`): GGUF tensor name -> HF tensor name;
* partition rules (`emgeo_jax.parallel`): path -> logical axes, mapped by `MESH_RULES`;
* LoRA (`emgeo_jax.train.lora`, `emgeo_jax.train.peft_io`, the model's `LoraInput`): the
  short target names (`q`, ..., `down`), their kernels and HF module names (`LORA_MODULES`).

Paths are those of `nnx.to_pure_dict` of the model (`emgeo_jax.models.lm.abstract_model`),
e.g. `("layers", "attn", "q_proj", "kernel")`. Rows under `layers` are stacked on a leading
`[L]` axis (decoder block `l` at index `l`; its output is `resid_post[l]` = HF
`hidden_states[l+1]`); their HF / GGUF names contain `{l}`, and their `axes` do not list
the leading `layer` axis (`Param.full_axes` does). A path ending in `kernel` is `[in, out]`
here and `weight [out, in]` in HF / GGUF (transposed); every other parameter has the same
layout in all three. Which rows a given model has depends on its config: biases only with
`qkv_bias` / `o_bias`, `lm_head` only with untied embeddings (`model_params`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from emgeo_jax.models.config import ModelConfig

LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class Param:
    """One row of the parameter table.

    path: Flax pure-dict path (`layers/...` for a per-block parameter).
    hf: HF tensor name (`{l}` = block index for per-block parameters).
    gguf: GGUF (llama.cpp) tensor name, same `{l}` convention.
    axes: logical axes of one block's tensor (Flax layout), mapped to mesh axes by
      `emgeo_jax.parallel.MESH_RULES`.
    lora: short LoRA target name (`q`, `k`, ...) if the kernel can carry an adapter.
    """

    path: tuple[str, ...]
    hf: str
    gguf: str
    axes: tuple[str, ...]
    lora: str | None = None

    @property
    def layered(self) -> bool:
        """Stacked on a leading `[L]` axis under `layers`."""
        return self.path[0] == LAYERS

    @property
    def full_axes(self) -> tuple[str, ...]:
        """Logical axes of the whole leaf, `layer` first for a stacked parameter."""
        return ("layer", *self.axes) if self.layered else self.axes

    @property
    def transposed(self) -> bool:
        """Stored `[in, out]` here, `[out, in]` in HF and GGUF files."""
        return self.path[-1] == "kernel"

    @property
    def module(self) -> str:
        """The HF module name (`q_proj`, ...; PEFT `target_modules` entries)."""
        return self.path[-2]


def _block(sub: tuple[str, ...], hf: str, gguf: str, axes, lora=None) -> Param:
    return Param((LAYERS, *sub), f"model.layers.{{l}}.{hf}", f"blk.{{l}}.{gguf}", axes, lora)


def _linear(group: str, module: str, hf_group: str, gguf: str, axes, lora: str, bias_axes):
    """Kernel (with LoRA target) and bias rows of one linear layer."""
    rows = [
        _block(
            (group, module, "kernel"), f"{hf_group}.{module}.weight", f"{gguf}.weight", axes, lora
        )
    ]
    if bias_axes is not None:
        rows.append(
            _block((group, module, "bias"), f"{hf_group}.{module}.bias", f"{gguf}.bias", bias_axes)
        )
    return rows


PARAMS: tuple[Param, ...] = (
    Param(
        ("embed", "embedding"), "model.embed_tokens.weight", "token_embd.weight", ("vocab", "embed")
    ),
    Param(("final_norm", "scale"), "model.norm.weight", "output_norm.weight", ("embed",)),
    Param(("lm_head", "kernel"), "lm_head.weight", "output.weight", ("embed", "vocab")),
    _block(("input_norm", "scale"), "input_layernorm.weight", "attn_norm.weight", ("embed",)),
    _block(
        ("post_attn_norm", "scale"),
        "post_attention_layernorm.weight",
        "ffn_norm.weight",
        ("embed",),
    ),
    # LoRA order q, k, v, o, gate, up, down is `LORA_MODULES` order (dropout keys depend on it)
    *_linear("attn", "q_proj", "self_attn", "attn_q", ("embed", "heads"), "q", ("heads",)),
    *_linear("attn", "k_proj", "self_attn", "attn_k", ("embed", "kv_heads"), "k", ("kv_heads",)),
    *_linear("attn", "v_proj", "self_attn", "attn_v", ("embed", "kv_heads"), "v", ("kv_heads",)),
    *_linear("attn", "o_proj", "self_attn", "attn_output", ("heads", "embed"), "o", ("embed",)),
    *_linear("mlp", "gate_proj", "mlp", "ffn_gate", ("embed", "mlp"), "gate", None),
    *_linear("mlp", "up_proj", "mlp", "ffn_up", ("embed", "mlp"), "up", None),
    *_linear("mlp", "down_proj", "mlp", "ffn_down", ("mlp", "embed"), "down", None),
)

BY_PATH: dict[tuple[str, ...], Param] = {p.path: p for p in PARAMS}
BY_HF: dict[str, Param] = {p.hf: p for p in PARAMS}
BY_GGUF: dict[str, Param] = {p.gguf: p for p in PARAMS}

# LoRA: short target name -> row of its kernel, in table order
LORA_PARAMS: dict[str, Param] = {p.lora: p for p in PARAMS if p.lora}
# HF module names of the LoRA targets, in table order (index = dropout key, see LoraInput)
LORA_MODULES: tuple[str, ...] = tuple(p.module for p in LORA_PARAMS.values())


def param(path: tuple[str, ...]) -> Param:
    """The row for a pure-dict parameter path; KeyError naming the path if there is none."""
    try:
        return BY_PATH[tuple(path)]
    except KeyError:
        raise KeyError(f"no parameter table row for {'/'.join(path)}") from None


def leaves(tree: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """`(path, leaf)` of a pure-dict parameter tree (`nnx.to_pure_dict`), in tree order."""
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            yield from leaves(value, path)
        else:
            yield path, value


def model_params(cfg: ModelConfig) -> tuple[Param, ...]:
    """The rows a model of `cfg` has: q/k/v biases with `qkv_bias`, the o bias with `o_bias`,
    `lm_head` only with untied embeddings."""

    def present(p: Param) -> bool:
        if p.path == ("lm_head", "kernel"):
            return not cfg.tie_word_embeddings
        if p.path[-1] == "bias":
            return cfg.o_bias if p.module == "o_proj" else cfg.qkv_bias
        return True

    return tuple(p for p in PARAMS if present(p))
