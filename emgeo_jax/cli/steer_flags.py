"""Steering flags shared by `emgeo generate` and `emgeo serve`, and the `Steering` they make.

    --steer FILE --layer L[,L...] --scale S [--positions all|prompt|generated]
    [--ablate FILE [--ablate_layers L,...]] [--key NAME]

Vector files: safetensors, `.npy` or PyTorch `.pt` (weights only), holding `[D]` or a
per-layer stack `[L, D]`. Layer l = output of block l = HF `hidden_states[l+1]`; a stack's
rows are for the layers of its metadata `layers` (e.g. `emgeo extract --layers 12,16`), else
for layers 0..L-1. A `[D]` vector is added at each `--layer`; a stack adds its vector for
layer l at each layer l in `--layer` (default: every layer it holds; a layer it does not hold
is refused). `--ablate` projects a `[D]` direction out at each of `--ablate_layers` (default
all layers), or a stack's vector for layer l out at each layer l in `--ablate_layers`
(default: every layer it holds). Importing this module defines the flags.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from emgeo_jax.steer import POSITION_MODES, Steering

flags.DEFINE_string("steer", None, "steering vector file ([D] or [L, D])")
flags.DEFINE_list("layer", None, "layer(s) to steer at (output of block l)")
flags.DEFINE_float("scale", 1.0, "steering scale")
flags.DEFINE_enum("positions", "all", sorted(POSITION_MODES), "tokens the edit touches")
flags.DEFINE_string("ablate", None, "direction file to project out ([D] or [L, D])")
flags.DEFINE_list("ablate_layers", None, "layers to ablate at (default all / the stack's)")
flags.DEFINE_string("key", None, "tensor name inside a vector file holding several")


def check_vector_files(args) -> None:
    """Read the `--steer` / `--ablate` files once so a bad one fails before the model loads."""
    from emgeo_jax.vectors.io import load_layer_vectors

    for path in (args.steer, args.ablate):
        if path:
            load_layer_vectors(path, key=args.key)


def build_steering(cfg, args) -> tuple[Steering | None, dict[str, Any]]:
    """The `Steering` the flags describe and a JSON summary of it (None: no intervention).
    `args` carries steer, layer, scale, positions, ablate, ablate_layers, key (e.g. FLAGS)."""
    from emgeo_jax.vectors.io import load_layer_vectors

    parts, summary = [], {}
    if args.steer:
        vec = load_layer_vectors(args.steer, key=args.key)
        layers = [int(x) for x in args.layer] if args.layer else None
        parts.append(Steering.addition(cfg, vec, layers=layers, scale=args.scale))
        summary.update(steer=args.steer, layer=layers or list(vec.layers or []), scale=args.scale)
    if args.ablate:
        vec = load_layer_vectors(args.ablate, key=args.key)
        layers = [int(x) for x in args.ablate_layers] if args.ablate_layers else None
        parts.append(Steering.layer_ablation(cfg, vec, layers=layers))
        summary.update(ablate=args.ablate, ablate_layers=layers or list(vec.layers or []) or None)
    if not parts:
        return None, {}
    summary["positions"] = args.positions
    return Steering.combine(*parts).at_positions(args.positions), summary
