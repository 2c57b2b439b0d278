"""Experiment folders and the resumable unit of work, the *cell*.

An experiment folder holds:

    config.json           the full configuration (model source, seeds, judge, grid) and its
                          hash; a different configuration in an existing folder is refused
                          unless `overwrite=True` (which empties the folder first)
    judge_cache.sqlite    the judge's cache: one request per (judge, prompt, question, answer)
    cells/NAME.generations.jsonl   a cell's generations, complete (written batch by batch to
                                   NAME.generations.jsonl.partial first; a killed cell resumes
                                   after its last finished batch)
    cells/NAME.judged.jsonl        the same rows with judge scores, written atomically
    results.json, *.png, report.html

A cell is one intervention (a `Steering`, or none) applied to every question x sample job.
Re-running skips cells whose judged file exists, reuses a generations file without
regenerating, and judges through the cache, so no judge request is ever repeated. Every cell
samples with the same seeds (common random numbers): differences between cells come from the
intervention, not from sampling noise, and a cell's output does not depend on which cells
ran before it.

Several processes (a model on a mesh spanning them, under `jax.distributed.initialize`): every
process calls the same experiment function; process 0 decides what is already on disk and
tells the others (`emgeo_jax.hosts.broadcast_json`), all processes generate together (each
transferring its own rows), process 0 alone writes files and calls the judge, and the judged
rows are sent to every process, so every process returns the same results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from emgeo_jax import runs
from emgeo_jax.experiments.questions import PromptRow
from emgeo_jax.generate import generate, with_system
from emgeo_jax.hosts import broadcast_json, is_primary
from emgeo_jax.judge.client import JudgeConfig, JudgeStats, judge_responses
from emgeo_jax.judge.io import question_text, write_jsonl_atomic
from emgeo_jax.judge.prompts import JudgePrompt
from emgeo_jax.models.steering import Steering
from emgeo_jax.runs import ResumableJsonl, SettingsMismatch, read_jsonl
from emgeo_jax.runs import settings_diff as settings_diff  # re-exported: its old home

# An experiment folder already holds a run with another configuration: the package's one
# settings error (the old name stays for callers that catch it).
ConfigMismatchError = SettingsMismatch


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How every cell samples: `samples` per question, rows generated `batch_size` at a time
    (the last batch is padded to full size so every batch shares one compiled program), batch k
    seeded `seed + k` in every cell."""

    samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 32
    seed: int = 0
    positions: str = "all"

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"Sampling: samples, batch_size, max_new_tokens must be >= 1: {self}")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON written atomically (`emgeo_jax.runs.write_json_atomic`) by process 0 only."""
    if is_primary():
        runs.write_json_atomic(path, obj)


def log_judge_stats(folder: Path, stats: JudgeStats) -> None:
    """Append this run's judge counters to `folder/runs.jsonl` (kept out of results.json, so
    a resumed run's results equal an uninterrupted run's); process 0 only."""
    if not is_primary():
        return
    row = {k: getattr(stats, k) for k in ("judgements", "cache_hits", "requests", "failed")}
    runs.append_jsonl(
        Path(folder) / "runs.jsonl", [{**row, "judge_seconds": round(stats.seconds, 3)}]
    )
    logging.info(
        "judge: %d requests, %d cache hits, %d failed",
        stats.requests,
        stats.cache_hits,
        stats.failed,
    )


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `config` (sorted keys)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _refusal(path: Path, recorded: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """Why an existing folder's recorded experiment is not this one, naming each setting."""
    error = runs.mismatch(
        path,
        recorded.get("config"),
        config,
        what="an experiment with another configuration",
        hint="use another folder or --overwrite to discard it",
    )
    if error:
        return str(error)
    # equal settings under another hash: recorded by another version's hashing
    return (
        f"{path} holds an experiment recorded under another hash; use another folder or "
        "--overwrite to discard it"
    )


def check_folder(path: str | Path, config: Mapping[str, Any], overwrite: bool = False) -> None:
    """Refuse (`ConfigMismatchError`, naming the differing settings) an existing experiment
    folder made with another configuration, as `ExperimentFolder` would, without touching it:
    commands call this before loading their model. With `overwrite`, or a new folder, a no-op."""
    error = None
    if is_primary() and not overwrite:
        recorded = runs.read_settings(Path(path) / "config.json")
        if recorded is not None and recorded.get("hash") != config_hash(dict(config)):
            error = _refusal(Path(path), recorded, dict(config))
    error = broadcast_json(error)
    if error is not None:
        raise ConfigMismatchError(error)


class ExperimentFolder:
    """An experiment's folder (see module docstring)."""

    def __init__(self, path: str | Path, config: Mapping[str, Any], overwrite: bool = False):
        self.path = Path(path)
        self.config = dict(config)
        self.hash = config_hash(self.config)
        error = None
        if is_primary():  # process 0 checks and writes; every process refuses alike
            error = self._claim(overwrite)
        error = broadcast_json(error)
        if error is not None:
            raise SettingsMismatch(error)

    def _claim(self, overwrite: bool) -> str | None:
        """Check, empty (with `overwrite`) and claim the folder; the refusal, if any."""
        cfg_file = self.path / "config.json"
        recorded = runs.read_settings(cfg_file)
        if recorded is not None and recorded.get("hash") != self.hash:
            if not overwrite:
                return _refusal(self.path, recorded, self.config)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg_file, {"hash": self.hash, "config": self.config})
        return None

    @property
    def judge_cache(self) -> Path:
        return self.path / "judge_cache.sqlite"


