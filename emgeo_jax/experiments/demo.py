"""`emgeo demo [--out DIR] [--quick]`: from the embedded default model and the shipped data to
one report, offline.

Stages (each resumable: re-running the command skips what is finished, if it was made with the
same configuration; a folder left by another model or mode is refused, naming the differing
settings, unless `--overwrite`, which recomputes those stages):

1. extract: pooled answer activations of the shipped contrast pairs at every layer, every
   fourth pair held out (it serves stage 4);
2. directions: mean-diff and PCA (PC1, sign towards the mean-diff) at every layer, and SAE
   directions at the middle geometry layer: a small TopK SAE trained on the pairs' token
   activations there, its features ranked against the mean-diff and by class (see
   `emgeo_jax.experiments.sae_stage`);
3. geometry: the geometry suite over methods x a few layers (the SAE features at theirs),
   with the per-layer PCA disentanglement figure (`geometry/report.html`);
4. dose-response: the judge-free steering effect of the mean-diff at the middle sweep layer
   on the held-out pairs (answer log-likelihood margins against a random-direction null; see
   `emgeo_jax.experiments.dose_response`): it measures on the 135M model what its judge
   cannot;
5. sweep: steering with both directions (`--quick`: mean-diff at one layer) at three layers and
   two scales (negative included) on our first question set, judged by OpenAI
   (`--judge_model`, default gpt-4o-mini) when OPENAI_API_KEY is set, or by the judge at
   `--judge_base_url`. Offline, the full demo skips it and says why: the only judge is the
   same 135M model behind our local server, which gives a number for almost no answer (EM
   rates come out n/a), and its judging took 4 of the 6 minutes the full demo used to take.
   `--judged_sweep` runs it anyway (a test of the plumbing, labelled as such); `--quick` (CI)
   always runs its 3-cell version, for the same reason;
6. `report.html` tying it together.

The geometry's 95% intervals come from a bootstrap over the contrast pairs' per-example
activations (the extraction keeps them): the mean-diff and PCA directions of every layer are
rebuilt from each resample, one resample of the pairs for all of them (they are the same
examples, so a cosine across layers or methods varies as one sample would); the SAE
directions are held fixed.

On several processes (`launch/`, `--distributed`) every process runs the model's stages
(extraction, the SAE stage's forwards, dose-response, sweep) over its share of the rows, and
process 0 alone trains the SAE, computes the geometry and writes every file; the other
processes read the extraction back from `--out`, so it must be on storage they all see.

Each stage logs its wall and CPU seconds; `timings.json` keeps the wall seconds (the sweep's
judging share separately).

PCA directions are unit vectors; for steering they are rescaled to the mean-diff's norm at
each layer, so a scale means the same step length for both methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from emgeo_jax.hosts import is_primary

LOCAL_JUDGE_NOTE = (
    "The judge here is the same 135M-parameter model served locally. Its tokenizer spells "
    "numbers digit by digit, so each score comes from the exact probability of every whole-number "
    "reply 0-100 (not only of the first digit). Even so the model seldom commits to a number: "
    "when under 25% of its probability goes to one, the score is missing (n/a, never guessed). "
    "Its scores are a smoke test of the pipeline, not a measurement: a model this small cannot "
    "reliably tell an aligned answer from a misaligned one or rate coherence. Set "
    "OPENAI_API_KEY (gpt-4o-mini) for real scores."
)


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo run."""

    max_pairs: int | None  # contrast pairs read (the first ones; None: all)
    hold_out_every: int  # of those, every k-th is held out of the directions for dose-response
    sweep_layers: tuple[int, ...]
    scales: tuple[float, ...]
    n_questions: int | None
    samples: int
    max_new_tokens: int
    geometry_layers: tuple[int, ...]
    methods: tuple[str, ...]
    n_null: int
    n_boot: int
    dose_scales: tuple[float, ...]  # dose-response scales (0 is always run)
    dose_random: int  # random directions per dose-response cell (the null)


