"""Figures (matplotlib, Agg backend) and one self-contained HTML page for an `analyze` result.

`write_report(result, out_dir, activations=None)` writes `geometry.json`, one PNG per figure and
`report.html`, which embeds every PNG inline (base64), so the page opens without network
access and can be mailed as one file; the PNGs stay beside it for papers and slides.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy.cluster.hierarchy import dendrogram  # noqa: E402

from emgeo_jax.runs import write_json_atomic  # noqa: E402


def _ordered(result: dict) -> list[str]:
    """Vector names grouped by cluster (clustered first, in cluster order), for the heatmap."""
    names = result["inputs"]["names"]
    order = [n for members in result["inputs"]["clusters"].values() for n in members]
    return order + [n for n in names if n not in order]


def fig_cosine(result: dict) -> plt.Figure:
    names = result["inputs"]["names"]
    order = _ordered(result)
    idx = [names.index(n) for n in order]
    C = np.asarray(result["cosine"]["matrix"])[np.ix_(idx, idx)]
    n = len(order)
    fig, ax = plt.subplots(
        layout="constrained", figsize=(max(5.0, 1.8 + 0.7 * n), max(4.2, 1.4 + 0.6 * n))
    )
    im = ax.imshow(C, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n), order, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), order, fontsize=8)
    if n <= 16:
        for i in range(n):
            for j in range(n):  # white on the dark ends of the colour map
                colour = "white" if abs(C[i, j]) > 0.6 else "black"
                ax.text(j, i, f"{C[i, j]:.2f}", ha="center", va="center", fontsize=8, color=colour)
    start = 0
    for members in result["inputs"]["clusters"].values():
        ax.add_patch(
            plt.Rectangle(
                (start - 0.5, start - 0.5),
                len(members),
                len(members),
                fill=False,
                edgecolor="black",
                linewidth=2,
            )
        )
        start += len(members)
    band = result["cosine"]["null"]["q975"]
    ax.set_title(
        f"cosine between directions\n(random directions, d = {result['inputs']['d']}: "
        f"95% within +-{band:.3f})",
        fontsize=9,
    )
    fig.colorbar(im, ax=ax, fraction=0.046, label="cosine")
    return fig


def fig_dendrogram(result: dict) -> plt.Figure:
    names = result["inputs"]["names"]
    fig, ax = plt.subplots(layout="constrained", figsize=(max(6.0, 2.0 + 0.35 * len(names)), 4.2))
    dendrogram(
        np.asarray(result["clustering"]["linkage"]),
        labels=names,
        ax=ax,
        leaf_rotation=90,
        leaf_font_size=8,
    )
    ax.set_ylabel("1 - cos at merge (average linkage)")
    ax.set_xlabel("direction")
    return fig


def fig_mds(result: dict) -> plt.Figure:
    fig, ax = plt.subplots(layout="constrained", figsize=(8, 4.8))
    _scatter_named(ax, result, result["mds"]["coords"])
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    return fig


def _scatter_named(ax: plt.Axes, result: dict, coords: dict[str, list[float]]) -> None:
    """Points coloured by their input set (`clusters`: the sets compared, not the dendrogram's
    clusters) and numbered; the legend (outside the axes) maps each number
    to its direction, so long names never overlap each other or the points."""
    colour, cluster_of = {}, {}
    for c, (name, members) in enumerate(result["inputs"]["clusters"].items()):
        colour.update({m: f"C{c}" for m in members})
        cluster_of.update(dict.fromkeys(members, name))
    for k, (n, xy) in enumerate(coords.items(), start=1):
        y = xy[1] if len(xy) > 1 else 0.0
        ax.scatter(xy[0], y, color=colour.get(n, "gray"), s=30, label=f"{k}: {n}")
        ax.annotate(str(k), (xy[0], y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axhline(0, color="lightgray", lw=0.5)
    ax.axvline(0, color="lightgray", lw=0.5)
    ax.legend(
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0,
        ncol=1 if len(coords) <= 16 else 2,
        title="direction (colour: its set)",
        title_fontsize=7,
    )


def fig_pca(result: dict) -> plt.Figure:
    pca = result["pca"]
    ve = np.asarray(pca["variance_explained"])
    names = list(pca["loadings"])
    L = np.asarray([pca["loadings"][n] for n in names])
    fig, axes = plt.subplots(
        1, 3, figsize=(15, 4.6), layout="constrained", width_ratios=(1.0, 1.6, 1.0)
    )
    axes[0].bar(range(1, len(ve) + 1), ve)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    null = pca["null_pc1_share"]
    axes[0].axhspan(null["q025"], null["q975"], color="gray", alpha=0.3, label="PC1 null 95%")
    axes[0].axhline(pca["uniform_share"], color="k", ls="--", lw=1, label="1/n")
    axes[0].set_xlabel("component")
    axes[0].set_ylabel("variance explained")
    axes[0].legend(fontsize=8)
    _scatter_named(axes[1], result, {n: pca["loadings"][n][:2] for n in names})
    axes[1].set_xlabel("PC1")
    axes[1].set_ylabel("PC2")
    k = min(L.shape[1], 5)
    lim = np.abs(L[:, :k]).max() or 1.0
    im = axes[2].imshow(L[:, :k], cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    axes[2].set_yticks(range(len(names)), names, fontsize=7)
    axes[2].set_xticks(range(k), [f"PC{i + 1}" for i in range(k)])
    axes[2].set_title("loadings (scores)")
    axes[2].set_xlabel("component")
    fig.colorbar(im, ax=axes[2], label="score")
    return fig


def fig_sets(result: dict) -> plt.Figure:
    items = list(result["sets"].items())
    fig, ax = plt.subplots(layout="constrained", figsize=(1.5 + 1.1 * len(items), 4))
    x = np.arange(len(items))
    vals = [v["mean_cosine"] for _, v in items]
    ax.bar(x, vals, color="C0")
    for i, (_, v) in enumerate(items):
        ax.fill_between(
            [i - 0.45, i + 0.45],
            v["null"]["q025"],
            v["null"]["q975"],
            color="gray",
            alpha=0.4,
            lw=0,
        )
        if v["ci95"] is not None:  # drawn as lo..hi: a basic bootstrap interval need not
            lo, hi = v["ci95"]  # contain the point estimate, so no +-error bars
            ax.vlines(i, lo, hi, color="k", lw=1.5)
            ax.hlines([lo, hi], i - 0.1, i + 0.1, color="k", lw=1.5)
    ax.set_xticks(x, [k for k, _ in items], rotation=30, ha="right")
    ax.set_ylabel("mean cosine")
    ax.set_xlabel("set comparison")
    ax.axhline(0, color="k", lw=0.5)
    handles = [
        Patch(color="C0", label="mean cosine"),
        Patch(color="gray", alpha=0.4, label="null 95%"),
    ]
    if any(v["ci95"] is not None for _, v in items):
        handles.append(plt.Line2D([], [], color="k", marker="_", label="bootstrap 95% CI"))
    ax.legend(handles=handles, fontsize=8)
    ax.set_title("within- and between-set mean cosines")
    return fig


def fig_traces(result: dict) -> plt.Figure:
    tr = result["traces"]
    fig, ax = plt.subplots(layout="constrained", figsize=(7, 4))
    for n, ys in tr["cosine"].items():
        ax.plot(range(len(ys)), ys, marker="o", ms=3, label=n)
    ax.axhspan(
        tr["null"]["q025"], tr["null"]["q975"], color="gray", alpha=0.3, label="isotropic null 95%"
    )
    ax.set_xlabel("layer (output of block l)")
    ax.set_ylabel(f"cosine to {tr['reference']}")
    ax.legend(fontsize=8)
    return fig


def layer_pca_2d(pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer exact 2-D PCA of pooled activations `[N, L, D]` (centred over examples).

    Returns scores `[L, N, 2]` and the variance explained by the two components `[L, 2]`.
    Signs are fixed so the largest-magnitude score of each component is positive.
    """
    X = jnp.swapaxes(jnp.asarray(pooled, jnp.float32), 0, 1)  # [L, N, D]
    X = X - X.mean(axis=1, keepdims=True)

    def one(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        u, s, _ = jnp.linalg.svd(x, full_matrices=False)
        scores = u[:, :2] * s[:2]
        pick = jnp.take_along_axis(scores, jnp.argmax(jnp.abs(scores), axis=0)[None], axis=0)
        return scores * jnp.where(pick[0] < 0, -1.0, 1.0), s[:2] ** 2 / jnp.sum(s**2)

    scores, ratio = jax.vmap(one)(X)
    return np.asarray(scores), np.asarray(ratio)


def fig_disentanglement(pooled: np.ndarray, labels: np.ndarray, max_panels: int = 12) -> plt.Figure:
    """The disentanglement figure of Graves et al. (2025, seed 000): per layer, 2-D PCA of
    aligned (blue) vs misaligned (red) examples."""
    scores, ratio = layer_pca_2d(pooled)
    L = scores.shape[0]
    layers = np.unique(np.linspace(0, L - 1, min(L, max_panels)).round().astype(int))
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False, layout="constrained"
    )
    for ax, layer in zip(axes.flat, layers, strict=False):
        for lab, colour, text in ((0, "tab:blue", "aligned"), (1, "tab:red", "misaligned")):
            pts = scores[layer][labels == lab]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, color=colour, alpha=0.6, label=text)
        ax.set_title(f"layer {layer} ({100 * ratio[layer].sum():.0f}% var)", fontsize=9)
        ax.set_xlabel("PC1", fontsize=8)
        ax.set_ylabel("PC2", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=2, markerscale=2, fontsize=9)
    return fig


