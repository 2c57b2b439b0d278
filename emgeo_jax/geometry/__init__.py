"""Geometry of directions: similarity, seed 001's methods and independence tests, nulls, reports.

Public entry point: `analyze(vectors, clusters=None, ...) -> dict` (JSON-able); figures and the
HTML page come from `emgeo_jax.geometry.report.write_report`.
"""

from emgeo_jax.geometry.analyze import analyze, layer_traces
from emgeo_jax.geometry.independence import Thresholds

__all__ = ["Thresholds", "analyze", "layer_traces"]
