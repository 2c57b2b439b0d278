"""Transfer: a steering vector from model A applied to model B (same architecture).

    result = run_transfer({"A": lm_a_loader, "B": lm_b_loader}, {"A": v_a, "B": v_b},
                          questions, layer=12, scale=8, sampling=..., judge=..., out_dir=...)

For every target model B (loaded one at a time) the folder `models/B/cells/` holds B's
unsteered cell and one cell per source vector v_A (added at `layer`, times `scale`). Transfer
effectiveness (seed 001): TE(A -> B) = (EM_B(v_A) - EM_B,base) / (EM_A(v_A) - EM_A,base),
the diagonal being 1 by construction when defined; intervals bootstrap over questions; the
asymmetry is TE(A -> B) - TE(B -> A).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from emgeo_jax.experiments.folder import (
    Cell,
    CellRunner,
    ExperimentFolder,
    Sampling,
    log_judge_stats,
    make_jobs,
    write_json_atomic,
)
from emgeo_jax.experiments.metrics import cell_summary, transfer_with_interval
from emgeo_jax.experiments.questions import PromptRow
from emgeo_jax.experiments.sweep import judged_cell_settings, vector_digest
from emgeo_jax.judge.client import JudgeConfig
from emgeo_jax.judge.prompts import JudgePrompt
from emgeo_jax.models.steering import Steering
from emgeo_jax.vectors.io import LayerVectors

BASE = "base"


def transfer_matrix(
    per_question: Mapping[str, Mapping[str, Mapping[str, float]]],
    models: Sequence[str],
    seed: int = 0,
) -> dict[str, Any]:
    """TE matrix from per-question EM fractions `per_question[B][cell]` (cell = "base" or
    "from_A"): {models, te[A][B] = {value, ci, n_questions, nan_fraction, note},
    asymmetry[A][B] = TE(A->B) - TE(B->A)}."""
    te: dict[str, dict[str, Any]] = {a: {} for a in models}
    for a in models:
        for b in models:
            te[a][b] = transfer_with_interval(
                per_question[b][f"from_{a}"],
                per_question[b][BASE],
                per_question[a][f"from_{a}"],
                per_question[a][BASE],
                seed=seed,
            )
    asym = {a: {b: te[a][b]["value"] - te[b][a]["value"] for b in models} for a in models}
    return {"models": list(models), "te": te, "asymmetry": asym}


def transfer_config(
    names: Sequence[str],
    sources: Mapping[str, str] | None,
    vectors: Mapping[str, np.ndarray | LayerVectors],
    layer: int,
    scale: float,
    questions: Sequence[PromptRow],
    sampling: Sampling,
    judge: JudgeConfig,
) -> dict[str, Any]:
    """The JSON configuration of a transfer run (what its folder's hash guards)."""
    return {
        "kind": "transfer",
        "models": {k: (sources or {}).get(k, k) for k in names},
        "vectors": {k: vector_digest(LayerVectors.of(v, k)) for k, v in vectors.items()},
        "layer": int(layer),
        "scale": float(scale),
        **judged_cell_settings(questions, sampling, judge),
    }


def run_transfer(
    models: Mapping[str, Callable[[], Any]],
    vectors: Mapping[str, np.ndarray | LayerVectors],
    questions: Sequence[PromptRow],
    *,
    layer: int,
    scale: float,
    sampling: Sampling,
    judge: JudgeConfig,
    out_dir: str | Path,
    sources: Mapping[str, str] | None = None,
    question_prompts: Mapping[str, Mapping[str, JudgePrompt]] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the transfer experiment; write and return `results.json`.

    `models`: name -> a function loading that model (called once, only if its cells are not
    all finished); `vectors`: name -> that model's direction (`[D]`, or a per-layer stack as in
    `run_sweep`, whose vector for `layer` is used)."""
    names = list(models)
    if set(names) != set(vectors) or len(names) < 2:
        raise ValueError(
            f"transfer: need >= 2 models, each with a vector; got models {names}, "
            f"vectors {list(vectors)}"
        )
    vectors = {k: LayerVectors.of(v, k) for k, v in vectors.items()}
    steer = {k: v.at(layer) for k, v in vectors.items()}  # refuses a layer a file lacks
    widths = {k: v.width for k, v in vectors.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"transfer: vectors differ in width {widths}; same architecture needed")
    config = transfer_config(names, sources, vectors, layer, scale, questions, sampling, judge)
    folder = ExperimentFolder(out_dir, config, overwrite=overwrite)
    jobs = make_jobs(questions, sampling.samples)
    cells = {BASE: None, **{f"from_{a}": a for a in names}}
    summaries: dict[str, dict[str, Any]] = {}
    for b in names:
        cell_dir = folder.path / "models" / b / "cells"
        done = all((cell_dir / f"{c}.judged.jsonl").exists() for c in cells)
        lm = None if done else models[b]()
        if lm is not None and lm.config.hidden_size != widths[b]:
            raise ValueError(
                f"transfer: model {b} has D={lm.config.hidden_size}, vectors have D={widths[b]}"
            )
        runner = CellRunner(lm, jobs, sampling, judge, folder.judge_cache, question_prompts)
        todo = []
        for c, a in cells.items():
            st = None
            if a is not None and lm is not None:
                st = Steering.addition(lm, steer[a], [layer], scale)
            todo.append(Cell(c, st, {"cell": c, "target": b, "source": a}))
        judged = runner.run_cells(cell_dir, todo)  # one model's cells packed together
        summaries[b] = {
            c: cell_summary(rows, seed=sampling.seed) for c, rows in zip(cells, judged, strict=True)
        }
        log_judge_stats(folder.path, runner.stats)
        logging.info("transfer: model %s done", b)
    pq = {b: {c: s["per_question_em"] for c, s in summaries[b].items()} for b in names}
    results = {
        "config_hash": folder.hash,
        "cells": summaries,
        **transfer_matrix(pq, names, seed=sampling.seed),
    }
    write_json_atomic(folder.path / "results.json", results)
    return results


def write_transfer_report(results: dict, out_dir: str | Path) -> Path:
    """`transfer_matrix.png` and `report.html` in `out_dir`."""
    from emgeo_jax.experiments.figures import missing_score_notes
    from emgeo_jax.experiments.figures import transfer_matrix as fig_matrix
    from emgeo_jax.experiments.report import paragraph, save_figure, table, write_page

    names = results["models"]
    te, asym = results["te"], results["asymmetry"]
    rows = [
        [a, b, te[a][b]["value"], te[a][b]["ci"], asym[a][b], te[a][b]["note"]]
        for a in names
        for b in names
        if a != b
    ]
    em = [[b, c, s["em_rate"], s["em_ci"]] for b in names for c, s in results["cells"][b].items()]
    blocks = [
        *missing_score_notes([s for b in names for s in results["cells"][b].values()]),
        paragraph(
            "TE(A -> B) = (EM_B,steered with A's vector - EM_B,base) / (EM_A,steered with "
            "A's vector - EM_A,base): 1 means the vector works as well on B as on A, 0 "
            "not at all. Intervals: bootstrap over questions. NaN: A's own vector did not "
            "change A's EM rate, so there is nothing to transfer."
        ),
        save_figure(
            fig_matrix(results),
            Path(out_dir) / "transfer_matrix.png",
            "Transfer effectiveness, rows = source of the vector, columns = target.",
        ),
        table(["source A", "target B", "TE", "95% CI", "TE(A->B) - TE(B->A)", "note"], rows),
        "<h2>EM rate per model and cell</h2>"
        + table(["model", "cell", "EM rate", "EM 95% CI"], em),
    ]
    return write_page(Path(out_dir) / "report.html", "Transfer across models", blocks)