CAPTIONS = {
    "cosine": "Pairwise cosine similarities, clusters boxed. The title gives the 95% range of "
    "the cosine between two independent random directions in this dimension.",
    "sets": "Set comparisons (as in Graves et al. 2025, 'Exploring the Geometry of Emergent "
    "Misalignment'): mean pairwise cosine within a set and between sets. "
    "Gray: 95% range for random directions of the same set sizes; black bars: bootstrap 95% "
    "interval over examples where directions come from examples.",
    "dendrogram": "Average-linkage hierarchical clustering on 1 - cos; merge heights on the "
    "vertical axis.",
    "mds": "Classical MDS of the chord distances between the unit vectors; points are numbered, "
    "the legend names them, colours are the sets compared below (not the dendrogram's clusters).",
    "pca": "PCA of the vectors (centred): variance explained (gray: PC1 share for random "
    "directions), vectors on PC1/PC2, and their scores on the first components.",
    "traces": "Cosine per layer to the reference vector; gray: isotropic null 95% range.",
    "disentanglement": "Per-layer 2-D PCA of the pooled example activations: aligned (blue) vs "
    "misaligned (red); axes are each layer's first two principal components (the "
    "disentanglement figure of Graves et al. 2025, 'Exploring the Geometry of Emergent "
    "Misalignment').",
}


