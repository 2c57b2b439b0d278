"""Ablation: project a direction out of the residual stream and compare EM before and after.

    result = run_ablation(lm, v, questions, layers=None, sampling=..., judge=..., out_dir=...)

`direction` is `[D]` (projected out at each layer in `layers`, default all) or a per-layer
stack (`LayerVectors` from `load_layer_vectors`, or an `[L, D]` array with row l = layer l),
its vector for layer l projected out at layer l, for l in `layers` (default: every layer it
holds; a layer it does not hold is refused): `Steering.layer_ablation`. `h <- h - (h . r) r` with
unit `r`, on every token (prompt and generated). With `steer=(vector [D], layer, scale)` the
same addition is applied in both conditions, so one can show that ablating a direction
removes the misalignment a steering vector induces (on an organism, leave `steer` None).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emgeo_jax.experiments.folder import (
    Cell,
    CellRunner,
    ExperimentFolder,
    Sampling,
    log_judge_stats,
    make_jobs,
    write_json_atomic,
)
from emgeo_jax.experiments.metrics import SUMMARY_HEADER, cell_summary, summary_columns
from emgeo_jax.experiments.questions import PromptRow
from emgeo_jax.experiments.sweep import judged_cell_settings, vector_digest
from emgeo_jax.judge.client import JudgeConfig
from emgeo_jax.judge.prompts import JudgePrompt
from emgeo_jax.models.steering import Steering
from emgeo_jax.vectors.io import LayerVectors


def ablation_config(
    model: str,
    direction: np.ndarray | LayerVectors,
    layers: Sequence[int] | None,
    steer: tuple[np.ndarray, int, float] | None,
    questions: Sequence[PromptRow],
    sampling: Sampling,
    judge: JudgeConfig,
) -> dict[str, Any]:
    """The JSON configuration of an ablation run (what its folder's hash guards)."""
    return {
        "kind": "ablation",
        "model": model,
        "direction": {
            "shape": list(LayerVectors.of(direction).values.shape),
            "sha256": vector_digest(direction),
        },
        "layers": None if layers is None else [int(x) for x in layers],
        "steer": None
        if steer is None
        else {"sha256": vector_digest(steer[0]), "layer": int(steer[1]), "scale": float(steer[2])},
        **judged_cell_settings(questions, sampling, judge),
    }


def run_ablation(
    lm: Any,
    direction: np.ndarray | LayerVectors,
    questions: Sequence[PromptRow],
    *,
    layers: Sequence[int] | None,
    sampling: Sampling,
    judge: JudgeConfig,
    out_dir: str | Path,
    model: str = "",
    steer: tuple[np.ndarray, int, float] | None = None,
    question_prompts: Mapping[str, Mapping[str, JudgePrompt]] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Judge the model before and after ablation; write and return `results.json`:
    {conditions: {before, after}: cell summaries, em_change: after - before}."""
    add = None if steer is None else Steering.addition(lm, steer[0], [int(steer[1])], steer[2])
    ablate = Steering.layer_ablation(lm, direction, layers)
    config = ablation_config(model, direction, layers, steer, questions, sampling, judge)
    folder = ExperimentFolder(out_dir, config, overwrite=overwrite)
    runner = CellRunner(
        lm,
        make_jobs(questions, sampling.samples),
        sampling,
        judge,
        folder.judge_cache,
        question_prompts,
    )
    conds = {"before": add, "after": ablate if add is None else Steering.combine(add, ablate)}
    results: dict[str, Any] = {"config_hash": folder.hash, "conditions": {}}
    cells = [Cell(name, st, {"cell": name}) for name, st in conds.items()]
    for cell, rows in zip(cells, runner.run_cells(folder.path / "cells", cells), strict=True):
        results["conditions"][cell.name] = cell_summary(rows, seed=sampling.seed)
    before, after = (results["conditions"][k]["em_rate"] for k in ("before", "after"))
    results["em_change"] = None if None in (before, after) else after - before
    write_json_atomic(folder.path / "results.json", results)
    log_judge_stats(folder.path, runner.stats)
    return results


def write_ablation_report(results: dict, out_dir: str | Path) -> Path:
    """`ablation.png` and `report.html` in `out_dir`."""
    from emgeo_jax.experiments.figures import ablation_bars, missing_score_notes
    from emgeo_jax.experiments.report import fmt, paragraph, save_figure, table, write_page

    c = results["conditions"]
    rows = [[k, *summary_columns(c[k])] for k in c]
    blocks = [
        *missing_score_notes(list(c.values())),
        paragraph(
            "The direction is projected out of the residual stream (h - (h.r) r) at the "
            "chosen layers, on every token; 'before' is the same model without it."
        ),
        save_figure(
            ablation_bars(results),
            Path(out_dir) / "ablation.png",
            "EM rate and mean aligned score before and after ablation (95% intervals).",
        ),
        table(["condition", *SUMMARY_HEADER], rows),
        paragraph(f"EM change (after - before): {fmt(results['em_change'])}"),
    ]
    return write_page(Path(out_dir) / "report.html", "Ablation", blocks)
