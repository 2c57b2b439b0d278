"""The demo's SAE stage: train a small TopK SAE on the contrast data's token activations at
one layer, select features that carry the contrast, and export their decoder rows.

The extraction stage keeps only pooled per-example activations (`pooled [N, L, D]`: 144 rows
for the shipped pairs), far too few rows for a dictionary, and pooling mixes the tokens an
SAE is meant to decompose. So this stage re-runs the model on the same tokenized examples up
to block `layer` (layer l = output of block l = HF `hidden_states[l+1]`) and keeps token
rows `[n, D]`:

- every answer token (the tokens the mean-diff pools);
- the prompt tokens of each *distinct* prompt once (a pair's two examples share their prompt,
  and causal attention makes those rows identical);
- minus the prefix every example shares (the chat template's system turn): identical rows,
  including the first token's attention-sink outlier (dropped even if nothing is shared).

Held-out: the examples of ~15% of the distinct prompts (whole pairs), never trained on. Fit
figures (FVE, L0, dead features) are on those tokens.

Selection (`emgeo_jax.vectors.sae.select`), each beside its null:
- `cosine`: decoder rows most aligned with the mean-diff at `layer`;
- `class_diff`: features whose token-weighted mean activation on misaligned answers exceeds
  that on aligned answers (labels permuted between examples, not tokens).

Outputs in `out_dir`: `tokens_L{layer}.npy` (training rows, train then held-out), `sae/`
(SAELens folder, usable with `emgeo sae-check` / `sae-features`), `sae_cosine.safetensors`
and `sae_class_diff.safetensors` (top features' unit decoder rows, vector files), and
`summary.json` (sizes, fit, rankings). A finished stage with the same settings is reused.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from emgeo_jax.hosts import broadcast_json, is_primary, to_host
from emgeo_jax.vectors.sae import save_feature_directions, save_saelens, select
from emgeo_jax.vectors.sae.metrics import activation_fit
from emgeo_jax.vectors.sae.train import ActivationSource, TrainConfig, train_sae

METHODS = ("cosine", "class_diff")
HELD_OUT = 0.15
TOP_K = 5


@dataclasses.dataclass(frozen=True)
class StageSizes:
    """SAE width `width` (features), `k` active per token, optimisation steps and batch."""

    width: int
    k: int
    steps: int
    batch_size: int
    lr: float
    n_null: int


def stage_sizes(quick: bool, d: int) -> StageSizes:
    """Quick (CI): a 1x dictionary, 100 steps; full: 2x, 300 steps (held-out FVE as with 600
    on the default model, at half the time)."""
    if quick:
        return StageSizes(width=d, k=16, steps=100, batch_size=128, lr=2e-3, n_null=100)
    return StageSizes(width=2 * d, k=32, steps=300, batch_size=256, lr=2e-3, n_null=500)


@dataclasses.dataclass
class SAEStage:
    """The stage's result: `directions` method -> unit decoder row `[D]` of its top feature
    (a method whose top feature is another method's is left out), and `summary.json`."""

    layer: int
    directions: dict[str, np.ndarray]
    summary: dict[str, Any]
    folder: Path


def _shared_prefix(tokenized) -> int:
    """Number of leading tokens every example shares, at least 1 (the attention sink)."""
    first = tokenized[0].input_ids
    n = min(ex.length for ex in tokenized)
    for ex in tokenized:
        diff = np.nonzero(ex.input_ids[:n] != first[:n])[0]
        n = int(diff[0]) if diff.size else n
    return max(n, 1)


def token_rows(tokenized, prefix: int) -> list[np.ndarray]:
    """Per example, the `[T]` bool mask of its tokens the SAE sees (see module docstring):
    answer tokens, and prompt tokens of the first example with that prompt, past `prefix`."""
    seen: set[bytes] = set()
    keep = []
    for ex in tokenized:
        prompt = ex.input_ids[: ex.prompt_length].tobytes()
        rows = ex.answer_mask | (ex.question_mask & (prompt not in seen))
        rows[:prefix] = False
        seen.add(prompt)
        keep.append(rows)
    return keep


def token_activations(
    lm, tokenized, layer: int, keep: list[np.ndarray], batch_size: int = 8
) -> list[np.ndarray]:
    """Residual after block `layer` at the kept tokens of each example: a list of `[n_i, D]`
    float32 (one forward per length-bucketed batch, stopped after block `layer`)."""
    from emgeo_jax.data.batching import make_batches
    from emgeo_jax.vectors.sae.runner import make_resid_fn

    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    resid_fn = make_resid_fn(lm)
    out: list[np.ndarray | None] = [None] * len(tokenized)
    by_index = {ex.example_index: i for i, ex in enumerate(tokenized)}
    t0, n_tok = time.perf_counter(), 0
    for batch in make_batches(tokenized, batch_size, pad):
        h = to_host(resid_fn(batch["input_ids"], batch["attention_mask"], layer))
        t = h.shape[1]
        for r, idx in enumerate(batch["example_index"]):
            if idx < 0:
                continue
            i = by_index[int(idx)]
            out[i] = h[r, t - tokenized[i].length :][keep[i]]  # left padded
            n_tok += tokenized[i].length
    rate = n_tok / max(time.perf_counter() - t0, 1e-9)
    logging.info("sae: residuals at layer %d for %d tokens (%.0f tok/s)", layer, n_tok, rate)
    return out


def _split(tokenized, seed: int = 0) -> np.ndarray:
    """`[N]` bool: held-out examples, all examples of ~HELD_OUT of the distinct prompts."""
    prompts = [ex.input_ids[: ex.prompt_length].tobytes() for ex in tokenized]
    distinct = sorted(set(prompts))
    order = np.random.default_rng(seed).permutation(len(distinct))
    n_held = max(1, round(HELD_OUT * len(distinct)))
    held = {distinct[j] for j in order[:n_held]}
    return np.array([p in held for p in prompts])


def _settings(layer: int, sizes: StageSizes, extraction: dict) -> dict:
    return {"layer": layer, "sizes": dataclasses.asdict(sizes), "extraction": extraction}


def _load(folder: Path, summary: dict) -> SAEStage:
    from safetensors.numpy import load_file

    directions = {
        m: load_file(str(folder / f"sae_{m}.safetensors"))["feature_directions"][0]
        for m in summary["exported"]
    }
    return SAEStage(summary["layer"], directions, summary, folder)


def sae_directions(
    lm, activations_dir: str | Path, layer: int, out_dir: str | Path, quick: bool
) -> SAEStage | None:
    """Run the stage (see module docstring) for the contrast examples extracted into
    `activations_dir` (an `emgeo extract` folder with all layers, as the demo writes it;
    its metadata names the data file, `max_pairs` and `hold_out_every`).

    On several processes every process runs the model over its share of the rows (and reads
    `activations_dir`, as `contrast_directions` does: shared storage); process 0 decides
    whether a finished stage is reused, trains, selects and writes, and is the one that gets
    the `SAEStage` (the others get None)."""
    from emgeo_jax.data import load_contrast_pairs, tokenize_examples
    from emgeo_jax.experiments.folder import write_json_atomic
    from emgeo_jax.experiments.pipeline import split_pairs
    from emgeo_jax.extract import read_extraction
    from emgeo_jax.runs import read_settings, settings_diff
    from emgeo_jax.vectors.directions import data_diff

    out = Path(out_dir)
    ext = read_extraction(activations_dir)
    if layer not in ext.layers:
        raise ValueError(f"{activations_dir}: layer {layer} not extracted (has {ext.layers})")
    sizes = stage_sizes(quick, lm.config.hidden_size)
    settings = _settings(layer, sizes, {"run_hash": ext.metadata.get("run_hash")})
    summary = read_settings(out / "summary.json") if is_primary() else None
    diff = None if summary is None else settings_diff(summary.get("settings") or {}, settings)
    if broadcast_json(summary is not None and not diff):  # process 0 decides for all
        return _load(out, summary) if is_primary() else None
    if diff:
        logging.info("sae: %s holds another configuration (%s); redoing the stage", out, diff)
    t0 = time.perf_counter()

    examples, _ = load_contrast_pairs(ext.metadata["data"])
    examples, _ = split_pairs(
        examples, ext.metadata.get("max_pairs"), ext.metadata.get("hold_out_every")
    )
    tokenized, _ = tokenize_examples(examples, lm.tokenizer, 256)
    if ext.label is None:
        raise ValueError(f"{activations_dir}: no per-example rows (extract with per_example)")
    if len(tokenized) != len(ext.label) or any(
        ex.label != lab for ex, lab in zip(tokenized, ext.label, strict=True)
    ):
        raise ValueError(
            f"{activations_dir}: its examples do not match {ext.metadata['data']} re-tokenized"
        )
    prefix = _shared_prefix(tokenized)
    keep = token_rows(tokenized, prefix)
    acts = token_activations(lm, tokenized, layer, keep)  # every process
    if not is_primary():  # the training and the files are process 0's
        return None
    out.mkdir(parents=True, exist_ok=True)
    held = _split(tokenized)
    train_rows = np.concatenate([a for a, h in zip(acts, held, strict=True) if not h])
    held_rows = np.concatenate([a for a, h in zip(acts, held, strict=True) if h])
    path = out / f"tokens_L{layer}.npy"
    np.save(path, np.concatenate([train_rows, held_rows]).astype(np.float32))
    n_train = len(train_rows)

    cfg = TrainConfig(
        width=sizes.width,
        k=sizes.k,
        steps=sizes.steps,
        batch_size=min(sizes.batch_size, n_train),
        lr=sizes.lr,
        warmup_steps=sizes.steps // 10,
    )
    t = time.perf_counter()
    sae = train_sae(ActivationSource(path, rows=(0, n_train)), cfg, layer=layer)
    train_s = time.perf_counter() - t
    held_out = ActivationSource(path, rows=(n_train, n_train + len(held_rows)))
    fit = activation_fit(sae, held_out.chunks())
    logging.info(
        "sae: trained %d x %d, k=%d in %.1f s on %d tokens; held-out fve %.3f, l0 %.1f, dead %d",
        sizes.width,
        lm.config.hidden_size,
        sizes.k,
        train_s,
        n_train,
        fit.fve,
        fit.l0,
        fit.dead,
    )
    save_saelens(sae, out / "sae", {"model": lm.source, "trained_on": str(path)})

    row = ext.layers.index(layer)
    mean_diff = data_diff(ext.means("token"))[row]
    answer = [a[ex.answer_mask[k]] for ex, a, k in zip(tokenized, acts, keep, strict=True)]
    answer_rows = np.concatenate(answer)
    labels = np.concatenate(
        [np.full(len(a), ex.label) for ex, a in zip(tokenized, answer, strict=True)]
    )
    groups = np.concatenate([np.full(len(a), i) for i, a in enumerate(answer)])
    rankings = {
        "cosine": select.cosine(sae, mean_diff, k=TOP_K, n_null=sizes.n_null),
        "class_diff": select.class_diff(
            sae, answer_rows, labels, k=TOP_K, n_perm=sizes.n_null, groups=groups
        ),
    }
    exported = []
    for method in METHODS:
        r = rankings[method]
        meta = {"model": lm.source, "selection": method, "layer": layer}
        save_feature_directions(out / f"sae_{method}.safetensors", sae, r.features, meta, r.scores)
        if all(rankings[m].features[0] != r.features[0] for m in exported):
            exported.append(method)
    summary = {
        "settings": settings,
        "layer": layer,
        "width": sizes.width,
        "k": sizes.k,
        "shared_prefix_tokens": prefix,
        "n_examples": len(tokenized),
        "n_tokens_train": n_train,
        "n_tokens_held_out": len(held_rows),
        "fit_held_out": fit.as_dict(),
        "rankings": {m: r.as_dict() for m, r in rankings.items()},
        "n_null": sizes.n_null,
        "exported": exported,
        "seconds": {"train": train_s, "total": time.perf_counter() - t0},
    }
    write_json_atomic(out / "summary.json", summary)
    return _load(out, summary)


def report_blocks(stage: SAEStage) -> list[str]:
    """HTML blocks for the demo report: what was trained, its held-out fit, the rankings."""
    from emgeo_jax.experiments.report import fmt, paragraph, table

    s, fit = stage.summary, stage.summary["fit_held_out"]
    n_null = s.get("n_null")  # absent from summaries written before it was recorded
    floor = ""
    if n_null is not None:
        smallest = fmt(1 / (n_null + 1))
        floor = f" ({n_null} null draws each: the smallest p-value they can give is {smallest})"
    rows = []
    for method, r in s["rankings"].items():
        for f, score, p in zip(r["features"], r["scores"], r["p_values"], strict=True):
            rows.append([method, f, float(score), float(p)])
    return [
        "<h2>SAE directions</h2>",
        paragraph(
            f"A TopK SAE ({s['width']} features, k = {s['k']}) trained here on "
            f"{s['n_tokens_train']} token activations at layer {s['layer']} (answer tokens and "
            "each distinct prompt once, without the shared system prefix). On "
            f"{fit['n_tokens']} held-out tokens (unseen pairs): fraction of variance explained "
            f"{fmt(fit['fve'])}, L0 {fmt(fit['l0'])}, dead features {fit['dead']} of "
            f"{s['width']}. Features are ranked by decoder-row "
            "cosine with the mean-diff (null: random directions) and by the misaligned minus "
            "aligned mean activation over answer tokens (null: labels permuted between "
            f"examples); p-values are family-wise over all features{floor}. The top feature of "
            "each method joins the geometry comparison as sae_cosine / sae_class_diff."
        ),
        table(["method", "feature", "score", "p"], rows),
    ]