def figures(result: dict, activations: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """All figures that the result (and optional activations `[N, L, D]`, labels `[N]`) allow."""
    figs = {"cosine": fig_cosine(result)}
    if "sets" in result:
        figs["sets"] = fig_sets(result)
    figs["dendrogram"] = fig_dendrogram(result)
    figs["mds"] = fig_mds(result)
    if "pca" in result:
        figs["pca"] = fig_pca(result)
    if "traces" in result and result["traces"]["cosine"]:
        figs["traces"] = fig_traces(result)
    if activations is not None:
        figs["disentanglement"] = fig_disentanglement(*activations)
    return figs


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list) and all(isinstance(v, float) for v in x):  # counts print whole
        return "[" + ", ".join(f"{v:.0f}" if v.is_integer() else f"{v:.3g}" for v in x) + "]"
    return "n/a" if x is None else str(x)


def _resample_cell(others: list[str] | None) -> str:
    """The "bootstrap draw" cell of a direction built from examples: its own, or shared with
    the other directions built from the same examples (listed when few)."""
    if not others:
        return "own"
    if len(others) <= 3:
        return "shared with " + ", ".join(others)
    return f"shared with {len(others)} others"


def _summary_html(result: dict) -> str:
    parts = []
    from_examples = result["inputs"].get("from_examples") or {}
    if from_examples:
        rows = [
            [
                k, v.get("method", "mean_diff"), v["n"], v["n_misaligned"], v.get("weighting"),
                v.get("tokens"), _resample_cell(v.get("resampled_with")),
            ]
            for k, v in from_examples.items()
        ]  # fmt: skip
        parts.append(
            "<h3>Directions built from examples</h3><p>mean_diff: misaligned minus aligned "
            "class mean, token-weighted (sum over all pooled tokens of a class / its token "
            "count) or example-weighted (mean of per-example means); pca: first principal "
            "component of the centred per-example rows, unit length, its sign towards the "
            "mean difference. The bootstrap resamples examples and rebuilds each direction "
            "the same way (one draw shared by the directions built from the same examples); "
            "permutations and split halves rebuild the mean differences.</p>"
            + _table(
                rows,
                [
                    "direction",
                    "method",
                    "examples",
                    "misaligned",
                    "weighting",
                    "tokens [al, mis]",
                    "bootstrap draw",
                ],
            )
        )
    made = result["inputs"].get("from_examples") or {}
    groups = {**result["inputs"]["clusters"], **result["inputs"].get("sets", {})}

    def fixed(*group_names: str) -> bool:
        """No direction of these clusters/sets was resampled (so no interval exists)."""
        return bool(made) and not any(m in made for g in group_names for m in groups.get(g, []))

    def ci_cell(ci: Any, *group_names: str) -> Any:
        return "none: all fixed" if ci is None and fixed(*group_names) else ci

    for pair, block in result.get("independence", {}).items():
        rows = [
            [
                t,
                rec["statistic"],
                ci_cell(rec["ci95"], *pair.split("|")),
                rec.get("null", {}).get("q025"),
                rec.get("null", {}).get("q975"),
                rec.get("null", {}).get("p_shared_side"),
                " ".join(map(str, rec["threshold"])),
                rec["decision"],
            ]
            for t, rec in block["tests"].items()
        ]
        parts.append(
            f"<h3>Independence: {html.escape(pair)}</h3><p><b>"
            f"{html.escape(block['verdict'])}</b></p>"
        )
        parts.append(
            _table(
                rows,
                [
                    "test",
                    "statistic",
                    "95% CI",
                    "null 2.5%",
                    "null 97.5%",
                    "p (shared side)",
                    "independent if",
                    "decision",
                ],
            )
        )
    if "sets" in result:
        rows = [
            [
                k,
                v["mean_cosine"],
                ci_cell(v["ci95"], *k.split(":", 1)[-1].split("|")),
                v["null"]["q025"],
                v["null"]["q975"],
                v["null"]["p_value"],
            ]
            for k, v in result["sets"].items()
        ]
        parts.append(
            "<h3>Set comparisons</h3>"
            + _table(rows, ["comparison", "mean cos", "95% CI", "null 2.5%", "null 97.5%", "p"])
        )
    names = result["inputs"]["names"]
    C, P = result["cosine"]["matrix"], result["cosine"]["p_value_isotropic"]
    ci = result["cosine"].get("ci95")
    band = result["cosine"]["null"]["q975"]

    def interval(i: int, j: int) -> Any:
        if ci is not None and ci[i][j] is None and names[i] not in made and names[j] not in made:
            return "none: both fixed"  # nothing resampled moves this cosine
        return None if ci is None else ci[i][j]

    rows = [
        [names[i], names[j], C[i][j], interval(i, j), -band, band, P[i][j]]
        for i in range(len(names))
        for j in range(i + 1, len(names))
    ]
    parts.append(
        "<h3>Pairwise cosines</h3>"
        + _table(rows, ["a", "b", "cos", "95% CI", "null 2.5%", "null 97.5%", "p (isotropic)"])
    )
    return "\n".join(parts)


