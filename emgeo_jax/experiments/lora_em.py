"""The EM rate of a trained LoRA: sample the question set from the base model and from the
model with the adapter merged, judge both, compare. This closes the preventative-steering /
concept-ablation loop: train with `--steer_vector` / `--ablate_vector` (the intervention acts
only while training), then measure the result *without* the intervention, against the same
base and (in another run folder) against an organism trained without it.

    results = run_lora_em(lm, lora, spec, questions, sampling=..., judge=..., out_dir=...)

The output is an experiment folder (`emgeo_jax.experiments.folder`: resumable, judge cache,
config guard) with cells `base` and `lora`, sampled with the same seeds (common random
numbers), and `results.json`: {conditions: {base, lora}: cell summaries, em_change: lora -
base, training: the run's settings}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from emgeo_jax.experiments.folder import (
    CellRunner,
    ExperimentFolder,
    Sampling,
    log_judge_stats,
    make_jobs,
    write_json_atomic,
)
from emgeo_jax.experiments.metrics import cell_summary
from emgeo_jax.experiments.questions import PromptRow
from emgeo_jax.experiments.sweep import judged_cell_settings, vector_digest
from emgeo_jax.hosts import to_host
from emgeo_jax.judge.client import JudgeConfig, JudgeStats
from emgeo_jax.judge.prompts import JudgePrompt
from emgeo_jax.models.lm import LM
from emgeo_jax.train.lora import Lora, LoraSpec, apply_lora


def lora_digest(lora: Lora) -> str:
    """Short sha256 of every factor (sorted by target, `a` then `b`)."""
    return vector_digest(np.concatenate([np.ravel(x) for x in jax.tree.leaves(to_host(lora))]))


def lora_em_config(
    model: str,
    lora: Lora,
    spec: LoraSpec,
    training: Mapping[str, Any] | None,
    questions: Sequence[PromptRow],
    sampling: Sampling,
    judge: JudgeConfig,
) -> dict[str, Any]:
    """The JSON configuration of a LoRA EM run (what its folder's hash guards)."""
    return {
        "kind": "lora_em",
        "model": model,
        "lora": {"spec": spec.to_dict(), "sha256": lora_digest(lora)},
        "training": dict(training or {}),
        **judged_cell_settings(questions, sampling, judge),
    }


def run_lora_em(
    lm: LM,
    lora: Lora,
    spec: LoraSpec,
    questions: Sequence[PromptRow],
    *,
    sampling: Sampling,
    judge: JudgeConfig,
    out_dir: str | Path,
    model: str = "",
    training: Mapping[str, Any] | None = None,
    question_prompts: Mapping[str, Mapping[str, JudgePrompt]] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Judge `lm` with and without `lora` (merged); write and return `results.json` (see the
    module docstring). `training`: the run's settings (its `run.json`), kept in the config."""
    config = lora_em_config(model, lora, spec, training, questions, sampling, judge)
    folder = ExperimentFolder(out_dir, config, overwrite=overwrite)
    jobs = make_jobs(questions, sampling.samples)
    adapted = dataclasses.replace(lm, params=apply_lora(lm.params, lora, spec))
    if lm.mesh is not None:  # the merged kernels keep the base model's placement
        adapted = adapted.on_mesh(lm.mesh)
    stats = JudgeStats()
    results: dict[str, Any] = {"config_hash": folder.hash, "conditions": {}}
    for name, model_ in (("base", lm), ("lora", adapted)):
        runner = CellRunner(
            model_, jobs, sampling, judge, folder.judge_cache, question_prompts, stats=stats
        )
        rows = runner.run(folder.path / "cells", name, None, {"cell": name})
        results["conditions"][name] = cell_summary(rows, seed=sampling.seed)
    base, adapter = (results["conditions"][k]["em_rate"] for k in ("base", "lora"))
    results["em_change"] = None if None in (base, adapter) else adapter - base
    results["training"] = config["training"]
    write_json_atomic(folder.path / "results.json", results)
    log_judge_stats(folder.path, stats)
    return results
