"""Packed experiments: a 12-cell sweep whose cells share batches (per-row steering, per-job
sampling streams) gives the rows and the table that running each cell alone gives (today's
cell-by-cell code is kept here as the reference), in fewer generate calls and one compiled
program, and a run killed inside a batch that mixes cells resumes to the same files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from emgeo_jax.experiments.folder import Sampling, make_jobs
from emgeo_jax.experiments.metrics import cell_summary
from emgeo_jax.experiments.sweep import BASELINE, cell_name, run_sweep
from emgeo_jax.generate import generate, with_system
from emgeo_jax.generate.loop import decode
from emgeo_jax.judge.client import JudgeConfig, judge_responses
from emgeo_jax.judge.io import read_jsonl
from emgeo_jax.judge.testing import ScriptedJudgeServer
from emgeo_jax.models.lm import LM, init_params
from emgeo_jax.models.steering import Steering
from emgeo_jax.vectors.io import LayerVectors
from tests.test_experiments import QUESTIONS, Killed, directions, table

# 6 jobs a cell in batches of 4: packed batches mix cells
SAMPLING = Sampling(samples=3, max_new_tokens=6, temperature=1.0, top_p=0.9, batch_size=4, seed=5)
GRID = dict(layers=[0, 2], scales=[-4, 4, 8])  # x 2 directions = 12 cells, + the baseline
MONITOR = (1, "md")


def alone(lm, cells, sampling, monitor=None, questions=QUESTIONS):
    """Today's experiment generation, the reference: each cell alone, batch k of `batch_size`
    jobs (the last padded with copies of its last job) seeded `seed + k`, one shared steering.
    `cells`: name -> Steering or None. Returns name -> [(response, mean projection)]."""
    jobs = make_jobs(questions, sampling.samples)
    out, b = {}, sampling.batch_size
    for name, steering in cells.items():
        if steering is not None:
            steering = steering.at_positions(sampling.positions)
        rows = []
        for k in range(0, len(jobs), b):
            batch = jobs[k : k + b]
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
            for i, _ in enumerate(batch):
                proj = None if monitor is None else float(np.mean(res.projections[i]))
                rows.append((res.texts[i], proj))
        out[name] = rows
    return out


def cell_by_cell(lm, vectors, sampling, monitor):
    """The sweep's cells run alone (`alone`)."""
    vectors = {k: LayerVectors.of(v, k).for_model(lm.config.num_layers) for k, v in vectors.items()}
    cells = {BASELINE: None}
    for d in vectors:
        for layer in GRID["layers"]:
            for s in GRID["scales"]:
                cells[cell_name(d, layer, s)] = Steering.addition(
                    lm, vectors[d].at(layer), [layer], s
                )
    return alone(lm, cells, sampling, (monitor[0], vectors[monitor[1]].at(monitor[0])))


def sweep(lm, out, server, **kw):
    judge = JudgeConfig(base_url=server.base_url, model="scripted")
    return run_sweep(
        lm,
        directions(lm),
        QUESTIONS,
        judge=judge,
        out_dir=out,
        sampling=SAMPLING,
        model="tiny",
        monitor=MONITOR,
        **GRID,
        **kw,
    )


@pytest.fixture(scope="module")
def packed(tiny_chat_llama, tmp_path_factory):
    """The packed sweep, its generate calls and how many decode programs it compiled."""
    import emgeo_jax.experiments.folder as folder

    out = tmp_path_factory.mktemp("packed")
    calls, real = [], folder.generate

    def counting(*args, **kw):
        calls.append(kw["streams"])
        return real(*args, **kw)

    folder.generate = counting
    compiled = decode._cache_size()
    try:
        with ScriptedJudgeServer(table) as server:
            res = sweep(tiny_chat_llama, out, server)
    finally:
        folder.generate = real
    return out, res, calls, decode._cache_size() - compiled


