"""Judge-free dose-response: how steering with a direction moves the model's preference
between the misaligned and the aligned answer of held-out contrast pairs.

For a contrast pair (question, aligned answer, misaligned answer) the *margin* is

    margin = mean_t log p(misaligned answer token t) - mean_t log p(aligned answer token t)

each mean taken over that answer's tokens only (per token, so long and short answers weigh
alike), every log-prob conditioned on the question and the answer's earlier tokens under the
chat template exactly as extraction tokenizes it (`emgeo_jax.data.tokenize_examples`: the
answer tokens include the template's end-of-turn tokens, as the pooled activations do).
A positive margin means the model finds the misaligned answer more likely per token.

A *cell* adds `scale * v` to the residual stream after block `layer` (`Steering.addition`:
layer l = output of block l = HF `hidden_states[l+1]`, every token, prompt and answer) and
scores every pair; scale 0 is the unsteered baseline, one cell shared by every layer. Each
(layer, scale) cell is repeated with `n_random` random directions of the vector's norm at that
layer (`vectors.directions.random_controls`; the same random directions at every scale): the
null. Reported per cell: the mean margin over pairs with a bootstrap 95% interval, its shift
from the baseline (paired: the mean of per-pair differences, with a bootstrap interval), and
the null's 95% band of that shift (quantiles of the random directions' mean shifts; with 8
directions it spans about their range). A direction has a causal effect beyond chance at a
scale when its shift lies outside the null band.

Steering is data: every cell runs the same jitted scoring function (`token_logprobs`), so
vectors, scales and layers never recompile it; only new batch shapes do (pairs are batched
in a few fixed lengths). The cells steering after block `l` share blocks `0 .. l-1`: per
batch, the residual entering block `l` is computed once (`resid_entering`) and each of those
cells runs the blocks from `l` on (`score_cells`; half a pass at the middle layer).
Resumable per cell: each finished cell is one atomic JSON file `cells/NAME.json` (its
per-pair margins); a re-run reuses them and scores only the missing ones (an interruption
loses the unfinished cells of one layer at most). The folder's `config.json` guards the
settings (`ExperimentFolder`).

    results = run_dose_response(lm, vector, examples, layers=[15], scales=[-8, -4, 4, 8],
                                out_dir="runs/dose")
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from emgeo_jax.data import Example, TokenizedExample, tokenize_examples
from emgeo_jax.data.batching import collate, fit_buckets, plan_batches
from emgeo_jax.data.records import ALIGNED, MISALIGNED
from emgeo_jax.experiments.folder import ExperimentFolder, write_json_atomic
from emgeo_jax.hosts import broadcast_json, is_primary
from emgeo_jax.judge.metrics import mean_interval
from emgeo_jax.models import lm as lm_module
from emgeo_jax.models.steering import Steering
from emgeo_jax.models.taps import Taps
from emgeo_jax.vectors.directions import random_controls
from emgeo_jax.vectors.io import LayerVectors

BASELINE = "baseline"
VECTOR = "vector"
RANDOM = "random"
CONFIDENCE = 0.95
N_BOOT = 2000


# --- scoring --------------------------------------------------------------------------------


def _logits(
    graphdef: Any,
    params: Any,
    input_ids: jax.Array,
    positions: jax.Array,
    attention_mask: jax.Array,
    steering: Steering,
    resid_in: jax.Array | None,
    start_layer: int,
) -> jax.Array:
    """The one model call: logits `[B, T, V]` of the steered forward pass (no taps), from
    the token embeddings or, with `resid_in`, from the residual entering `start_layer`."""
    if resid_in is None:
        if start_layer:
            raise ValueError(f"start_layer={start_layer} needs resid_in, the residual entering it")
        return lm_module.forward(
            graphdef, params, input_ids, positions, attention_mask, steering=steering
        ).logits
    return lm_module.resume_from(
        graphdef, params, resid_in, start_layer, positions, attention_mask, steering=steering
    ).logits


@functools.partial(jax.jit, static_argnames=("graphdef", "layer"))
def resid_entering(
    graphdef: Any,
    params: Any,
    input_ids: jax.Array,
    positions: jax.Array,
    attention_mask: jax.Array,
    layer: int,
) -> jax.Array:
    """`[B, T, D]`: the unsteered residual entering block `layer` >= 1 (= `resid_post[layer -
    1]`), computed once per batch so that the cells steering after block `layer` resume from
    it (`token_logprobs(..., resid_in=, start_layer=layer)`) instead of re-running blocks
    `0 .. layer - 1`, which steering there cannot change."""
    out = lm_module.forward(
        graphdef,
        params,
        input_ids,
        positions,
        attention_mask,
        taps=Taps(resid="full"),
        num_layers=layer,
        return_logits=False,
    )
    return out.resid_post[-1]


@functools.partial(jax.jit, static_argnames=("graphdef", "start_layer"))
def token_logprobs(
    graphdef: Any,
    params: Any,
    input_ids: jax.Array,
    positions: jax.Array,
    attention_mask: jax.Array,
    steering: Steering,
    resid_in: jax.Array | None = None,
    start_layer: int = 0,
) -> jax.Array:
    """`[B, T]` float32: entry `t` = log p(input_ids[t] | input_ids[:t]) under `steering`
    (column 0, which has no context, is 0). The log-softmax and the gather happen here, so
    only `[B, T]` leaves the device, never the `[B, T, V]` logits. `input_ids, positions,
    attention_mask: [B, T]` (left padding: positions count real tokens). With `resid_in [B,
    T, D]` (`resid_entering(..., start_layer)`) only blocks `start_layer ..` run; steering
    rows stay absolute, so its edits at those blocks apply as in a full pass."""
    logits = _logits(
        graphdef, params, input_ids, positions, attention_mask, steering, resid_in, start_layer
    )
    logits = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, input_ids[:, 1:, None], axis=-1)[..., 0]
    lp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.pad(lp, ((0, 0), (1, 0)))


def _host(x: jax.Array) -> np.ndarray:
    """A device array on the host, rows of every process (a mesh may span several)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


