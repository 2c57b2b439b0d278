"""Contrast pairs -> pooled activations -> mean-diff and PCA directions at every layer.

Shared by `emgeo demo` and the persona experiment. Row l of every stack is layer l (output
of block l = HF `hidden_states[l+1]`). Token-weighted answer pooling (the reference default).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emgeo_jax.data import Example, load_contrast_pairs, tokenize_examples
from emgeo_jax.data.files import file_sha256
from emgeo_jax.extract import (
    META_FILE,
    ExtractSettings,
    extract,
    read_extraction,
    write_extraction,
)
from emgeo_jax.hosts import barrier, broadcast_json, is_primary
from emgeo_jax.runs import SettingsMismatch, mismatch, read_settings
from emgeo_jax.vectors.directions import data_diff, pca


def reuse_stage(
    folder: str | Path,
    recorded: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    overwrite: bool = False,
) -> bool:
    """Whether a finished stage in `folder` (made with settings `recorded`; None when the
    folder holds no record of them) can be reused for settings `current`: True on equality.
    Otherwise a `SettingsMismatch` naming the folder and the differing settings, unless
    `overwrite`, which deletes `folder` and returns False (recompute)."""

    folder = Path(folder)
    error = mismatch(folder, recorded, current)
    if error is None:
        return True
    if not overwrite:
        raise error
    shutil.rmtree(folder, ignore_errors=True)
    return False


def contrast_directions(
    lm: Any,
    contrast_path: str | Path,
    out_dir: str | Path,
    *,
    max_pairs: int | None = None,
    hold_out_every: int | None = None,
    max_length: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Extract (resumably, into `out_dir`) and return {"mean_diff" [L, D], "pca" [L, D] (PC1,
    unit, sign towards the mean-diff), "pca_ratio" [L] (PC1 explained-variance share),
    "pooled" [N, L, D], "labels" [N], "tokens" [N] (answer tokens pooled per example),
    "n_pairs", "run_hash" (the extraction's)}. `max_pairs` keeps the first pairs;
    `hold_out_every` k then leaves out every k-th of those (`split_pairs`), held out for an
    evaluation of the directions on pairs they were not built from (the demo's dose-response).

    A finished extraction in `out_dir` is reused only when it was made from the same model,
    data (path and content), `max_pairs` and `max_length` (its meta.json); else
    `SettingsMismatch`, or with `overwrite` it is discarded and recomputed."""
    out = Path(out_dir)
    identity = {
        "model": lm.source,
        "data": str(contrast_path),
        "data_sha256": file_sha256(contrast_path),
        "max_pairs": max_pairs,
        "hold_out_every": hold_out_every,
        "max_length": max_length,
    }
    decision: Any = False  # process 0 decides (and deletes), every process follows
    if is_primary() and (out / "activations.safetensors").exists():
        meta = read_settings(out / META_FILE) or {}
        # records written before data_sha256 and max_length (always 256) lack them
        keys = [k for k in identity if k in meta or k not in ("data_sha256", "max_length")]
        recorded = {k: meta.get(k) for k in keys} if meta else None
        try:
            decision = reuse_stage(out, recorded, {k: identity[k] for k in keys}, overwrite)
        except SettingsMismatch as e:
            decision = str(e)
    decision = broadcast_json(decision)
    if isinstance(decision, str):
        raise SettingsMismatch(decision)
    if decision:
        ext = read_extraction(out)
    else:
        examples, _ = load_contrast_pairs(contrast_path)
        examples, _ = split_pairs(examples, max_pairs, hold_out_every)
        tokenized, _ = tokenize_examples(examples, lm.tokenizer, max_length)
        ext = extract(
            lm,
            tokenized,
            ExtractSettings(per_example=True, batch_size=batch_size),
            out_dir=out,
            metadata=identity,
            progress=progress,
        )
        if ext is not None:  # process 0
            write_extraction(ext, out)
        barrier("emgeo_contrast_directions")
        if ext is None:  # other processes read what process 0 wrote
            ext = read_extraction(out)
    md = data_diff(ext.means("token")).astype(np.float32)
    comps, ratio = pca(ext.pooled, md)
    return {
        "layers": list(ext.layers),
        "mean_diff": md,
        "pca": comps[:, 0],
        "pca_ratio": ratio[:, 0],
        "pooled": ext.pooled,
        "labels": ext.label,
        "tokens": ext.tokens,
        "n_pairs": int(len(ext.label) // 2),
        "run_hash": ext.metadata.get("run_hash"),
    }


def split_pairs(
    examples: Sequence[Example], max_pairs: int | None = None, hold_out_every: int | None = None
) -> tuple[list[Example], list[Example]]:
    """Contrast examples (`load_contrast_pairs` order: aligned, misaligned, aligned, ...) ->
    `(kept, held_out)`, both in that order: the first `max_pairs` pairs (all when None), of
    which every `hold_out_every`-th (pairs k-1, 2k-1, ... counting from 0) is held out. The
    shipped pairs come grouped by domain, so a held-out set drawn this way samples every
    domain rather than the last one."""
    pairs = [list(examples[i : i + 2]) for i in range(0, len(examples), 2)]
    pairs = pairs if max_pairs is None else pairs[:max_pairs]
    if hold_out_every is not None and hold_out_every < 2:
        raise ValueError(f"hold_out_every={hold_out_every}: must be >= 2 (or None: hold none out)")
    k = hold_out_every or len(pairs) + 1
    kept = [e for i, p in enumerate(pairs) if i % k != k - 1 for e in p]
    held = [e for i, p in enumerate(pairs) if i % k == k - 1 for e in p]
    return kept, held


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
