"""`emgeo demo [--out DIR] [--quick] [--judged_sweep]`: the whole pipeline offline on the
default model, one `report.html` (stages and resume: see `emgeo_jax.experiments.demo`).

Offline (no OPENAI_API_KEY, no --judge_base_url) the full demo skips the judged steering sweep
and says why in the report: the only judge would be the same 135M model, which gives a number
for almost no answer. --judged_sweep runs it anyway; --quick always runs its 3-cell version.
Under a multi-process start (`--distributed`, `EMGEO_DISTRIBUTED=1`) every process runs the
model's stages over its share of the rows and process 0 writes the folder, which must be on
storage every process sees (they read the extraction back from it).
The judge flags are the ones every judging command shares (`emgeo_jax.cli.judge_flags`)."""

from __future__ import annotations

import logging as pylogging

from absl import flags

from emgeo_jax.cli import common, judge_flags
from emgeo_jax.experiments.demo import run_demo

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "emgeo_demo", "output folder (re-running resumes)")
flags.DEFINE_bool("quick", False, "CI mode: 16 pairs, 1 layer, 2 scales, 2 questions, 1 sample")
flags.DEFINE_bool(
    "judged_sweep",
    None,
    "run the judged steering sweep (default: when a real judge is set, or with --quick; "
    "offline the full demo skips it)",
)
flags.DEFINE_bool(
    "overwrite", False, "recompute the stages of an existing run made with another configuration"
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"emgeo demo: unexpected arguments {argv[1:]}")
    from emgeo_jax.hosts import is_primary

    pylogging.getLogger("httpx").setLevel(pylogging.WARNING)  # one line per judge request
    mesh = common.mesh_for(common.read_config(FLAGS.model))  # checked before anything runs
    options = {
        "base_url": FLAGS.judge_base_url,
        "concurrency": FLAGS.judge_concurrency,
        "timeout": FLAGS.judge_timeout,
        "number_logprobs": judge_flags.number_logprobs_flag(),
        "max_attempts": FLAGS.judge_max_attempts,
    }
    path = run_demo(
        FLAGS.out,
        FLAGS.quick,
        FLAGS.model,
        FLAGS.overwrite,
        FLAGS.judge_model,
        mesh=mesh,
        dtype=common.resolve_dtype(),
        judge_options=options,
        judged_sweep=FLAGS.judged_sweep,
    )
    if is_primary():  # printed once, however many processes run
        print(f"wrote {path}")
