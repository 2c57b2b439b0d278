"""Contrast pairs -> pooled activations -> mean-diff and PCA directions at every layer.

Shared by `emgeo demo` and the persona experiment. Row l of every stack is layer l (output
of block l = HF `hidden_states[l+1]`). Token-weighted answer pooling (the reference default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emgeo_jax.data import load_contrast_pairs, tokenize_examples
from emgeo_jax.extract import ExtractSettings, extract, read_extraction, write_extraction
from emgeo_jax.vectors.directions import data_diff, pca


def contrast_directions(
    lm: Any,
    contrast_path: str | Path,
    out_dir: str | Path,
    *,
    max_pairs: int | None = None,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract (resumably, into `out_dir`) and return {"mean_diff" [L, D], "pca" [L, D] (PC1,
    unit, sign towards the mean-diff), "pca_ratio" [L] (PC1 explained-variance share),
    "pooled" [N, L, D], "labels" [N], "n_pairs"}. `max_pairs` keeps the first pairs."""
    out = Path(out_dir)
    if (out / "activations.safetensors").exists():
        ext = read_extraction(out)
    else:
        examples, _ = load_contrast_pairs(contrast_path)
        if max_pairs is not None:
            examples = examples[: 2 * max_pairs]
        tokenized, _ = tokenize_examples(examples, lm.tokenizer, max_length)
        ext = extract(
            lm,
            tokenized,
            ExtractSettings(per_example=True, batch_size=batch_size),
            out_dir=out,
            metadata={"model": lm.source, "data": str(contrast_path), "max_pairs": max_pairs},
            progress=progress,
        )
        write_extraction(ext, out)
    md = data_diff(ext.means("token")).astype(np.float32)
    comps, ratio = pca(ext.pooled, md)
    return {
        "layers": list(ext.layers),
        "mean_diff": md,
        "pca": comps[:, 0],
        "pca_ratio": ratio[:, 0],
        "pooled": ext.pooled,
        "labels": ext.label,
        "n_pairs": int(len(ext.label) // 2),
    }


def unit_rows(stack: np.ndarray) -> np.ndarray:
    """`[L, D]` rows scaled to unit norm."""
    return stack / np.linalg.norm(stack, axis=-1, keepdims=True)


def projection_scores(pooled: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Projection monitoring on pooled activations: `pooled [N, L, D]` (or `[N, D]`) dotted
    with the unit `direction` (`[L, D]` row-wise, or `[D]`) -> `[N, L]` (or `[N]`)."""
    pooled = np.asarray(pooled, np.float64)
    direction = np.asarray(direction, np.float64)
    unit = direction / np.linalg.norm(direction, axis=-1, keepdims=True)
    return np.einsum("n...d,...d->n...", pooled, unit)
