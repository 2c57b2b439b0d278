"""`emgeo transfer --models a=SRC,b=SRC --vectors a=FILE,b=FILE --layer 12 --scale 8 --out DIR`:
each model's vector applied to every model (same architecture); TE matrix and asymmetry."""

from __future__ import annotations

from absl import flags

from emgeo_jax.cli import common as flags_common
from emgeo_jax.cli import experiment_flags as common

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "NAME=model source, one per model")
flags.DEFINE_list("vectors", None, "NAME=vector file ([D] or [L, D]), one per model")
flags.DEFINE_integer("layer", None, "layer to steer at")
flags.DEFINE_float("scale", 8.0, "steering scale")
flags.DEFINE_string("key", None, "tensor name inside vector files holding several")


def main(argv: list[str]) -> None:
    from emgeo_jax.experiments.folder import check_folder
    from emgeo_jax.experiments.judging import uses_local_judge
    from emgeo_jax.experiments.transfer import (
        run_transfer,
        transfer_config,
        write_transfer_report,
    )
    from emgeo_jax.hosts import is_primary
    from emgeo_jax.vectors.io import load_layer_vectors

    out = common.require_out("transfer")
    if len(argv) > 1 or not FLAGS.models or not FLAGS.vectors or FLAGS.layer is None:
        raise SystemExit("emgeo transfer: give --models, --vectors and --layer (no arguments)")
    sources = common.parse_named(FLAGS.models, "models")
    configs = {k: flags_common.read_config(src, flag="models") for k, src in sources.items()}
    # each model's vector file read with that model's layer count (a plain [L+1, D] stack is
    # persona_vectors' hidden_states order)
    vectors = {
        k: load_layer_vectors(f, key=FLAGS.key, num_layers=_layers_of(configs, k))
        for k, f in common.parse_named(FLAGS.vectors, "vectors").items()
    }
    for cfg in configs.values():
        flags_common.check_layers(cfg, [FLAGS.layer], "layer")
        flags_common.check_vectors(cfg, vectors, [FLAGS.layer])
        flags_common.mesh_for(cfg)  # every model fits the mesh, checked before any loads
    loaders = {
        k: (lambda src=src, cfg=configs[k]: flags_common.load_model_from_flags(src, config=cfg))
        for k, src in sources.items()
    }
    questions, question_prompts = common.questions_from_flags()
    sampling = common.sampling_from_flags()
    planned = common.planned_judge()
    config = transfer_config(
        list(sources), sources, vectors, FLAGS.layer, FLAGS.scale, questions, sampling, planned
    )
    check_folder(out, config, FLAGS.overwrite)  # an --out of another run: refused first
    local = uses_local_judge(FLAGS.judge_base_url)
    judge_lm = loaders[next(iter(loaders))]() if local else None
    with common.judge_from_flags(judge_lm, planned) as judge:
        results = run_transfer(
            loaders,
            vectors,
            questions,
            layer=FLAGS.layer,
            scale=FLAGS.scale,
            sampling=sampling,
            judge=judge,
            out_dir=out,
            sources=sources,
            question_prompts=question_prompts,
            overwrite=FLAGS.overwrite,
        )
    if is_primary():  # the report written once, however many processes run
        print(f"wrote {write_transfer_report(results, out)}")


def _layers_of(configs: dict, name: str) -> int | None:
    """The layer count of model `name` (None when no model has that name: run_transfer refuses
    the mismatch with both lists)."""
    return configs[name].num_layers if name in configs else None
