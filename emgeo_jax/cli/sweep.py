"""`emgeo sweep [NAME=]VECTORS... --layers 5,10 --scales -8,-4,4,8 --out DIR`.

Vector files: safetensors / .npy / .pt holding `[D]` or a per-layer stack `[L, D]` (layer l =
output of block l; row i is for the i-th layer of the file's metadata `layers`, e.g. after
`emgeo extract --layers`, else for layer i). Writes results.json, figures and report.html in --out;
re-running resumes. Judge: see --judge_base_url. Layers, vector widths and rows are checked
against the model's config before it loads; `--mesh fsdp=8` splits the model over 8 devices.
"""

from __future__ import annotations

from absl import flags

from emgeo_jax.cli import common as flags_common
from emgeo_jax.cli import experiment_flags as common

FLAGS = flags.FLAGS
flags.DEFINE_list("layers", None, "layers to steer at (one cell per layer)")
flags.DEFINE_list("scales", ["-8", "-4", "4", "8"], "steering scales (0 = baseline, always run)")
flags.DEFINE_integer("monitor_layer", None, "record projections on the first vector here")
flags.DEFINE_string("key", None, "tensor name inside vector files holding several")


def main(argv: list[str]) -> None:
    from emgeo_jax.cli.parsing import number_list
    from emgeo_jax.experiments.folder import check_folder
    from emgeo_jax.experiments.sweep import run_sweep, sweep_config, write_sweep_report
    from emgeo_jax.hosts import is_primary
    from emgeo_jax.vectors.io import load_layer_vectors

    out = common.require_out("sweep")
    files = common.parse_named(argv[1:], "vectors")
    if not files or not FLAGS.layers:
        raise SystemExit("emgeo sweep: give vector files and --layers")
    layers = number_list(FLAGS.layers, "layers")
    scales = number_list(FLAGS.scales, "scales", float)
    cfg = flags_common.read_config(FLAGS.model)
    # rows resolved for the model once (a plain [L+1, D] stack is persona_vectors' layout)
    vectors = {
        name: load_layer_vectors(f, key=FLAGS.key).for_model(cfg.num_layers)
        for name, f in files.items()
    }
    monitor = None if FLAGS.monitor_layer is None else (FLAGS.monitor_layer, next(iter(vectors)))
    questions, question_prompts = common.questions_from_flags()
    sampling = common.sampling_from_flags()
    flags_common.check_layers(cfg, layers, "layers")
    flags_common.check_vectors(cfg, vectors, layers)
    if monitor is not None:
        flags_common.check_layers(cfg, [monitor[0]], "monitor_layer")
        flags_common.check_vectors(cfg, {monitor[1]: vectors[monitor[1]]}, [monitor[0]])
    planned = common.planned_judge()
    config = sweep_config(
        FLAGS.model, vectors, questions, layers, scales, sampling, planned, monitor
    )
    check_folder(out, config, FLAGS.overwrite)  # an --out of another run: refused first
    lm = flags_common.load_model_from_flags(config=cfg)
    with common.judge_from_flags(lm, planned) as judge:
        results = run_sweep(
            lm,
            vectors,
            questions,
            layers=layers,
            scales=scales,
            sampling=sampling,
            judge=judge,
            out_dir=out,
            model=FLAGS.model,
            monitor=monitor,
            question_prompts=question_prompts,
            overwrite=FLAGS.overwrite,
        )
    if is_primary():  # the report written once, however many processes run
        print(f"wrote {write_sweep_report(results, out)}")