def _interval_note(result: dict) -> str:
    """What the 95% CI columns rest on (or why they are empty)."""
    inputs = result["inputs"]
    made = inputs.get("from_examples") or {}
    if not made or not inputs.get("n_boot"):
        return (
            "<p>95% CI columns read n/a: every direction was given as a fixed vector, so there "
            "are no examples to resample (give the per-example activations, e.g. "
            "<code>emgeo geometry --activations NAME=DIR</code>, for bootstrap intervals).</p>"
        )
    fixed = [n for n in inputs["names"] if n not in made]
    kinds = {"mean_diff": "mean-difference", "pca": "PCA (first component)"}
    counts = [
        f"{n} {kinds[m]}"
        for m in kinds
        if (n := sum(v.get("method", "mean_diff") == m for v in made.values()))
    ]
    joint = [[k, *v["resampled_with"]] for k, v in made.items() if v.get("resampled_with")]
    text = (
        f"<p>95% intervals: basic bootstrap over examples ({inputs['n_boot']} resamples, "
        f"stratified by class), rebuilding the {' and '.join(counts)} directions made from "
        "examples each time"
    )
    if joint:
        groups = {tuple(sorted(g)) for g in joint}
        text += (
            f" (directions built from the same examples are rebuilt from one resample: "
            f"{len(groups)} such group{'s' if len(groups) > 1 else ''})"
        )
    text += (
        ". A basic interval corrects for the resampling bias (cosines of directions rebuilt "
        "from fewer distinct examples shrink toward 0), so it can lie beside the estimate "
        "rather than around it; it is clipped to the statistic's range (cosines to [-1, 1])"
    )
    if fixed:
        text += (
            f"; the other {len(fixed)} directions are held fixed, so their intervals show the "
            "sampling of the directions made from examples only"
        )
    return text + ".</p>"


def write_report(
    result: dict, out_dir: str | Path, activations: tuple[np.ndarray, np.ndarray] | None = None
) -> Path:
    """Write geometry.json, the PNGs and report.html into `out_dir`; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "geometry.json", result, indent=1)
    sections = []
    for name, fig in figures(result, activations).items():
        png = out / f"{name}.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        sections.append(
            f'<figure id="{name}"><img alt="{name}.png" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(CAPTIONS[name])} (<code>{name}.png</code>)</figcaption>"
            "</figure>"
        )
    d = result["inputs"]["d"]
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>emgeo geometry report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #ccc;padding:2px 6px;
font-size:13px}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style></head><body>
<h1>Geometry of {len(result["inputs"]["names"])} directions (d = {d})</h1>
<p>Every statistic sits beside a null (random directions or independent random clusters) and,
where directions were built from examples, a bootstrap 95% interval. The independence tests
and their thresholds follow Hunter (2025, "multiple independent misalignment directions",
LessWrong pre-print); the set comparisons and the disentanglement figure follow Graves et al.
(2025, "Exploring the Geometry of Emergent Misalignment", CS 229 project). Full numbers:
<code>geometry.json</code>.</p>
{_interval_note(result)}
{_summary_html(result)}
{"".join(sections)}
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path