ROW_INPUTS = ("input_ids", "positions", "attention_mask")


def answer_logprob_means(
    lm: Any,
    batch: Mapping[str, np.ndarray],
    steering: Steering,
    resume: tuple[int, jax.Array] | None = None,
) -> np.ndarray:
    """`[B]` mean log-prob per answer token of each row of a `collate` batch (`input_ids,
    attention_mask, positions, answer_mask [B, T]`) under `steering`; NaN for a row without
    answer tokens (an empty padding row). Rows are split over the model's mesh
    (`lm.place_rows`). `resume = (layer, resid)`: start at block `layer` from `resid`, the
    `resid_entering` output of this batch's placed rows."""
    placed, b = lm.place_rows({k: np.asarray(batch[k]) for k in ROW_INPUTS})
    steering = steering if steering is not None else Steering.none(lm.config)
    layer, resid = (0, None) if resume is None else resume
    lp = _host(
        token_logprobs(
            lm.graphdef,
            lm.params,
            *(placed[k] for k in ROW_INPUTS),
            steering,
            resid,
            layer,
        )
    )[:b].astype(np.float64)
    mask = np.asarray(batch["answer_mask"], bool)
    n = mask.sum(axis=1)
    total = np.where(mask, lp, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def answer_margins(
    lm: Any,
    batch: Mapping[str, np.ndarray],
    steering: Steering,
    resume: tuple[int, jax.Array] | None = None,
) -> np.ndarray:
    """`[N]` margins `mean log p(misaligned answer) - mean log p(aligned answer)` (per answer
    token) of the `N = B // 2` pairs of a `collate` batch whose rows come in pairs: row `2i`
    the aligned answer (label 0), row `2i + 1` the misaligned one (label 1) to the same
    question (`pair_batches` builds such batches). NaN for an empty pair (padding rows, label
    -1). Steering and `resume`: see `answer_logprob_means`."""
    labels = np.asarray(batch["label"])
    if len(labels) % 2:
        raise ValueError(f"answer_margins: {len(labels)} rows do not form pairs")
    lab = labels.reshape(-1, 2)
    real = lab[:, 0] >= 0
    if not (np.all(lab[real] == [ALIGNED, MISALIGNED]) and np.all(lab[~real] == -1)):
        raise ValueError(
            "answer_margins: rows must come as (aligned, misaligned) pairs, labels "
            f"{labels.tolist()}"
        )
    means = answer_logprob_means(lm, batch, steering, resume).reshape(-1, 2)
    return np.where(real, means[:, 1] - means[:, 0], np.nan)


# --- pairs ----------------------------------------------------------------------------------


def tokenize_pairs(
    examples: Sequence[Example], tokenizer: Any, max_length: int = 512
) -> list[tuple[TokenizedExample, TokenizedExample]]:
    """Contrast examples as `load_contrast_pairs` gives them (`pair/aligned, pair/misaligned,
    ...`) -> `(aligned, misaligned)` tokenized pairs, templated as extraction does
    (`tokenize_examples`); a pair longer than `max_length` tokens is refused naming it."""
    if len(examples) % 2:
        raise ValueError(f"{len(examples)} examples do not form (aligned, misaligned) pairs")
    for a, m in zip(examples[::2], examples[1::2], strict=True):
        if (a.label, m.label) != (ALIGNED, MISALIGNED) or a.messages != m.messages:
            raise ValueError(
                f"{a.source}: examples {a.id!r}, {m.id!r} are not an aligned and a misaligned "
                "answer to one question (give contrast pairs: question, aligned, misaligned)"
            )
    tokenized, _ = tokenize_examples(examples, tokenizer, max_length, on_error="raise")
    return list(zip(tokenized[::2], tokenized[1::2], strict=True))


def _content(pair: Sequence[Example]) -> str:
    """A contrast pair's prompt turns and both answers, as one comparable string."""
    return json.dumps([pair[0].messages, pair[0].answer, pair[1].answer], sort_keys=True)


def select_pairs(
    examples: Sequence[Example],
    data: str | Path,
    held_out: str | None = None,
    max_pairs: int | None = None,
) -> list[Example]:
    """The contrast examples of file `data` (`load_contrast_pairs` order: aligned, misaligned,
    ...) left after skipping `held_out` and keeping the first `max_pairs`: `held_out` is
    either a number N (skip the first N pairs, those a vector built from the first N used)
    or the path of a contrast file (skip the pairs also in it: same prompt turns and both
    answers). Errors name `--held_out` / `--max_pairs` (the flags of `emgeo dose-response`)."""
    from emgeo_jax.data import load_contrast_pairs

    pairs = [list(examples[i : i + 2]) for i in range(0, len(examples), 2)]
    if held_out:
        if str(held_out).isdigit():
            n = int(held_out)
            if n >= len(pairs):
                raise ValueError(
                    f"--held_out {n}: {data} has only {len(pairs)} pairs; none would be left"
                )
            pairs = pairs[n:]
        else:
            used, _ = load_contrast_pairs(held_out)
            seen = {_content(used[i : i + 2]) for i in range(0, len(used), 2)}
            pairs = [p for p in pairs if _content(p) not in seen]
            if not pairs:
                raise ValueError(f"--held_out {held_out}: every pair of {data} is in it")
    if max_pairs is not None:
        if max_pairs < 1:
            raise ValueError(f"--max_pairs {max_pairs}: must be >= 1")
        pairs = pairs[:max_pairs]
    return [ex for p in pairs for ex in p]


def pair_batches(
    pairs: Sequence[tuple[TokenizedExample, TokenizedExample]],
    batch_size: int,
    pad_id: int,
    max_buckets: int = 4,
) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    """`[(pair positions, batch)]`: left-padded `collate` batches of `batch_size` rows (even)
    holding `batch_size // 2` whole pairs, aligned then misaligned; the last batch of a length
    is filled with empty rows. Lengths come from at most `max_buckets` fitted buckets
    (`fit_buckets`), so scoring compiles at most that many shapes."""
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"batch_size {batch_size}: give an even number of rows (>= 2)")
    if not pairs:
        raise ValueError("no contrast pairs to score")
    per = batch_size // 2
    lengths = [max(a.length, m.length) for a, m in pairs]
    buckets = fit_buckets(lengths, per, max_buckets=max_buckets)
    out = []
    for t, positions in plan_batches(lengths, per, buckets):
        rows = [ex for p in positions for ex in pairs[p]]
        out.append((positions, collate(rows, t, batch_size, pad_id)))
    return out


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (never attended to)."""
    for name in ("pad_token_id", "eos_token_id"):
        i = getattr(tokenizer, name, None)
        if i is not None:
            return int(i)
    return 0


def score_pairs(
    lm: Any,
    batches: Sequence[tuple[list[int], dict[str, np.ndarray]]],
    n_pairs: int,
    steering: Steering | None,
) -> np.ndarray:
    """`[n_pairs]` margins of every pair under `steering` (None: unsteered), in pair order."""
    return score_cells(lm, batches, n_pairs, [steering])[0]


def score_cells(
    lm: Any,
    batches: Sequence[tuple[list[int], dict[str, np.ndarray]]],
    n_pairs: int,
    steerings: Sequence[Steering | None],
    layer: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """`[C, n_pairs]` margins of every pair under each of `C` steerings (None: unsteered)
    that edit no block before `layer`: per batch, the residual entering block `layer` is
    computed once (`resid_entering`) and every cell resumes from it, so a cell costs the
    blocks from `layer` on (half a pass at the middle layer). `progress`: a bar counting
    scored pairs x cells (process 0)."""
    from tqdm.auto import tqdm

    steerings = [Steering.none(lm.config) if s is None else s for s in steerings]
    out = np.full((len(steerings), n_pairs), np.nan)
    bar = tqdm(
        total=len(steerings) * n_pairs,
        unit="pair",
        desc=f"{len(steerings)} cell(s) at layer {layer}" if layer else "score",
        disable=not (progress and is_primary()),
    )
    with bar:
        for positions, batch in batches:
            resume = None
            if layer > 0:
                placed, _ = lm.place_rows({k: np.asarray(batch[k]) for k in ROW_INPUTS})
                rows = (placed[k] for k in ROW_INPUTS)
                resume = (layer, resid_entering(lm.graphdef, lm.params, *rows, layer))
            for i, steering in enumerate(steerings):
                out[i, positions] = answer_margins(lm, batch, steering, resume)[: len(positions)]
                bar.update(len(positions))
    return out


# --- the experiment -------------------------------------------------------------------------


def cell_name(direction: str, layer: int, scale: float) -> str:
    """File-safe cell name, e.g. `vector__L15__s-8` or `random3__L15__s-8`."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', direction)}__L{layer}__s{scale:g}"