def make_jobs(questions: Sequence[PromptRow], samples: int) -> list[dict[str, Any]]:
    """One job per (question row, sample): `question_id, paraphrase, question` (the text the
    judge sees), `prompt`, `system`, `sample`. A row's own `samples` overrides `samples`."""
    jobs = []
    for row in questions:
        for s in range(row.get("samples") or samples):
            jobs.append(
                {
                    "question_id": str(row["id"]),
                    "paraphrase": row.get("paraphrase", 0),
                    "question": question_text(row["prompt"]),
                    "prompt": row["prompt"],
                    "system": row.get("system"),
                    "sample": s,
                }
            )
    return jobs


def generate_jobs(
    lm: Any,
    jobs: Sequence[Mapping[str, Any]],
    steering: Steering | None,
    sampling: Sampling,
    monitor: tuple[int, np.ndarray] | None = None,
    start: int = 0,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate a response per job; rows gain `response`, `finish_reason` and, with
    `monitor=(layer, direction)`, `projection` (mean over generated tokens of the residual
    after block `layer` dotted with the unit direction).

    `start` (a multiple of `sampling.batch_size`) skips the jobs before it, as a resumed run
    does: batch k always samples with seed `sampling.seed + k`, so the rows come out as in an
    uninterrupted run. `on_batch(rows)` gets each finished batch's rows (to save them)."""
    if steering is not None:
        steering = steering.at_positions(sampling.positions)
    out = []
    b = sampling.batch_size
    if start % b:
        raise ValueError(f"generate_jobs: start {start} is not a multiple of the batch {b}")
    for k in range(start, len(jobs), b):
        batch = list(jobs[k : k + b])
        padded = batch + [batch[-1]] * (b - len(batch))
        res = generate(
            lm,
            [with_system(j["prompt"], j.get("system")) for j in padded],
            steering,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed + k // b,
            monitor=monitor,
        )
        rows = []
        for i, job in enumerate(batch):
            row = {key: v for key, v in job.items() if key != "prompt"}
            row.update(response=res.texts[i], finish_reason=res.finish_reasons[i])
            if res.projections is not None:
                p = res.projections[i]
                row["projection"] = float(np.mean(p)) if len(p) else None
            rows.append(row)
        if on_batch is not None:
            on_batch(rows)
        out += rows
    return out


@dataclasses.dataclass
class CellRunner:
    """Runs cells of one model over one job list, judging through one cache.

    `on_stage(name, stage)` is called after a cell's "generated" and "judged" stages
    (progress; tests raise from it to simulate a kill)."""

    lm: Any
    jobs: Sequence[Mapping[str, Any]]
    sampling: Sampling
    judge: JudgeConfig
    cache_path: Path
    question_prompts: Mapping[str, Mapping[str, JudgePrompt]] | None = None
    monitor: tuple[int, np.ndarray] | None = None
    on_stage: Callable[[str, str], None] | None = None
    stats: JudgeStats = dataclasses.field(default_factory=JudgeStats)

    def run(
        self, cell_dir: Path, name: str, steering: Steering | None, meta: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """The judged rows of cell `name` (each carrying `meta`), computing what is missing
        (the same rows on every process; see the module docstring)."""
        judged = cell_dir / f"{name}.judged.jsonl"
        gen = cell_dir / f"{name}.generations.jsonl"
        done = None
        if is_primary():
            done = "judged" if judged.exists() else "generated" if gen.exists() else None
        done = broadcast_json(done)
        if done == "judged":
            return broadcast_json(read_jsonl(judged) if is_primary() else None)
        if done == "generated":
            rows = broadcast_json(read_jsonl(gen) if is_primary() else None)
        else:
            rows = self._generate(gen, name, steering, meta)
        self._stage(name, "generated")
        scored = None
        if is_primary():
            logging.info("cell %s: judging", name)
            scored = judge_responses(
                [{**r, "answer": r["response"]} for r in rows],
                self.judge,
                cache_path=self.cache_path,
                question_prompts=self.question_prompts,
                stats=self.stats,
                progress=False,
            )
            scored = [{k: v for k, v in r.items() if k != "answer"} for r in scored]
            write_jsonl_atomic(judged, scored)
        scored = broadcast_json(scored)
        self._stage(name, "judged")
        return scored

    def _generate(
        self, gen: Path, name: str, steering: Steering | None, meta: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        """The cell's generations, batch by batch into `gen.partial` (process 0 writes), so an
        interrupted cell resumes after its last finished batch; `gen` appears when complete."""
        b = self.sampling.batch_size
        record = {"cell": name, "jobs": len(self.jobs), "batch_size": b}
        writer = ResumableJsonl(gen, record, unit=b) if is_primary() else None
        start = broadcast_json(writer.done if writer is not None else None)
        if start:
            logging.info("cell %s: resuming after %d/%d responses", name, start, len(self.jobs))
        else:
            logging.info("cell %s: generating %d responses", name, len(self.jobs))

        def save(rows: list[dict[str, Any]]) -> None:
            if writer is not None:
                writer.append([{**r, **meta} for r in rows])

        generate_jobs(
            self.lm, self.jobs, steering, self.sampling, self.monitor, start=start, on_batch=save
        )
        if writer is not None:
            writer.finish()
        return broadcast_json(read_jsonl(gen) if is_primary() else None)

    def _stage(self, name: str, stage: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name, stage)
