"""Geometry of directions: similarity, seed 001's methods and independence tests, nulls, reports.

Public entry point: `analyze(vectors, clusters=None, ...) -> dict` (JSON-able); figures and the
HTML page come from `emgeo_jax.geometry.report.write_report`.

Numerics: the methods work on a handful of vectors `[n, D]` and are re-run thousands of times
for nulls and bootstraps, so they use numpy float64 (eager jnp dispatch made a typical
analysis ~30x slower); jnp is used where arrays are large and batched (per-layer PCA of
activations `[L, N, D]` under vmap in report.py).
"""

from emgeo_jax.geometry.analyze import analyze, layer_traces
from emgeo_jax.geometry.independence import Thresholds

__all__ = ["Thresholds", "analyze", "layer_traces"]
