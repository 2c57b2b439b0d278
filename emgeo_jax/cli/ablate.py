"""`emgeo ablate DIRECTION --out DIR [--layers 12 | all] [--steer V --steer_layer L
--steer_scale S]`: EM rate before and after projecting a direction out."""

from __future__ import annotations

from absl import flags

from emgeo_jax.cli import common as flags_common
from emgeo_jax.cli import experiment_flags as common

FLAGS = flags.FLAGS
flags.DEFINE_list("layers", None, "layers to ablate at (default: all)")
flags.DEFINE_string("key", None, "tensor name inside vector files holding several")
flags.DEFINE_string("steer", None, "optional vector added in both conditions")
flags.DEFINE_integer("steer_layer", None, "layer of --steer")
flags.DEFINE_float("steer_scale", 1.0, "scale of --steer")


def main(argv: list[str]) -> None:
    from emgeo_jax.cli.parsing import number_list
    from emgeo_jax.experiments.ablation import (
        ablation_config,
        run_ablation,
        write_ablation_report,
    )
    from emgeo_jax.experiments.folder import check_folder
    from emgeo_jax.hosts import is_primary
    from emgeo_jax.vectors.io import load_layer_vectors, load_vectors

    out = common.require_out("ablate")
    if len(argv) != 2:
        raise SystemExit("emgeo ablate: give exactly one direction file")
    questions, question_prompts = common.questions_from_flags()
    sampling = common.sampling_from_flags()
    cfg = flags_common.read_config(FLAGS.model)
    # with the model's layer count, a plain [L+1, D] stack (persona_vectors) is read right
    direction = load_layer_vectors(argv[1], key=FLAGS.key, num_layers=cfg.num_layers)
    steer = None
    if FLAGS.steer:
        if FLAGS.steer_layer is None:
            raise SystemExit("emgeo ablate: --steer needs --steer_layer")
        flags_common.check_layers(cfg, [FLAGS.steer_layer], "steer_layer")
        v, _ = load_vectors(
            FLAGS.steer, layer=FLAGS.steer_layer, key=FLAGS.key, num_layers=cfg.num_layers
        )
        steer = (v, FLAGS.steer_layer, FLAGS.steer_scale)
    every = not FLAGS.layers or FLAGS.layers == ["all"]
    layers = None if every else number_list(FLAGS.layers, "layers")
    flags_common.check_layers(cfg, layers, "layers")
    flags_common.check_vectors(cfg, {argv[1]: direction}, layers)
    if steer is not None:
        flags_common.check_vectors(cfg, {FLAGS.steer: steer[0]})
    planned = common.planned_judge()
    config = ablation_config(FLAGS.model, direction, layers, steer, questions, sampling, planned)
    check_folder(out, config, FLAGS.overwrite)  # an --out of another run: refused first
    lm = flags_common.load_model_from_flags(config=cfg)
    with common.judge_from_flags(lm, planned) as judge:
        results = run_ablation(
            lm,
            direction,
            questions,
            layers=layers,
            sampling=sampling,
            judge=judge,
            out_dir=out,
            model=FLAGS.model,
            steer=steer,
            question_prompts=question_prompts,
            overwrite=FLAGS.overwrite,
        )
    if not is_primary():  # the summary and the report once, however many processes run
        return
    c = results["conditions"]
    print(
        f"EM before {common.rate_text(c['before']['em_rate'])}, after "
        f"{common.rate_text(c['after']['em_rate'])}"
    )
    print(f"wrote {write_ablation_report(results, out)}")