def _interval(values: np.ndarray, seed: int) -> list[float] | None:
    ci = mean_interval(values, CONFIDENCE, N_BOOT, seed)
    return None if ci is None else [ci[0], ci[1]]


def summarize(
    base: np.ndarray,
    cells: Mapping[tuple[int, float], np.ndarray],
    null: Mapping[tuple[int, float], Sequence[np.ndarray]],
    seed: int = 0,
) -> dict[str, Any]:
    """The numbers of a dose-response from per-pair margins: `base [N]` (scale 0), the
    vector's `cells[(layer, scale)] [N]`, the random directions' `null[(layer, scale)]`
    (`[N]` each). Per cell: mean margin and its bootstrap interval over pairs, the paired
    shift from the baseline and its interval, the null's shifts and their central 95% band,
    whether the shift lies beyond it; per layer: whether the mean margin rises strictly with
    the scale (scale 0 included)."""
    alpha = (1 - CONFIDENCE) / 2
    out_cells = []
    base_mean = float(np.mean(base))
    for (layer, scale), m in sorted(cells.items()):
        shifts = [float(np.mean(r - base)) for r in null.get((layer, scale), ())]
        band = None
        if shifts:
            lo, hi = np.quantile(shifts, [alpha, 1 - alpha])
            band = [float(lo), float(hi)]
        shift = float(np.mean(m - base))
        out_cells.append(
            {
                "layer": int(layer),
                "scale": float(scale),
                "margin_mean": float(np.mean(m)),
                "margin_ci": _interval(m, seed),
                "shift": shift,
                "shift_ci": _interval(m - base, seed),
                "null_shifts": shifts,
                "null_band": band,
                "beyond_null": None if band is None else bool(shift < band[0] or shift > band[1]),
            }
        )
    monotone = {}
    for layer in sorted({c["layer"] for c in out_cells}):
        pts = sorted(
            [(c["scale"], c["margin_mean"]) for c in out_cells if c["layer"] == layer]
            + [(0.0, base_mean)]
        )
        monotone[str(layer)] = bool(np.all(np.diff([y for _, y in pts]) > 0))
    return {
        "n_pairs": int(len(base)),
        "baseline": {"margin_mean": base_mean, "margin_ci": _interval(base, seed)},
        "cells": out_cells,
        "monotone": monotone,
    }


