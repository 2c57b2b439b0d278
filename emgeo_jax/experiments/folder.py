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
An experiment's unfinished cells are generated together: their rows are packed into shared
batches of `batch_size` rows, each row running its own cell's intervention (per-row steering),
so a sweep of many cells takes few generate calls. Job j of every cell samples from the stream
`(seed + j // batch_size, j % batch_size)` (`job_stream`): the tokens of a cell run alone,
batch by batch, whatever it was packed with. Every cell samples with the same seeds (common
random numbers): differences between cells come from the intervention, not from sampling
noise, and a cell's output does not depend on which cells ran before or beside it. Re-running
skips cells whose judged file exists, reuses a generations file without regenerating,
continues a cell's partial generations after its last saved row, and judges through the
cache, so no judge request is ever repeated.

Several processes (a model on a mesh spanning them, under `jax.distributed.initialize`): every
process calls the same experiment function; process 0 decides what is already on disk and
tells the others (`emgeo_jax.hosts.broadcast_json`), all processes generate together (each
transferring its own rows), process 0 alone writes files and calls the judge (a local
judge's model calls run on every process inside `experiments.judging.judging_session`), and
the judged rows are sent to every process, so every process returns the same results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from emgeo_jax import runs
from emgeo_jax.experiments.judging import judging_session
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


@dataclasses.dataclass(frozen=True)
class Cell:
    """One intervention over a job list: `name` (file-safe; the cell's files are named after
    it), `steering` (None: unsteered), `meta` (fields every row of the cell carries) and
    `jobs` (None: the runner's job list)."""

    name: str
    steering: Steering | None
    meta: Mapping[str, Any]
    jobs: Sequence[Mapping[str, Any]] | None = None


def job_stream(sampling: Sampling, j: int) -> tuple[int, int]:
    """The sampling stream `(seed, lane)` of job `j` of every cell: row `j % batch_size` of a
    batch seeded `seed + j // batch_size`, as if the cell ran alone in batches of
    `batch_size` (so a row samples the same tokens however cells are packed or resumed)."""
    b = sampling.batch_size
    return sampling.seed + j // b, j % b


def generate_cells(
    lm: Any,
    cells: Sequence[tuple[Steering | None, Sequence[Mapping[str, Any]]]],
    sampling: Sampling,
    monitor: tuple[int, np.ndarray] | None = None,
    starts: Sequence[int] | None = None,
    on_rows: Callable[[int, list[dict[str, Any]]], None] | None = None,
) -> list[list[dict[str, Any]]]:
    """Generate a response per job of every cell, the cells' rows packed into batches of
    `sampling.batch_size` (the last padded to full size, so every batch shares one compiled
    program). `cells`: `(steering, jobs)` per cell; rows run their cell's steering (at
    `sampling.positions`) through per-row steering when cells with different steerings share
    a batch. Rows gain `response`, `finish_reason` and, with `monitor=(layer, direction)`,
    `projection` (mean over generated tokens of the residual after block `layer` dotted with
    the unit direction).

    Job `j` samples from stream `job_stream(sampling, j)`: the rows are those of each cell run
    alone, batch by batch. `starts[c]` skips cell c's first jobs (a resumed run).
    `on_rows(c, rows)` gets cell c's rows as each batch finishes, in job order (to save them).
    Returns each cell's new rows."""
    starts = list(starts) if starts is not None else [0] * len(cells)
    todo = [(c, j) for c, (_, jobs) in enumerate(cells) for j in range(starts[c], len(jobs))]
    out: list[list[dict[str, Any]]] = [[] for _ in cells]
    if not todo:
        return out
    b = sampling.batch_size
    batches = [todo[k : k + b] for k in range(0, len(todo), b)]
    specs = [None if st is None else st.at_positions(sampling.positions) for st, _ in cells]
    shared = len({id(spec) for spec in specs}) == 1  # one intervention for every row
    if not shared:  # per-row steering, the same shapes in every batch (one compile)
        slots = max(len({c for c, _ in batch}) for batch in batches)
        none = Steering.none(lm.config)
        specs = [none if spec is None else spec for spec in specs]
        directions = max(int(spec.ablate.shape[1]) for spec in specs)
    logging.info(
        "generating %d responses of %d cells in %d batches of %d",
        len(todo),
        sum(1 for c in range(len(cells)) if starts[c] < len(cells[c][1])),
        len(batches),
        b,
    )
    clock = time.monotonic()
    for i, batch in enumerate(batches, 1):
        padded = batch + [batch[-1]] * (b - len(batch))
        jobs = [cells[c][1][j] for c, j in padded]
        steering = specs[0]
        if not shared:
            order = list(dict.fromkeys(c for c, _ in padded))
            used = [specs[c] for c in order] + [specs[order[-1]]] * (slots - len(order))
            variant = [order.index(c) for c, _ in padded]
            steering = Steering.per_row(used, variant, num_directions=directions)
        res = generate(
            lm,
            [with_system(job["prompt"], job.get("system")) for job in jobs],
            steering,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            streams=[job_stream(sampling, j) for _, j in padded],
            monitor=monitor,
        )
        by_cell: dict[int, list[dict[str, Any]]] = {}
        for r, (c, _) in enumerate(batch):
            row = {key: v for key, v in jobs[r].items() if key != "prompt"}
            row.update(response=res.texts[r], finish_reason=res.finish_reasons[r])
            if res.projections is not None:
                p = res.projections[r]
                row["projection"] = float(np.mean(p)) if len(p) else None
            by_cell.setdefault(c, []).append(row)
        for c, rows in by_cell.items():
            out[c] += rows
            if on_rows is not None:
                on_rows(c, rows)
        rate = i / (time.monotonic() - clock)
        logging.info(
            "batch %d/%d: %.2f batches/s, ETA %.0f s",
            i,
            len(batches),
            rate,
            (len(batches) - i) / rate,
        )
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
        """The judged rows of cell `name` (each carrying `meta`); `run_cells` of one cell."""
        return self.run_cells(cell_dir, [Cell(name, steering, meta)])[0]

    def run_cells(self, cell_dir: Path, cells: Sequence[Cell]) -> list[list[dict[str, Any]]]:
        """The judged rows of every cell, computing what is missing: first the generations of
        every unfinished cell, packed into shared batches (`generate_cells`), then each cell's
        judging in order. The same rows on every process (see the module docstring)."""
        done = None
        if is_primary():
            done = [
                "judged"
                if (cell_dir / f"{c.name}.judged.jsonl").exists()
                else "generated"
                if (cell_dir / f"{c.name}.generations.jsonl").exists()
                else None
                for c in cells
            ]
        done = broadcast_json(done)
        self._generate(cell_dir, [c for c, d in zip(cells, done, strict=True) if d is None])
        out = []
        for cell, state in zip(cells, done, strict=True):
            judged = cell_dir / f"{cell.name}.judged.jsonl"
            if state == "judged":
                out.append(broadcast_json(read_jsonl(judged) if is_primary() else None))
                continue
            gen = cell_dir / f"{cell.name}.generations.jsonl"
            rows = broadcast_json(read_jsonl(gen) if is_primary() else None)
            self._stage(cell.name, "generated")
            scored = None
            with judging_session(self.judge):  # a local judge's calls run on every process
                if is_primary():
                    logging.info("cell %s: judging", cell.name)
                    scored = judge_responses(
                        [{**r, "answer": r["response"]} for r in rows],
                        self.judge,
                        cache_path=self.cache_path,
                        question_prompts=self.question_prompts,
                        stats=self.stats,
                        progress=False,
                    )
            if is_primary():
                scored = [{k: v for k, v in r.items() if k != "answer"} for r in scored]
                write_jsonl_atomic(judged, scored)
            out.append(broadcast_json(scored))
            self._stage(cell.name, "judged")
        return out

    def _generate(self, cell_dir: Path, cells: Sequence[Cell]) -> None:
        """Generate the cells, their rows appended to each cell's `NAME.generations.jsonl
        .partial` as batches finish (process 0 writes), so an interrupted run resumes after
        each cell's last saved row; `NAME.generations.jsonl` appears when the cell is
        complete."""
        if not cells:
            return
        jobs = [self.jobs if c.jobs is None else c.jobs for c in cells]
        writers = None
        if is_primary():
            writers = [
                ResumableJsonl(
                    cell_dir / f"{c.name}.generations.jsonl",
                    {"cell": c.name, "jobs": len(j), "batch_size": self.sampling.batch_size},
                )
                for c, j in zip(cells, jobs, strict=True)
            ]
        starts = broadcast_json(None if writers is None else [w.done for w in writers])
        for c, start, j in zip(cells, starts, jobs, strict=True):
            if start:
                logging.info("cell %s: resuming after %d/%d responses", c.name, start, len(j))

        def save(c: int, rows: list[dict[str, Any]]) -> None:
            if writers is not None:
                writers[c].append([{**r, **cells[c].meta} for r in rows])
                if writers[c].done == len(jobs[c]):
                    writers[c].finish()

        for c, writer in enumerate(writers or []):
            if writer.done == len(jobs[c]):  # complete but not renamed: finish it now
                writer.finish()
        generate_cells(
            self.lm,
            [(c.steering, j) for c, j in zip(cells, jobs, strict=True)],
            self.sampling,
            self.monitor,
            starts=starts,
            on_rows=save,
        )

    def _stage(self, name: str, stage: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name, stage)
