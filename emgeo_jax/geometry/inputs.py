"""Example inputs of `emgeo geometry --activations`: per-example pooled rows, their labels and
the tokens pooled per example (for the token-weighted mean difference, see
`emgeo_jax.geometry.null.mean_diff`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emgeo_jax.vectors.io import VectorFileError, load_activations


def read_example_file(
    path: str | Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[int]]:
    """`(pooled [N, L, D] float32, label [N], tokens [N] float64 or None, layers)` from a
    per-example file (`emgeo extract --per_example`'s `per_example.safetensors`); `layers[i]`
    is the real layer of row i of `pooled` (`vectors.io.load_activations`). `tokens` is None
    when the file has none (written before extraction recorded it, or by other tools)."""
    from safetensors import safe_open

    pooled, labels, meta = load_activations(path)
    with safe_open(str(path), framework="numpy") as f:
        if "tokens" not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
            return pooled, labels, None, meta["layers"]
        tokens = np.asarray(f.get_tensor("tokens"), np.float64)
    if tokens.shape != labels.shape:
        raise VectorFileError(
            f"{path}: tensor 'tokens' has shape {tokens.shape}; expected [{labels.shape[0]}]"
        )
    return pooled, labels, tokens, meta["layers"]
