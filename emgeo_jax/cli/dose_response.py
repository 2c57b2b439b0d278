"""`emgeo dose-response VECTORS --layers 15 [--scales -8,-4,4,8] --out DIR [--data PAIRS]
[--held_out N|FILE] [--max_pairs N] [--n_random 8] [--key NAME]`: the judge-free effect of a
steering direction.

For each held-out contrast pair the margin is the mean log-probability per answer token of
its misaligned answer minus that of its aligned answer (chat template as extraction). Each
cell adds scale x vector after one block; scale 0 is the unsteered baseline; `--n_random`
random directions of the vector's norm at each layer give the null. Writes results.json,
table.csv, dose_response.png, report.html and cells/ (one file per finished cell) in --out;
re-running resumes, skipping finished cells.

VECTORS: safetensors / .npy / .pt holding `[D]` (used at every --layers) or a per-layer stack
(its row for layer l at layer l; `--key` picks a tensor in a file holding several). Layer l =
output of block l = HF hidden_states[l+1].

Which pairs are scored: the pairs of --data (default: the shipped contrast pairs) minus
--held_out, then the first --max_pairs of them. `--held_out N` skips the first N pairs of
--data (for a vector built from them: the demo's extraction with `max_pairs` keeps the first
pairs); `--held_out FILE` skips the pairs of --data that are also in that contrast file (same
question, system prompt and answers; e.g. the file the vector was extracted from).
Everything that needs no model (files, layers, widths, scales, pairs) is checked before the
model loads.
"""

from __future__ import annotations

from absl import flags

from emgeo_jax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "contrast pairs JSONL (default: the shipped pairs)")
flags.DEFINE_list("layers", None, "layers to steer at, one curve each (output of block l)")
flags.DEFINE_list("scales", ["-8", "-4", "4", "8"], "steering scales (0 = baseline, always run)")
flags.DEFINE_string("key", None, "tensor name inside a vector file holding several")
flags.DEFINE_integer("n_random", 8, "random directions of the vector's norm per cell (null)")
flags.DEFINE_integer("seed", 0, "seed of the random directions and the bootstrap")
flags.DEFINE_integer("batch_size", 16, "rows per forward pass (even: a pair is two rows)")
flags.DEFINE_integer("max_pairs", None, "score only the first N pairs left after --held_out")
flags.DEFINE_string(
    "held_out",
    None,
    "pairs to skip (those the vector was built from): N = the first N pairs of --data, or "
    "a contrast FILE whose pairs (same question and answers) are skipped",
)
flags.DEFINE_integer("max_length", 512, "longest pair in tokens (a longer one is refused)")
flags.DEFINE_string("out", None, "output folder (re-running resumes)")
flags.DEFINE_bool("overwrite", False, "discard an existing run with another configuration")


def main(argv: list[str]) -> None:
    from emgeo_jax.cli.parsing import number_list
    from emgeo_jax.data import load_contrast_pairs, shipped_contrast_path
    from emgeo_jax.experiments.dose_response import run_dose_response, select_pairs
    from emgeo_jax.vectors.io import load_layer_vectors

    if len(argv) != 2:
        raise SystemExit("emgeo dose-response: give exactly one vector file")
    if not FLAGS.out:
        raise SystemExit("emgeo dose-response: --out DIR is required")
    if not FLAGS.layers:
        raise SystemExit("emgeo dose-response: give --layers")
    layers = number_list(FLAGS.layers, "layers")
    scales = number_list(FLAGS.scales, "scales", float)
    if not any(s != 0 for s in scales):
        raise ValueError("--scales: give at least one nonzero scale (0, the baseline, always runs)")
    if FLAGS.n_random < 0:
        raise ValueError(f"--n_random {FLAGS.n_random}: must be >= 0")
    if FLAGS.batch_size < 2 or FLAGS.batch_size % 2:
        raise ValueError(f"--batch_size {FLAGS.batch_size}: give an even number of rows >= 2")
    data = FLAGS.data or str(shipped_contrast_path())
    examples, _ = load_contrast_pairs(data)
    examples = select_pairs(examples, data, FLAGS.held_out, FLAGS.max_pairs)
    cfg = common.read_config(FLAGS.model)
    common.check_layers(cfg, layers, "layers")
    vector = load_layer_vectors(argv[1], key=FLAGS.key, num_layers=cfg.num_layers)
    common.check_vectors(cfg, {argv[1]: vector}, layers)
    lm = common.load_model_from_flags(config=cfg)
    if lm.tokenizer is None:
        raise ValueError(f"--model {FLAGS.model}: no tokenizer found next to the model")
    counts = {True: 0, False: 0}
    results = run_dose_response(
        lm,
        vector,
        examples,
        layers=layers,
        scales=scales,
        out_dir=FLAGS.out,
        n_random=FLAGS.n_random,
        seed=FLAGS.seed,
        batch_size=FLAGS.batch_size,
        max_length=FLAGS.max_length,
        model=FLAGS.model,
        overwrite=FLAGS.overwrite,
        on_cell=lambda name, computed: counts.__setitem__(computed, counts[computed] + 1),
    )
    from emgeo_jax.hosts import is_primary

    if not is_primary():  # the summary once, however many processes run
        return
    print(f"cells: {counts[True]} computed, {counts[False]} reused")
    base = results["baseline"]["margin_mean"]
    print(f"{results['n_pairs']} pairs; baseline margin {base:.4f}")
    for c in results["cells"]:
        band = c["null_band"]
        null = "" if band is None else f", null [{band[0]:+.4f}, {band[1]:+.4f}]"
        print(f"layer {c['layer']} scale {c['scale']:g}: shift {c['shift']:+.4f}{null}")
    print(f"wrote {FLAGS.out}/report.html")
