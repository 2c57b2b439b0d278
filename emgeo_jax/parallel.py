"""Meshes and partition rules.

A mesh has up to three named axes: `data` (batch), `fsdp` (batch too, plus parameter
shards gathered per layer), `tensor` (heads / MLP columns / vocabulary). Parameters are
sharded in two steps, both data tables:

1. `PARAM_AXES`: each parameter's *logical* axes, e.g. `q_proj.kernel -> (layer, embed, heads)`.
2. `MESH_RULES`: logical axis -> mesh axis (or None = replicated).

A dimension whose size the mesh axis does not divide is replicated instead, so every
model runs on every mesh; the plan is only about speed and memory, never correctness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axes of each parameter, keyed by its path with the `layers` prefix removed.
PARAM_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("final_norm", "scale"): ("embed",),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("input_norm", "scale"): ("embed",),
    ("post_attn_norm", "scale"): ("embed",),
    ("attn", "q_proj", "kernel"): ("embed", "heads"),
    ("attn", "k_proj", "kernel"): ("embed", "kv_heads"),
    ("attn", "v_proj", "kernel"): ("embed", "kv_heads"),
    ("attn", "o_proj", "kernel"): ("heads", "embed"),
    ("attn", "q_proj", "bias"): ("heads",),
    ("attn", "k_proj", "bias"): ("kv_heads",),
    ("attn", "v_proj", "bias"): ("kv_heads",),
    ("attn", "o_proj", "bias"): ("embed",),
    ("mlp", "gate_proj", "kernel"): ("embed", "mlp"),
    ("mlp", "up_proj", "kernel"): ("embed", "mlp"),
    ("mlp", "down_proj", "kernel"): ("mlp", "embed"),
}

MESH_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "layer": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
}


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with axes `data, fsdp, tensor`.

    `shape` gives sizes for some axes, e.g. `{"fsdp": 4, "tensor": 2}`; `data` takes what is
    left. Default: every device on `data` (pure data parallelism)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; use {MESH_AXES}")
    fixed = math.prod(v for k, v in shape.items() if k != "data")
    if len(devices) % fixed:
        raise ValueError(f"mesh {shape} does not divide {len(devices)} devices")
    shape.setdefault("data", len(devices) // fixed)
    sizes = tuple(shape.get(a, 1) for a in MESH_AXES)
    if math.prod(sizes) != len(devices):
        mesh_shape = dict(zip(MESH_AXES, sizes, strict=True))
        raise ValueError(f"mesh {mesh_shape} needs {math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_spec(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    """PartitionSpec for an array with logical `axes`, replicating dims the mesh cannot divide."""
    spec = []
    for axis, size in zip(axes, shape, strict=True):
        mesh_axes = MESH_RULES.get(axis) if axis else None
        if mesh_axes is not None:
            names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            if size % math.prod(mesh.shape[n] for n in names):
                mesh_axes = None
        spec.append(mesh_axes)
    return PartitionSpec(*spec)


def param_sharding(mesh: Mesh, path: tuple[str, ...], shape: Sequence[int]) -> NamedSharding:
    """Sharding of the parameter at `path` (pure-dict path, e.g. `("layers","attn","q_proj",
    "kernel")`) with the given full shape."""
    if path[0] == "layers":
        axes = ("layer", *PARAM_AXES[path[1:]])
    else:
        axes = PARAM_AXES[path]
    return NamedSharding(mesh, logical_spec(mesh, axes, shape))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding for a `[B, ...]` input: batch over `data` and `fsdp`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(MESH_RULES["batch"], *([None] * (ndim - 1))))
