"""Rank-1 dissection: per-token adapter scalars and B directions.

An adapter on module `m` of block `l` adds `scale * (x a) b` to that module's output, `x` its
input `[in]`, `a [in, r]`, `b [r, out]`. For rank 1 that is a scalar `s = scale * x . a` times
a fixed direction `b`; for `down` (and `o`) `b` lives in the residual stream, so it is a
steering direction at layer `l` (output of block `l`).

The module inputs are the blocks' own named intermediates of the adapted model, tapped
(`emgeo_jax.models.taps`, so they are exactly what the module saw):

    q, k, v:   attn_in     input_norm(residual entering block l)
    gate, up:  mlp_in      post_attn_norm(residual + attention output of block l)
    down:      mlp_hidden  silu(gate(mlp_in)) * up(mlp_in)

`o` (input: the attention heads before `o_proj`) is not a capture site and is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emgeo_jax.data import TokenizedExample, make_batches
from emgeo_jax.hosts import to_host
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import LM, forward
from emgeo_jax.models.taps import Taps
from emgeo_jax.train.lora import PEFT_MODULES, Lora, LoraSpec, apply_lora
from emgeo_jax.vectors.io import save_vectors

RESIDUAL_TARGETS = ("down", "o")


def adapter_names(spec: LoraSpec) -> list[str]:
    """One name per scalar column: `layers.{l}.{module}` (plus `[j]` for rank > 1), in the
    order targets x layers x rank used by `lora_scalars`."""
    names = []
    for t in spec.targets:
        for layer in spec.layers:
            stem = f"layers.{layer}.{PEFT_MODULES[t]}"
            names += [stem] if spec.rank == 1 else [f"{stem}[{j}]" for j in range(spec.rank)]
    return names


MODULE_INPUT_SITE = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "gate": "mlp_in"}
MODULE_INPUT_SITE |= {"up": "mlp_in", "down": "mlp_hidden"}
"""The block's capture site (`emgeo_jax.models.taps`) holding each target module's input."""


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def lora_scalars(
    graphdef: nnx.GraphDef, params: Any, lora: Lora, spec: LoraSpec, batch: dict[str, jax.Array]
) -> jax.Array:
    """Scalars `scale * x @ a` of every adapter on every token: `[B, T, A]` float32 with
    `A = len(targets) * len(layers) * rank` columns named by `adapter_names(spec)`.
    `batch`: `input_ids, positions, attention_mask [B, T]`."""
    if "o" in spec.targets:
        raise ValueError("scalars of o_proj adapters need the attention heads, not tapped")
    sites = {MODULE_INPUT_SITE[t] for t in spec.targets}
    out = forward(
        graphdef,
        apply_lora(params, lora, spec),
        batch["input_ids"],
        batch["positions"],
        batch["attention_mask"],
        taps=Taps(**{site: "full" for site in sites}),
        num_layers=spec.layers[-1] + 1,
    )
    cols = []
    for t in spec.targets:
        inputs = getattr(out, MODULE_INPUT_SITE[t])  # [L', B, T, in]
        for i, layer in enumerate(spec.layers):
            cols.append(spec.scale * inputs[layer].astype(jnp.float32) @ lora[t]["a"][i])
    return jnp.concatenate(cols, axis=-1)


def collect_scalars(
    lm: LM,
    lora: Lora,
    spec: LoraSpec,
    tokenized: Sequence[TokenizedExample],
    batch_size: int = 8,
) -> dict[str, np.ndarray]:
    """Scalars on answer tokens for every adapter (see `lora_scalars`).

    Returns `scalars [N_tok, A]` (answer tokens of all examples, in example order),
    `token_example [N_tok]` (index into `tokenized`), `pooled [N, A]` (per-example mean over
    its answer tokens) and `label [N]` (-1 = unlabelled)."""
    pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None else 0
    rows: dict[int, np.ndarray] = {}
    for batch in make_batches(tokenized, batch_size, pad if pad is not None else 0):
        keys = ("input_ids", "positions", "attention_mask")
        arrays, _ = lm.place_rows({k: batch[k] for k in keys})  # padded rows on a mesh
        s = to_host(lora_scalars(lm.graphdef, lm.params, lora, spec, arrays))
        for row, pos in enumerate(batch["example_index"]):
            if pos >= 0:
                rows[int(pos)] = s[row][batch["answer_mask"][row]]
    order = sorted(rows)
    return {
        "scalars": np.concatenate([rows[i] for i in order]).astype(np.float32),
        "token_example": np.concatenate([np.full(len(rows[i]), i) for i in order]),
        "pooled": np.stack([rows[i].mean(0) for i in order]).astype(np.float32),
        "label": np.asarray([-1 if ex.label is None else ex.label for ex in tokenized]),
    }


def save_scalars(
    path: str | Path,
    collected: dict[str, np.ndarray],
    spec: LoraSpec,
    topics: Sequence[str | None],
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write collected scalars with their adapter names and per-example topics: tensors of
    `collect_scalars` plus `topic [N]` (index into metadata `topics`, -1 = none)."""
    names = sorted({t for t in topics if t is not None})
    topic = np.asarray([-1 if t is None else names.index(t) for t in topics], np.int64)
    meta = {
        "method": "lora_scalars",
        "adapters": adapter_names(spec),
        "lora": spec.to_dict(),
        "topics": names,
        "pooling": "example mean over answer tokens",
        **(metadata or {}),
    }
    save_vectors(path, {**collected, "topic": topic}, meta)


def b_directions(lora: Lora, spec: LoraSpec, cfg: ModelConfig, target: str = "down") -> np.ndarray:
    """`[L, D]` steering directions from rank-1 adapters on a residual-writing module: row
    `l` = `b` of the adapter at block `l` (zero for blocks without one). The adapter adds
    `s * b` to the output of block `l`, with `s` from `lora_scalars`."""
    if target not in RESIDUAL_TARGETS or target not in spec.targets:
        raise ValueError(f"B directions need a {RESIDUAL_TARGETS} adapter; spec has {spec.targets}")
    if spec.rank != 1:
        raise ValueError(f"B directions need rank-1 adapters, got rank {spec.rank}")
    out = np.zeros((cfg.num_layers, cfg.hidden_size), np.float32)
    out[list(spec.layers)] = np.asarray(lora[target]["b"])[:, 0]
    return out


def load_scalars(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by `save_scalars`: its tensors and metadata."""
    import json

    from safetensors import safe_open

    from emgeo_jax.vectors.io import METADATA_KEY, VectorFileError

    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    except Exception as e:
        raise VectorFileError(f"{path}: not a readable scalars file ({e})") from e
    for key in ("pooled", "label", "topic", "scalars", "token_example"):
        if key not in tensors:
            raise VectorFileError(f"{path}: missing tensor '{key}' (not a lora-scalars file)")
    return tensors, meta