def dose_response_config(
    model: str,
    vector: LayerVectors,
    pairs: Sequence[tuple[TokenizedExample, TokenizedExample]],
    pair_ids: Sequence[str],
    layers: Sequence[int],
    scales: Sequence[float],
    n_random: int,
    seed: int,
    batch_size: int,
    dtype: str,
) -> dict[str, Any]:
    """The JSON configuration a dose-response folder's hash guards: the model, the vector's
    digest, the pairs (ids and a digest of their token ids), the grid, the null and seed."""
    import hashlib

    from emgeo_jax.experiments.sweep import vector_digest

    h = hashlib.sha256()
    for a, m in pairs:
        for ex in (a, m):
            h.update(np.asarray(ex.input_ids, np.int32).tobytes() + b"|%d;" % ex.prompt_length)
    return {
        "kind": "dose_response",
        "model": model,
        "dtype": dtype,
        "vector": {"shape": list(vector.values.shape), "sha256": vector_digest(vector)},
        "pairs": list(pair_ids),
        "pairs_sha256": h.hexdigest()[:16],
        "layers": [int(x) for x in layers],
        "scales": [float(s) for s in scales],
        "n_random": int(n_random),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "margin": "mean log p(misaligned answer token) - mean log p(aligned answer token)",
    }


def run_dose_response(
    lm: Any,
    vector: Any,
    examples: Sequence[Example],
    *,
    layers: Sequence[int],
    scales: Sequence[float],
    out_dir: str | Path,
    n_random: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int = 512,
    model: str = "",
    overwrite: bool = False,
    on_cell: Callable[[str, bool], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a dose-response in `out_dir`; write `results.json` (and return it),
    `table.csv`, `dose_response.png` and `report.html` there.

    Args:
      lm: the model (an `LM`; on a mesh, batch rows are split over it).
      vector: `[D]` (used at every layer), a per-layer stack `[L, D]` (row l = layer l) or a
        `LayerVectors` (a file's rows for the layers it names); used as is (no normalisation).
      examples: contrast pairs as `load_contrast_pairs` gives them (aligned, misaligned,
        aligned, ...), already restricted to the held-out pairs.
      layers: blocks to steer after (one curve each; layer l = HF `hidden_states[l+1]`).
      scales: steering scales; 0 (the unsteered baseline) is always run, once.
      n_random: random directions of the vector's norm per layer (the null); 0 for none.
      seed: the random directions' and the bootstrap's seed.
      batch_size: rows per forward pass (even: pairs stay together).
      on_cell: `on_cell(name, computed)` after each cell (`computed` False when reused).

    Results: `n_pairs`, `baseline`, `cells` (see `summarize`), `monotone`, `norms` (the
    vector's norm per layer), `config_hash`."""
    c = lm.config
    vec = LayerVectors.of(vector, "vector").for_model(c.num_layers)
    if vec.width != c.hidden_size:
        raise ValueError(
            f"{vec.source}: width {vec.width} != the model's hidden size {c.hidden_size}"
        )
    layers = [int(x) for x in layers]
    if not layers:
        raise ValueError("dose-response: no layers")
    for layer in layers:
        if not 0 <= layer < c.num_layers:
            raise ValueError(
                f"layer {layer} out of range; the model has {c.num_layers} layers "
                f"(0..{c.num_layers - 1}, layer l = output of block l)"
            )
        vec.at(layer)  # refuse a layer the file does not hold, naming it
    steer_scales = sorted({float(s) for s in scales if s != 0})
    if not steer_scales:
        raise ValueError("dose-response: give at least one nonzero scale")
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {n_random}")
    pairs = tokenize_pairs(examples, lm.tokenizer, max_length)
    pair_ids = [a.id.rsplit("/", 1)[0] for a in examples[::2]]
    batches = pair_batches(pairs, batch_size, pad_id_of(lm.tokenizer))
    config = dose_response_config(
        model or lm.source,
        vec,
        pairs,
        pair_ids,
        layers,
        steer_scales,
        n_random,
        seed,
        batch_size,
        str(lm.dtype),
    )
    folder = ExperimentFolder(out_dir, config, overwrite=overwrite)
    cells_dir = folder.path / "cells"
    rows = np.stack([vec.at(layer) for layer in layers])  # [len(layers), D]
    controls = random_controls(rows, n_random, seed) if n_random else None

    Cell = tuple[str, Steering | None, dict[str, Any]]  # name, steering, what it records

    def run_cells(specs: Sequence[Cell], layer: int) -> list[np.ndarray]:
        """Per-pair margins of each cell: read from `cells/NAME.json` when finished, else the
        missing ones scored together (`score_cells`: they share the blocks before `layer`)
        and each written as one file."""
        found = broadcast_json(
            {
                name: json.loads((cells_dir / f"{name}.json").read_text())["margins"]
                for name, _, _ in specs
                if (cells_dir / f"{name}.json").exists()
            }
            if is_primary()
            else None
        )
        todo = [spec for spec in specs if spec[0] not in found]
        if todo:
            steerings = [st for _, st, _ in todo]
            scored = score_cells(lm, batches, len(pairs), steerings, layer, progress=True)
            for (name, _, meta), margins in zip(todo, scored, strict=True):
                record = {"name": name, **meta, "margins": margins.tolist()}
                write_json_atomic(cells_dir / f"{name}.json", record)
                found[name] = margins
        if on_cell is not None:
            computed = {name for name, _, _ in todo}
            for name, _, _ in specs:
                on_cell(name, name in computed)
        return [np.asarray(found[name], np.float64) for name, _, _ in specs]

    total = 1 + len(layers) * len(steer_scales) * (1 + n_random)
    logging.info("dose-response: %d pairs, %d cells", len(pairs), total)
    (base,) = run_cells([(BASELINE, None, {"direction": BASELINE, "layer": None, "scale": 0.0})], 0)
    steered: dict[tuple[int, float], np.ndarray] = {}
    null: dict[tuple[int, float], list[np.ndarray]] = {}
    for j, layer in enumerate(layers):
        specs: list[Cell] = []
        for s in steer_scales:  # the vector, then its random directions, at each scale
            meta = {"direction": VECTOR, "layer": layer, "scale": s}
            specs.append(
                (cell_name(VECTOR, layer, s), Steering.addition(c, rows[j], [layer], s), meta)
            )
            for k in range(n_random):
                meta = {"direction": RANDOM, "index": k, "layer": layer, "scale": s}
                steering = Steering.addition(c, controls[k, j], [layer], s)
                specs.append((cell_name(f"{RANDOM}{k}", layer, s), steering, meta))
        margins = iter(run_cells(specs, layer))
        for s in steer_scales:
            steered[(layer, s)] = next(margins)
            null[(layer, s)] = [next(margins) for _ in range(n_random)]
            shift = np.mean(steered[(layer, s)] - base)
            logging.info("layer %d scale %g: margin shift %+.4f", layer, s, shift)
    results = {
        "config_hash": folder.hash,
        "pairs": pair_ids,
        "norms": {str(layer): float(np.linalg.norm(rows[j])) for j, layer in enumerate(layers)},
        **summarize(base, steered, null, seed),
    }
    write_json_atomic(folder.path / "results.json", results)
    if is_primary():
        write_table(results, folder.path / "table.csv")
        write_dose_response_report(results, folder.path)
    return results


# --- table, figure, report ------------------------------------------------------------------

TABLE_HEADER = [
    "layer",
    "scale",
    "mean margin",
    "margin 95% CI",
    "shift vs scale 0",
    "shift 95% CI",
    "null 95% band of shift",
    "beyond null",
]


def table_rows(results: Mapping[str, Any]) -> list[list[Any]]:
    """Baseline first (layer '-'), then every (layer, scale) cell."""
    b = results["baseline"]
    rows: list[list[Any]] = [["-", 0.0, b["margin_mean"], b["margin_ci"], 0.0, None, None, None]]
    for cell in results["cells"]:
        rows.append(
            [
                cell["layer"],
                cell["scale"],
                cell["margin_mean"],
                cell["margin_ci"],
                cell["shift"],
                cell["shift_ci"],
                cell["null_band"],
                cell["beyond_null"],
            ]
        )
    return rows


def write_table(results: Mapping[str, Any], path: str | Path) -> Path:
    """`table_rows` as CSV (intervals as `lo;hi`, empty when there is none)."""

    def text(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, (list, tuple)):
            return ";".join(f"{x:.6g}" for x in v)
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(TABLE_HEADER)
        w.writerows([[text(v) for v in row] for row in table_rows(results)])
    return path


def dose_response_figure(results: Mapping[str, Any]) -> Any:
    """Mean margin against the steering scale, one line per layer with its bootstrap 95% band,
    and per layer the random-direction null's 95% band (hatched, around the baseline); the
    baseline is every line's scale-0 point."""
    from emgeo_jax.experiments.figures import plt

    base = results["baseline"]
    cells = results["cells"]
    layers = sorted({c["layer"] for c in cells})
    scales = sorted({0.0, *(c["scale"] for c in cells)})
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    b_lo, b_hi = base["margin_ci"] or (math.nan, math.nan)
    for layer in layers:
        pts = sorted([c for c in cells if c["layer"] == layer], key=lambda c: c["scale"])
        x = [0.0] + [c["scale"] for c in pts]
        y = [base["margin_mean"]] + [c["margin_mean"] for c in pts]
        lo = [b_lo] + [(c["margin_ci"] or (math.nan, math.nan))[0] for c in pts]
        hi = [b_hi] + [(c["margin_ci"] or (math.nan, math.nan))[1] for c in pts]
        order = np.argsort(x)
        x, y, lo, hi = (np.asarray(v, float)[order] for v in (x, y, lo, hi))
        (line,) = ax.plot(x, y, marker="o", label=f"layer {layer}")
        color = line.get_color()
        ax.fill_between(x, lo, hi, color=color, alpha=0.18)
        if all(c["null_band"] is not None for c in pts):
            n_lo = [0.0] + [c["null_band"][0] for c in pts]
            n_hi = [0.0] + [c["null_band"][1] for c in pts]
            n_lo = base["margin_mean"] + np.asarray(n_lo)[order]
            n_hi = base["margin_mean"] + np.asarray(n_hi)[order]
            ax.fill_between(
                x,
                n_lo,
                n_hi,
                facecolor="none",
                edgecolor=color,
                hatch="///",
                lw=0.8,
                ls="--",
                label=f"layer {layer}: random-direction null, 95%",
            )
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xticks(scales)
    ax.set_xlabel("steering scale (x direction, added after the block)")
    ax.set_ylabel("margin: log p(misaligned) - log p(aligned)\n(nats per answer token)")
    ax.legend(fontsize=8, title="steered after block", title_fontsize=8)
    ax.set_title(f"judge-free dose-response ({results['n_pairs']} held-out contrast pairs)")
    return fig


def dose_response_blocks(results: Mapping[str, Any], out_dir: str | Path) -> list[str]:
    """HTML blocks of a dose-response (what it measures, a line per layer on the effect, the
    figure saved as `dose_response.png` in `out_dir`, the table), for its own report and for
    a report that embeds it (the demo's)."""
    from emgeo_jax.experiments.report import paragraph, save_figure, table

    out = Path(out_dir)
    n_random = len(results["cells"][0]["null_shifts"]) if results["cells"] else 0
    intro = paragraph(
        "Margin of a contrast pair = mean log-probability per token of its misaligned answer "
        "minus that of its aligned answer (answer tokens only, chat template as extraction), "
        f"averaged over {results['n_pairs']} held-out pairs. Each cell adds scale x direction "
        "to the residual stream after one block at every token; scale 0 is the unsteered "
        "model. Intervals: 95% bootstrap over pairs (the shift's is paired). Null: the same "
        f"cells with {n_random} random directions of the direction's norm at that layer; its "
        "band is the central 95% of their mean shifts. No judge is involved."
    )
    notes = []
    for layer, rising in results["monotone"].items():
        beyond = [
            f"{c['scale']:g}"
            for c in results["cells"]
            if c["layer"] == int(layer) and c["beyond_null"]
        ]
        notes.append(
            f"Layer {layer}: the mean margin {'rises' if rising else 'does not rise'} strictly "
            f"with the scale; its shift lies beyond the null band at scale(s) "
            f"{', '.join(beyond) or 'none'}."
        )
    fig = save_figure(
        dose_response_figure(results),
        out / "dose_response.png",
        "Mean margin against the steering scale, one line per layer (bands: bootstrap 95% "
        "intervals over pairs); hatched: the random-direction null's 95% band around the "
        "unsteered margin.",
    )
    return [intro, *(paragraph(n) for n in notes), fig, table(TABLE_HEADER, table_rows(results))]


def write_dose_response_report(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """`dose_response.png` and `report.html` in `out_dir` from `results`."""
    from emgeo_jax.experiments.report import paragraph, write_page

    blocks = dose_response_blocks(results, out_dir)
    blocks.append(paragraph("Full numbers: results.json, table.csv, cells/ (per-pair margins)."))
    return write_page(Path(out_dir) / "report.html", "Judge-free dose-response", blocks)
