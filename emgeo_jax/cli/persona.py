"""`emgeo persona --out DIR [--positive_system ...] [--negative_system ...]`: answers under a
trait and a helpful system prompt, judge-filtered pairs -> contrast.jsonl and a persona
vector (mean-diff at every layer). Fewer than 2 kept pairs: no vector, the reason on stderr,
exit status 1."""

from __future__ import annotations

from absl import flags

from emgeo_jax.cli import experiment_flags as common
from emgeo_jax.experiments.persona import NEGATIVE_SYSTEM, POSITIVE_SYSTEM

FLAGS = flags.FLAGS
flags.DEFINE_string("positive_system", POSITIVE_SYSTEM, "system prompt eliciting the trait")
flags.DEFINE_string("negative_system", NEGATIVE_SYSTEM, "system prompt suppressing it")


def main(argv: list[str]) -> None:
    import json
    import sys

    from emgeo_jax.cli.common import load_model_from_flags
    from emgeo_jax.experiments.folder import check_folder
    from emgeo_jax.experiments.persona import persona_config, run_persona
    from emgeo_jax.hosts import is_primary

    out = common.require_out("persona")
    if len(argv) > 1:
        raise SystemExit(f"emgeo persona: unexpected arguments {argv[1:]}")
    questions, _ = common.questions_from_flags()  # persona judges trait, not per question
    sampling = common.sampling_from_flags()
    planned = common.planned_judge()
    config = persona_config(
        FLAGS.model, FLAGS.positive_system, FLAGS.negative_system, questions, sampling, planned
    )
    check_folder(out, config, FLAGS.overwrite)  # an --out of another run: refused first
    lm = load_model_from_flags()
    with common.judge_from_flags(lm, planned) as judge:
        results = run_persona(
            lm,
            questions,
            sampling=sampling,
            judge=judge,
            out_dir=out,
            model=FLAGS.model,
            positive_system=FLAGS.positive_system,
            negative_system=FLAGS.negative_system,
            overwrite=FLAGS.overwrite,
        )
    if is_primary():  # printed once, however many processes run
        print(json.dumps({k: results[k] for k in ("n_pairs", "n_kept", "kept_fraction")}))
    if "vector" not in results:  # no persona vector written: exit 1, saying why
        note = results.get("note", "no direction extracted")
        print(f"emgeo persona: {out}: {note}", file=sys.stderr)
        sys.exit(1)