def test_packed_sweep_equals_cell_by_cell(tiny_chat_llama, packed):
    out, res, calls, compiled = packed
    jobs = len(QUESTIONS) * SAMPLING.samples
    cells = [BASELINE] + [c["name"] for c in res["cells"]]
    assert len(cells) == 13
    assert len(calls) == math.ceil(13 * jobs / SAMPLING.batch_size)  # 20, not 13 x 2
    assert compiled <= 1  # every batch, whatever its mix of cells, runs one program
    ref = cell_by_cell(tiny_chat_llama, directions(tiny_chat_llama), SAMPLING, MONITOR)
    for name in cells:
        rows = read_jsonl(out / "cells" / f"{name}.generations.jsonl")
        assert [r["response"] for r in rows] == [t for t, _ in ref[name]], name
        np.testing.assert_allclose(
            [r["projection"] for r in rows], [p for _, p in ref[name]], rtol=1e-5, atol=1e-5
        )
    assert len({tuple(t for t, _ in ref[n]) for n in cells}) > 6  # the cells differ
    # the table of the reference rows, judged by the same judge, is the packed run's table
    with ScriptedJudgeServer(table) as server:
        judge = JudgeConfig(base_url=server.base_url, model="scripted")
        jobs_ = make_jobs(QUESTIONS, SAMPLING.samples)
        for name in cells:
            rows = [{**j, "answer": t} for j, (t, _) in zip(jobs_, ref[name], strict=True)]
            scored = judge_responses(rows, judge, progress=False)
            want = cell_summary(scored, seed=SAMPLING.seed)
            got = (
                res["baseline"]
                if name == BASELINE
                else next(c for c in res["cells"] if c["name"] == name)
            )
            for key in ("em_rate", "em_ci", "aligned_mean", "aligned_ci", "coherent_mean"):
                assert json.dumps(got[key]) == json.dumps(want[key]), (name, key)


def test_killed_in_a_mixed_batch_resumes_to_the_same_files(tiny_chat_llama, packed, tmp_path):
    """Killed in the 5th batch (the last 2 rows of the 2nd steered cell, the first 2 of the
    3rd): the re-run generates only the batches no file holds, with the same streams, and
    writes what the uninterrupted run wrote."""
    import emgeo_jax.experiments.folder as folder

    ref_out, ref, ref_calls, _ = packed
    calls, real = [], folder.generate

    def counting(*args, **kw):
        calls.append(kw["streams"])
        if len(calls) == kill_at:
            raise Killed
        return real(*args, **kw)

    folder.generate = counting
    try:
        with ScriptedJudgeServer(table) as server:
            kill_at = 5
            with pytest.raises(Killed):
                sweep(tiny_chat_llama, tmp_path, server)
            calls.clear()
            kill_at = None
            res = sweep(tiny_chat_llama, tmp_path, server)
    finally:
        folder.generate = real
    assert ref_calls[4] == [(6, 0), (6, 1), (5, 0), (5, 1)]  # a mixed batch: jobs 4-5, 0-1
    assert calls == ref_calls[4:]  # the 4 finished batches are not generated again
    assert json.loads(json.dumps(res)) == json.loads(json.dumps(ref))
    for f in (ref_out / "cells").glob("*.jsonl"):
        assert (tmp_path / "cells" / f.name).read_text() == f.read_text(), f.name


def test_packed_ablation_and_transfer_equal_their_cells_alone(tiny_chat_llama, tmp_path):
    """The ablation's two cells (a steered one and the same with a direction projected out,
    per-row ablation) and a transfer's three cells per model, packed, give the responses of
    each cell run alone."""
    from emgeo_jax.experiments.ablation import run_ablation
    from emgeo_jax.experiments.transfer import run_transfer

    lm, v = tiny_chat_llama, directions(tiny_chat_llama)
    steer = Steering.addition(lm, v["pc"], [1], 4.0)
    ablate = Steering.layer_ablation(lm, v["md"], None)
    with ScriptedJudgeServer(table) as server:
        judge = JudgeConfig(base_url=server.base_url, model="scripted")
        run_ablation(
            lm,
            v["md"],
            QUESTIONS,
            layers=None,
            sampling=SAMPLING,
            judge=judge,
            out_dir=tmp_path / "ablate",
            steer=(v["pc"], 1, 4.0),
        )
        other = LM(lm.config, *init_params(lm.config, seed=2), tokenizer=lm.tokenizer)
        run_transfer(
            {"a": lambda: lm, "b": lambda: other},
            {"a": v["pc"], "b": v["md"][2]},
            QUESTIONS,
            layer=1,
            scale=4.0,
            sampling=SAMPLING,
            judge=judge,
            out_dir=tmp_path / "transfer",
        )
    want = alone(lm, {"before": steer, "after": Steering.combine(steer, ablate)}, SAMPLING)
    for name, rows in want.items():
        got = read_jsonl(tmp_path / "ablate" / "cells" / f"{name}.generations.jsonl")
        assert [r["response"] for r in got] == [t for t, _ in rows], name
    for model, target in (("a", lm), ("b", other)):
        cells = {
            "base": None,
            "from_a": Steering.addition(target, v["pc"], [1], 4.0),
            "from_b": Steering.addition(target, v["md"][2], [1], 4.0),
        }
        for name, rows in alone(target, cells, SAMPLING).items():
            got = read_jsonl(
                tmp_path / "transfer" / "models" / model / "cells" / f"{name}.generations.jsonl"
            )
            assert [r["response"] for r in got] == [t for t, _ in rows], (model, name)
