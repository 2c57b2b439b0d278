"""`emgeo demo [--out DIR] [--quick]`: the whole pipeline offline on the default model, one
`report.html` (stages and resume: see `emgeo_jax.experiments.demo`)."""

from __future__ import annotations

import logging as pylogging

from absl import flags

from emgeo_jax.cli import common
from emgeo_jax.experiments.demo import run_demo

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "emgeo_demo", "output folder (re-running resumes)")
flags.DEFINE_bool("quick", False, "CI mode: 16 pairs, 1 layer, 2 scales, 2 questions, 1 sample")
flags.DEFINE_string("judge_model", "gpt-4o-mini", "OpenAI judge model (with OPENAI_API_KEY)")
flags.DEFINE_bool(
    "overwrite", False, "recompute the stages of an existing run made with another configuration"
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"emgeo demo: unexpected arguments {argv[1:]}")
    pylogging.getLogger("httpx").setLevel(pylogging.WARNING)  # one line per judge request
    mesh = common.mesh_for(common.read_config(FLAGS.model))  # checked before anything runs
    path = run_demo(
        FLAGS.out,
        FLAGS.quick,
        FLAGS.model,
        FLAGS.overwrite,
        FLAGS.judge_model,
        mesh=mesh,
        dtype=common.resolve_dtype(),
    )
    print(f"wrote {path}")
