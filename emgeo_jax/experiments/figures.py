"""Experiment figures (matplotlib, Agg): dose-response curves, per-layer bars, the transfer
matrix and ablation bars. Each function takes the JSON-ready results and returns a Figure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

METRICS = (("em_rate", "em_ci", "EM rate"), ("aligned_mean", "aligned_ci", "mean aligned"))


def _val(x: Any) -> float:
    return math.nan if x is None else float(x)


def _ci(c: dict, key: str) -> tuple[float, float]:
    ci = c.get(key)
    return (math.nan, math.nan) if ci is None else (float(ci[0]), float(ci[1]))


NO_SCORES = "no usable judge scores:\nthe judge gave no number for\n(almost) every answer"


def _finite(values: list[Any]) -> bool:
    return any(math.isfinite(_val(v)) for v in values)


def no_data(ax: plt.Axes, why: str = NO_SCORES) -> None:
    """Mark `ax` as empty on purpose: a note in the middle instead of blank axes."""
    ax.text(
        0.5,
        0.5,
        why,
        ha="center",
        va="center",
        transform=ax.transAxes,
        fontsize=9,
        color="0.35",
        bbox={"boxstyle": "round", "fc": "#fff6dd", "ec": "#e0b000"},
    )


def has_scores(results: dict, key: str = "em_rate") -> bool:
    """Whether any cell (or the baseline) of a sweep has a number for `key`."""
    return _finite([results["baseline"].get(key)] + [c.get(key) for c in results["cells"]])


def missing_score_notes(cells: Sequence[dict]) -> list[str]:
    """Report notes (HTML), one per metric scored for under half of the answers of these cell
    summaries (`metrics.cell_summary`: the judge seldom gave a number): the tables cannot show
    that their means and rates rest on few answers. Used by every experiment report."""
    from emgeo_jax.experiments.report import paragraph

    total = sum(c["n_rows"] for c in cells)
    notes = []
    for m in ("aligned", "coherent"):
        scored = sum(c.get(f"{m}_n_scored") or 0 for c in cells)
        if total and scored < total / 2:
            notes.append(
                f"The judge gave a usable '{m}' score for {scored} of {total} answers: for the "
                "rest it put under 25% of its probability on a number 0-100 (or the request "
                "failed), so that score is "
                f"missing (n/a, never made up) and '{m}' numbers below rest on few answers or "
                "none."
            )
    return [paragraph(n, note=True) for n in notes]


def sweep_notes(results: dict) -> list[str]:
    """Report notes (HTML) for what a sweep's figures and table cannot show by themselves:
    a metric scored for under half of the answers (`missing_score_notes`), and an EM rate
    that is n/a everywhere (then the per-layer bars are left out)."""
    from emgeo_jax.experiments.report import paragraph

    notes = missing_score_notes([results["baseline"], *results["cells"]])
    if not has_scores(results):
        notes.append(
            paragraph(
                "No cell has an EM rate (it needs both an aligned and a coherent score for an "
                "answer), so the table reads n/a throughout, the dose-response panels say so, and "
                "the per-layer EM bars are left out. Use a judge that answers with numbers (e.g. "
                "OPENAI_API_KEY with gpt-4o-mini).",
                note=True,
            )
        )
    return notes


def dose_response(results: dict, direction: str) -> plt.Figure:
    """EM rate and mean aligned vs scale for one direction, one line per layer, 95% intervals
    as bands; the unsteered baseline is the scale-0 point of every line."""
    base = results["baseline"]
    cells = [c for c in results["cells"] if c["direction"] == direction]
    layers = sorted({c["layer"] for c in cells})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    scales = sorted({0.0, *(c["scale"] for c in cells)})
    for ax, (key, ci_key, label) in zip(axes, METRICS, strict=True):
        ax.set_xlim(scales[0] - 0.5, scales[-1] + 0.5)
        ax.set_xticks(scales)
        empty = not _finite([base[key]] + [c[key] for c in cells])
        if empty:
            no_data(ax)
        for layer in layers:
            pts = sorted(
                [c for c in cells if c["layer"] == layer] + [base],
                key=lambda c: c.get("scale", 0.0),
            )
            x = [c.get("scale", 0.0) for c in pts]
            y = [_val(c[key]) for c in pts]
            lo, hi = zip(*(_ci(c, ci_key) for c in pts), strict=True)
            (line,) = ax.plot(x, y, marker="o", label=f"layer {layer}")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("steering scale")
        ax.set_ylabel(label)
        if key == "em_rate":
            ax.set_ylim(-0.02, 1.02)
        else:
            ax.set_ylim(-2, 102)
        if not empty:  # no legend of lines that are not there
            ax.legend(fontsize=8, title="steered after block", title_fontsize=8)
    fig.suptitle(f"dose-response: {direction}")
    return fig


def layer_bars(results: dict, scale: float) -> plt.Figure:
    """EM rate per layer and direction at one scale (bars with 95% intervals), beside the
    baseline's rate (dashed line)."""
    cells = [c for c in results["cells"] if c["scale"] == scale]
    dirs = sorted({c["direction"] for c in cells})
    layers = sorted({c["layer"] for c in cells})
    width = 0.8 / max(len(dirs), 1)
    fig, ax = plt.subplots(
        figsize=(max(5, 0.6 * len(layers) * len(dirs) + 2), 3.6), layout="constrained"
    )
    for k, d in enumerate(dirs):
        by_layer = {c["layer"]: c for c in cells if c["direction"] == d}
        x = np.arange(len(layers)) + (k - (len(dirs) - 1) / 2) * width
        y = np.array([_val(by_layer[layer]["em_rate"]) for layer in layers])
        ci = np.array([_ci(by_layer[layer], "em_ci") for layer in layers])
        err = np.nan_to_num(np.abs(np.stack([y - ci[:, 0], ci[:, 1] - y])))
        ax.bar(x, y, width, yerr=err, capsize=2, label=d)
    if math.isfinite(_val(results["baseline"]["em_rate"])):
        ax.axhline(_val(results["baseline"]["em_rate"]), color="k", ls="--", lw=1, label="baseline")
    has_rates = _finite([c["em_rate"] for c in cells])
    if not has_rates:
        no_data(ax)
    ax.set_xticks(np.arange(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("EM rate")
    ax.set_ylim(0, 1.02)
    if has_rates:
        ax.legend(fontsize=8)
    ax.set_title(f"EM rate by layer and direction at scale {scale:g}")
    return fig


def transfer_matrix(result: dict) -> plt.Figure:
    """Heatmap of TE(source -> target) with values and intervals written in each cell."""
    names = result["models"]
    te = np.array([[_val(result["te"][a][b]["value"]) for b in names] for a in names])
    fig, ax = plt.subplots(
        figsize=(1.6 * len(names) + 2.5, 1.3 * len(names) + 1.5), layout="constrained"
    )
    lim = max(1.0, float(np.nanmax(np.abs(te)))) if np.isfinite(te).any() else 1.0
    im = ax.imshow(te, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            cell = result["te"][a][b]
            ci = cell["ci"]
            text = "NaN" if math.isnan(te[i, j]) else f"{te[i, j]:.2f}"
            if ci is not None:
                text += f"\n[{ci[0]:.2f}, {ci[1]:.2f}]"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("target model B (vector applied to)")
    ax.set_ylabel("source model A (vector from)")
    fig.colorbar(im, ax=ax, label="transfer effectiveness")
    return fig


def ablation_bars(result: dict) -> plt.Figure:
    """EM rate and mean aligned before and after ablation, with 95% intervals."""
    conds = result["conditions"]
    names = list(conds)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), layout="constrained")
    for ax, (key, ci_key, label) in zip(axes, METRICS, strict=True):
        y = np.array([_val(conds[n][key]) for n in names])
        ci = np.array([_ci(conds[n], ci_key) for n in names])
        err = np.nan_to_num(np.abs(np.stack([y - ci[:, 0], ci[:, 1] - y])))
        ax.bar(names, y, yerr=err, capsize=3, color=["#888", "#3a7"][: len(names)])
        ax.set_ylabel(label)
        ax.set_xlabel("condition")
        if not np.isfinite(y).any():
            no_data(ax)
    fig.suptitle("ablation: before and after")
    return fig
