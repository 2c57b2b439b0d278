"""Reports a reader can read: no empty axes without a note saying why, legends and axis labels,
numbered points instead of overlapping names, integer ticks for counts, every interval in the
tables, and the independence summary one criterion per sentence."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pytest

from emgeo_jax.experiments import figures
from emgeo_jax.geometry import analyze
from emgeo_jax.geometry import report as georeport


def cell(name, direction, layer, scale, em=None, aligned=None, scored=0):
    return {
        "name": name,
        "direction": direction,
        "layer": layer,
        "scale": scale,
        "em_rate": em,
        "em_ci": None if em is None else [em - 0.1, em + 0.1],
        "aligned_mean": aligned,
        "aligned_ci": None if aligned is None else [aligned - 5, aligned + 5],
        "coherent_mean": 25.0,
        "n_rows": 16,
        "aligned_n_scored": scored,
        "coherent_n_scored": 16,
    }


def sweep_results(em: float | None) -> dict:
    cells = [
        cell(f"md__L{la}__s{s:g}", "md", la, s, em, None if em is None else 50.0)
        for la in (3, 5)
        for s in (-8.0, 8.0)
    ]
    return {"baseline": cell("baseline", "-", "-", 0.0, em), "cells": cells}


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_dose_response_without_scores_says_why_and_spans_the_scales():
    fig = figures.dose_response(sweep_results(None), "md")
    assert texts(fig).count(figures.NO_SCORES) == 2  # both panels, not blank axes
    assert all(ax.get_legend() is None for ax in fig.axes)  # no legend of absent lines
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert lo <= -8 and hi >= 8  # not matplotlib's -0.04..0.04 of an empty plot
        assert ax.get_xlabel() == "steering scale" and ax.get_ylabel()
    plt.close(fig)
    fig = figures.dose_response(sweep_results(0.25), "md")
    assert figures.NO_SCORES not in texts(fig)
    assert all(ax.get_legend() is not None for ax in fig.axes)
    plt.close(fig)


def test_sweep_report_without_scores_has_notes_and_no_empty_bars(tmp_path):
    from emgeo_jax.experiments.sweep import write_sweep_report

    page = write_sweep_report(sweep_results(None), tmp_path).read_text()
    assert "No cell has an EM rate" in page
    assert "usable &#x27;aligned&#x27; score for 0 of 80 answers" in page
    assert not list(tmp_path.glob("layers_scale_*.png"))
    assert (tmp_path / "dose_response_md.png").exists()
    page = write_sweep_report(sweep_results(0.25), tmp_path / "ok").read_text()
    assert "No cell has an EM rate" not in page
    assert len(list((tmp_path / "ok").glob("layers_scale_*.png"))) == 2


def test_layer_bars_and_ablation_bars_note_missing_rates():
    fig = figures.layer_bars(sweep_results(None), 8.0)
    assert figures.NO_SCORES in texts(fig) and fig.axes[0].get_legend() is None
    plt.close(fig)
    res = {
        "conditions": {
            c: {"em_rate": None, "em_ci": None, "aligned_mean": None, "aligned_ci": None}
            for c in ("before", "after")
        }
    }
    fig = figures.ablation_bars(res)
    assert texts(fig).count(figures.NO_SCORES) == 2
    plt.close(fig)


def test_ablation_and_transfer_reports_say_when_most_scores_are_missing(tmp_path):
    from emgeo_jax.experiments.ablation import write_ablation_report
    from emgeo_jax.experiments.transfer import transfer_matrix, write_transfer_report

    few = cell("before", "-", "-", 0.0, scored=3)  # aligned scored for 3 of 16 answers
    ablation = {"conditions": {"before": few, "after": {**few, "name": "after"}}, "em_change": None}
    page = write_ablation_report(ablation, tmp_path / "abl").read_text()
    assert "usable &#x27;aligned&#x27; score for 6 of 32 answers" in page
    assert "&#x27;coherent&#x27; score" not in page  # coherent was scored for all 32

    pq = {m: {c: {"q1": 0.5, "q2": 0.25} for c in ("base", "from_a", "from_b")} for m in "ab"}
    transfer = {
        **transfer_matrix(pq, ["a", "b"]),
        "cells": {m: {c: few for c in ("base", "from_a", "from_b")} for m in "ab"},
    }
    page = write_transfer_report(transfer, tmp_path / "tr").read_text()
    assert "usable &#x27;aligned&#x27; score for 18 of 96 answers" in page
    full = {**few, "aligned_n_scored": 16}
    transfer["cells"] = {m: {c: full for c in ("base", "from_a", "from_b")} for m in "ab"}
    assert "usable" not in write_transfer_report(transfer, tmp_path / "ok").read_text()


@pytest.fixture(scope="module")
def result():
    """Two clusters: mean-diffs built from examples (bootstrapped) and fixed vectors."""
    rng = np.random.default_rng(0)
    d, n = 24, 30
    labels = np.repeat([0, 1], n // 2)
    shift = rng.standard_normal(d)
    examples = {}
    for k in range(3):
        pooled = rng.standard_normal((n, d))
        pooled[labels == 1] += shift
        examples[f"mean_diff_long_name_L{k}"] = (pooled, labels, rng.integers(3, 20, size=n))
    vectors = {f"pca_long_name_L{k}": shift + rng.standard_normal(d) for k in range(3)}
    clusters = {"mean_diff": list(examples), "pca": list(vectors)}
    return analyze(vectors, clusters, examples=examples, n_null=20, n_boot=20, n_perm=20)


def test_scatter_legends_map_numbers_to_every_name(result):
    for fig in (georeport.fig_mds(result), georeport.fig_pca(result)):
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        labels = [t.get_text() for lg in legends for t in lg.get_texts()]
        for k, name in enumerate(result["inputs"]["names"], start=1):
            assert f"{k}: {name}" in labels
        # points carry numbers, never the long names (which overlapped)
        assert not any("long_name" in t for t in texts(fig))
        plt.close(fig)


def test_pca_component_ticks_are_integers(result):
    fig = georeport.fig_pca(result)
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t]
    assert all(float(t).is_integer() for t in ticks)
    assert fig.axes[0].get_xlabel() == "component"
    plt.close(fig)


def test_disentanglement_has_legend_and_axis_labels():
    rng = np.random.default_rng(1)
    pooled, labels = rng.standard_normal((20, 3, 8)), np.repeat([0, 1], 10)
    fig = georeport.fig_disentanglement(pooled, labels)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["aligned", "misaligned"]
    shown = [ax for ax in fig.axes if ax.axison]
    assert shown and all(ax.get_xlabel() == "PC1" and ax.get_ylabel() == "PC2" for ax in shown)
    plt.close(fig)


def test_report_tables_show_every_interval(result, tmp_path):
    page = georeport.write_report(result, tmp_path).read_text()
    table = page[page.index("<h3>Pairwise cosines</h3>") :].split("</table>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table)[1:]
    assert len(rows) == 15  # 6 directions
    for row in rows:
        cells = re.findall(r"<td>(.*?)</td>", row)
        if cells[0].startswith("pca") and cells[1].startswith("pca"):
            assert cells[3] == "none: both fixed"  # no resampled direction in the pair
        else:
            assert re.fullmatch(r"\[-?[\d.e-]+, -?[\d.e-]+\]", cells[3]), cells
    assert "basic bootstrap over examples (20 resamples" in page
    assert "seed 00" not in page and "Hunter (2025" in page


def test_report_says_why_intervals_are_missing(tmp_path):
    rng = np.random.default_rng(1)
    res = analyze({n: rng.standard_normal(16) for n in "abc"}, n_null=10)
    page = georeport.write_report(res, tmp_path).read_text()
    assert "95% CI columns read n/a: every direction was given as a fixed vector" in page


def test_independence_summary_is_one_criterion_per_sentence(result):
    text = result["independence"]["mean_diff|pca"]["verdict"]
    sentences = [s for s in re.split(r"(?<=\.) ", text) if s]
    assert "by the thresholds of Hunter (2025)" in sentences[0]
    assert "random clusters" not in sentences[0]
    assert all("thresholds" not in s for s in sentences[1:] if "random clusters" in s)


def test_report_numbers_read_as_numbers():
    """Experiment tables print 4 significant digits (as the geometry report does), whole
    floats without decimals, no negative zero, large values without exponent."""
    from emgeo_jax.experiments.report import fmt

    cases = {-8.0: "-8", 0.0020: "0.002", 195.6182: "195.6", -0.0: "0", 12345.6: "12346"}
    assert {x: fmt(x) for x in cases} == cases
    assert fmt([0.16667, 0.5]) == "[0.1667, 0.5]"
    assert (fmt(None), fmt(float("nan")), fmt("a<b")) == ("n/a", "NaN", "a&lt;b")
    assert (fmt(True), fmt(False)) == ("yes", "no")