def plan(quick: bool, num_layers: int) -> DemoPlan:
    """The demo's sizes for a model with `num_layers` blocks (quick: the CI mode)."""
    thirds = tuple(sorted({round(num_layers * f) for f in (0.3, 0.5, 0.7)}))
    geo = tuple(range(0, num_layers, max(1, num_layers // 6)))
    if quick:
        # CI mode: every stage runs, at the smallest size that still exercises it (the local
        # 135M judge's ~350-token prefills dominate, so the sweep is 3 cells x 2 answers).
        return DemoPlan(
            max_pairs=16,
            hold_out_every=4,
            sweep_layers=thirds[1:2],
            scales=(-8.0, 8.0),
            n_questions=2,
            samples=1,
            max_new_tokens=16,
            geometry_layers=geo[::2],
            methods=("mean_diff",),
            n_null=100,
            n_boot=20,
            dose_scales=(-8.0, 8.0),
            dose_random=2,
        )
    return DemoPlan(
        max_pairs=None,
        hold_out_every=4,
        sweep_layers=thirds,
        scales=(-8.0, 8.0),
        n_questions=None,
        samples=2,
        max_new_tokens=40,
        geometry_layers=geo,
        methods=("mean_diff", "pca"),
        n_null=300,
        n_boot=200,
        dose_scales=(-8.0, -4.0, 4.0, 8.0),
        dose_random=4,
    )


@contextlib.contextmanager
def _stage(times: dict[str, float], name: str) -> Iterator[None]:
    """Time a stage into `times[name]` (wall seconds) and log wall and process CPU seconds
    (CPU time is the figure to compare across differently loaded machines)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    times[name] = time.perf_counter() - wall
    logging.info("stage %s: %.1f s wall, %.1f s CPU", name, times[name], time.process_time() - cpu)


def _geometry(
    dirs: dict[str, Any],
    layers: tuple[int, ...],
    p: DemoPlan,
    out: Path,
    sae: Any = None,
    overwrite: bool = False,
) -> Path:
    """The geometry stage into `out` (`report.html`), reused only when `out/stage.json` records
    the same settings (`dirs["run_hash"]`: the extraction's, the layers, null and bootstrap
    sizes, the SAE stage's settings); see `reuse_stage`."""
    from emgeo_jax.experiments.folder import write_json_atomic
    from emgeo_jax.experiments.pipeline import reuse_stage
    from emgeo_jax.geometry.analyze import analyze
    from emgeo_jax.geometry.report import write_report
    from emgeo_jax.runs import read_settings

    path = out / "report.html"
    settings = {
        "extraction": dirs["run_hash"],
        "layers": list(layers),
        "n_null": p.n_null,
        "n_boot": p.n_boot,
        "bootstrap": "mean_diff and pca from the same examples, one resample",
        "sae": None if sae is None else sae.summary.get("settings"),
    }
    if path.exists():
        if reuse_stage(out, read_settings(out / "stage.json"), settings, overwrite):
            return path
    # mean-diff and PCA directions are given as their examples, so the bootstrap rebuilds them
    # (they equal dirs["mean_diff"] and dirs["pca"]: the token-weighted difference of class
    # means, and the rows' first principal component signed towards it), all from one resample
    rows = {layer: (dirs["pooled"][:, layer], dirs["labels"], dirs["tokens"]) for layer in layers}
    examples = {f"mean_diff_L{layer}": rows[layer] for layer in layers}
    pca_examples = {f"pca_L{layer}": rows[layer] for layer in layers}
    vectors = {}
    clusters = {m: [f"{m}_L{layer}" for layer in layers] for m in ("mean_diff", "pca")}
    if sae is not None:  # an `SAEStage`: its top features at its layer
        clusters["sae"] = [f"sae_{m}_L{sae.layer}" for m in sae.directions]
        vectors.update(zip(clusters["sae"], sae.directions.values(), strict=True))
    result = analyze(
        vectors,
        clusters,
        examples=examples,
        pca_examples=pca_examples,
        same_examples=[[*examples, *pca_examples]],
        weighting="token",
        stacks={"mean_diff": dirs["mean_diff"], "pca": dirs["pca"]},
        n_null=p.n_null,
        n_boot=p.n_boot,
        n_perm=p.n_null,
    )
    path = write_report(result, out, activations=(dirs["pooled"], dirs["labels"]))
    write_json_atomic(out / "stage.json", settings)
    return path


def _direction_blocks(dirs: dict[str, Any], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    from emgeo_jax.experiments.report import save_figure

    md, pc = dirs["mean_diff"], dirs["pca"]
    cos = np.sum(md * pc, -1) / np.linalg.norm(md, axis=-1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), layout="constrained")
    axes[0].plot(np.linalg.norm(md, axis=-1), marker=".")
    axes[0].set_title("|mean-diff| per layer")
    axes[0].set_ylabel("norm")
    axes[1].plot(cos, marker=".")
    axes[1].set_title("cos(mean-diff, PC1) per layer")
    axes[1].set_ylabel("cosine")
    axes[2].plot(dirs["pca_ratio"], marker=".")
    axes[2].set_title("PC1 share of variance per layer")
    axes[2].set_ylabel("share of variance")
    for ax in axes:
        ax.set_xlabel("layer (output of block l)")
    return [
        save_figure(
            fig,
            out / "directions.png",
            "Directions from the contrast pairs at every layer: the norm of the mean-diff "
            "(misaligned minus aligned answer mean), its cosine with the first principal "
            "component of the pooled answers, and that component's share of variance.",
        )
    ]


def _dose_response(
    lm: Any, dirs: dict[str, Any], p: DemoPlan, layer: int, out: Path, model: str, overwrite: bool
) -> list[str]:
    """The judge-free dose-response of the mean-diff at the middle sweep layer on the held-out
    contrast pairs (those `contrast_directions` left out), into `out/dose_response`; returns
    its report blocks."""
    from emgeo_jax.data import load_contrast_pairs, shipped_contrast_path
    from emgeo_jax.experiments.dose_response import dose_response_blocks, run_dose_response
    from emgeo_jax.experiments.pipeline import split_pairs

    examples, _ = load_contrast_pairs(shipped_contrast_path())
    _, held = split_pairs(examples, p.max_pairs, p.hold_out_every)
    results = run_dose_response(
        lm,
        dirs["mean_diff"],
        held,
        layers=[layer],
        scales=p.dose_scales,
        n_random=p.dose_random,
        out_dir=out / "dose_response",
        model=model,
        overwrite=overwrite,
    )
    return dose_response_blocks(results, out / "dose_response") if is_primary() else []


SKIPPED_SWEEP_NOTE = (
    "Skipped offline: the steering sweep needs a judge, and the only one here is the same "
    "135M model behind our local server, which puts under 25% of its probability on a number "
    "for almost every answer, so every EM rate would read n/a (and judging took 4 of the 6 "
    "minutes the full demo used to take). Set OPENAI_API_KEY (gpt-4o-mini) or give "
    "--judge_base_url for a real judge, or pass --judged_sweep to run it with the local one as "
    "a test of the plumbing. The judge-free dose-response above measures steering offline."
)


def _sweep(
    lm: Any,
    dirs: dict[str, Any],
    questions: list[dict[str, Any]],
    p: DemoPlan,
    out: Path,
    model: str,
    overwrite: bool,
    judge_model: str,
    judge_options: dict[str, Any],
    local: bool,
    times: dict[str, float],
) -> list[str]:
    """The judged steering sweep into `out/sweep`; returns its report blocks."""
    from emgeo_jax.experiments.folder import Sampling
    from emgeo_jax.experiments.judging import judge_context, planned_judge
    from emgeo_jax.experiments.report import paragraph
    from emgeo_jax.experiments.sweep import run_sweep, sweep_blocks
    from emgeo_jax.runs import read_jsonl

    md = dirs["mean_diff"]
    pca_scaled = dirs["pca"] * np.linalg.norm(md, axis=-1, keepdims=True)
    sampling = Sampling(
        samples=p.samples,
        max_new_tokens=p.max_new_tokens,
        temperature=1.0,
        batch_size=len(questions) * p.samples,
        seed=0,
    )
    vectors = {k: v for k, v in (("mean_diff", md), ("pca", pca_scaled)) if k in p.methods}
    judge_options = {"concurrency": 16, **judge_options}
    judging = judge_context(lm, planned_judge(f"local:{model}", judge_model, **judge_options))
    with _stage(times, "sweep"), judging as judge:
        results = run_sweep(
            lm,
            vectors,
            questions,
            layers=p.sweep_layers,
            scales=p.scales,
            sampling=sampling,
            judge=judge,
            out_dir=out / "sweep",
            model=model,
            overwrite=overwrite,
        )
        name = judge.identity
    if not is_primary():  # the report is process 0's
        return []
    logged = read_jsonl(out / "sweep" / "runs.jsonl")
    times["sweep: of which judging"] = logged[-1]["judge_seconds"]
    note = LOCAL_JUDGE_NOTE if local else f"Judge: {name}."
    return [
        paragraph(note, note=True),
        paragraph(
            f"{len(questions)} questions x {p.samples} samples per cell, up to "
            f"{p.max_new_tokens} new tokens, temperature 1. Each cell adds scale x "
            "direction after one block; scale 0 is the unsteered model."
        ),
        *sweep_blocks(results, out / "sweep"),
    ]


def run_demo(
    out_dir: str | Path,
    quick: bool,
    model: str = "default",
    overwrite: bool = False,
    judge_model: str = "gpt-4o-mini",
    *,
    mesh: Any = None,
    dtype: str | None = None,
    judge_options: dict[str, Any] | None = None,
    judged_sweep: bool | None = None,
) -> Path:
    """Run every stage into `out_dir`; returns the path of `report.html`. The model loads
    with `dtype` onto `mesh` (default: one device), as `emgeo_jax.load` takes them.

    judge_options: more `planned_judge` arguments (base_url, concurrency, timeout,
    number_logprobs, max_attempts). judged_sweep: None runs the sweep when a real judge is
    available (OPENAI_API_KEY or a base_url) or in quick mode, and skips it offline with a
    note saying why (module docstring); True / False force it."""
    import emgeo_jax
    from emgeo_jax.data import shipped_contrast_path
    from emgeo_jax.experiments.judging import uses_local_judge
    from emgeo_jax.experiments.pipeline import contrast_directions
    from emgeo_jax.experiments.questions import (
        read_prompts,
        select_questions,
        shipped_questions_path,
    )
    from emgeo_jax.experiments.report import embed_png, paragraph, table, write_page
    from emgeo_jax.experiments.sae_stage import report_blocks, sae_directions

    out = Path(out_dir)
    if is_primary():
        out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    logging.info("[1/6] loading %s", model)
    with _stage(times, "load"):
        lm = emgeo_jax.load(model, dtype=dtype, mesh=mesh)
    p = plan(quick, lm.config.num_layers)

    logging.info("[2/6] extracting activations of the shipped contrast pairs (all layers)")
    with _stage(times, "extract + directions"):
        dirs = contrast_directions(
            lm,
            shipped_contrast_path(),
            out / "extract",
            max_pairs=p.max_pairs,
            hold_out_every=p.hold_out_every,
            overwrite=overwrite,
        )
    sae_layer = p.geometry_layers[len(p.geometry_layers) // 2]
    logging.info("[2/6] training a small TopK SAE on answer tokens at layer %d", sae_layer)
    with _stage(times, "sae"):
        sae = sae_directions(lm, out / "extract", sae_layer, out / "sae", quick)

    logging.info(
        "[3/6] geometry of mean-diff and PCA directions at layers %s", list(p.geometry_layers)
    )
    if is_primary():  # numpy on the host: process 0's (the others go on to stage 4)
        with _stage(times, "geometry"):
            geo_html = _geometry(dirs, p.geometry_layers, p, out / "geometry", sae, overwrite)

    layer = p.sweep_layers[len(p.sweep_layers) // 2]
    logging.info(
        "[4/6] dose-response of the mean-diff at layer %d on the held-out pairs, scales %s",
        layer,
        list(p.dose_scales),
    )
    with _stage(times, "dose-response"):
        dose_html = _dose_response(lm, dirs, p, layer, out, model, overwrite)

    judge_options = dict(judge_options or {})
    local = uses_local_judge(judge_options.get("base_url"))
    run_sweep_stage = (quick or not local) if judged_sweep is None else judged_sweep
    questions = select_questions(read_prompts(shipped_questions_path()), p.n_questions)
    questions = [{**q, "samples": None} for q in questions]
    if run_sweep_stage:
        logging.info(
            "[5/6] steering sweep: layers %s, scales %s", list(p.sweep_layers), list(p.scales)
        )
        sweep_html = _sweep(
            lm, dirs, questions, p, out, model, overwrite, judge_model, judge_options, local, times
        )
    else:
        logging.info("[5/6] steering sweep skipped: no judge but the local 135M model")
        sweep_html = [paragraph(SKIPPED_SWEEP_NOTE, note=True)]

    if not is_primary():  # the report is process 0's
        return out / "report.html"
    logging.info("[6/6] writing the report")
    report_start = time.perf_counter()
    blocks = [
        paragraph(
            f"Model: {model} ({lm.config.num_layers} layers, d = {lm.config.hidden_size}). "
            f"Contrast data: {dirs['n_pairs']} shipped pairs (a question with an aligned and a "
            f"misaligned answer each; every {p.hold_out_every}th pair held out for the "
            "dose-response); activations are the answer tokens' mean residual stream "
            "after every block. Mode: " + ("quick (CI)" if quick else "full") + "."
        ),
        "<h2>Directions</h2>",
        *_direction_blocks(dirs, out),
        "<h2>Geometry</h2>",
        paragraph(
            "Cosines, clustering and independence tests of mean-diff vs PCA directions at "
            f"layers {list(p.geometry_layers)} and the SAE features at layer {sae.layer}, "
            "each beside a random-direction null and a 95% bootstrap interval over the "
            f"contrast pairs ({p.n_boot} resamples; the mean-diff and PCA directions are "
            "rebuilt from each resample, the SAE directions held fixed): see the full "
            "geometry report."
        ),
        f'<p><a href="{geo_html.relative_to(out)}">geometry/report.html</a></p>',
        embed_png(
            out / "geometry" / "disentanglement.png",
            "Per-layer 2-D PCA of the pooled answer activations, aligned vs misaligned answers: "
            "where the classes separate, a single direction can carry the difference.",
        ),
        *report_blocks(sae),
        "<h2>Steering effect without a judge: dose-response</h2>",
        *dose_html,
        "<h2>Steering sweep (judged)</h2>",
        *sweep_html,
    ]
    from emgeo_jax.experiments.folder import write_json_atomic

    times["report"] = time.perf_counter() - report_start
    write_json_atomic(out / "timings.json", times)
    blocks.append("<h2>Time</h2>" + table(["stage", "seconds"], [[k, v] for k, v in times.items()]))
    path = write_page(out / "report.html", "emgeo demo", blocks)
    logging.info("done in %.0f s: %s", time.perf_counter() - t0, path)
    return path
