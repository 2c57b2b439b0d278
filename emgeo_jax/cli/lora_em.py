"""`emgeo lora-em RUN [--out DIR]`: the EM rate of a trained LoRA run folder against its base
model (the step after `emgeo train-lora`, e.g. with preventative steering):

    emgeo train-lora default --out runs/med_prev --steer_vector md.safetensors \\
        --steer_layers 15 --steer_scale 4
    emgeo lora-em runs/med_prev --samples 10          # -> runs/med_prev/em/results.json

The base model is RUN/run.json's source (or --model), the adapter RUN/adapter; generation and
judging take the flags of `emgeo sweep` (questions, samples, judge). Re-running resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

from emgeo_jax.cli import experiment_flags as common

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: emgeo lora-em RUN [--out DIR] [--flags]")
    from emgeo_jax.cli.common import load_model_from_flags, read_config
    from emgeo_jax.experiments.folder import check_folder
    from emgeo_jax.experiments.lora_em import lora_em_config, run_lora_em
    from emgeo_jax.train.peft_io import import_peft

    run = Path(argv[1])
    for need in (run / "run.json", run / "adapter" / "adapter_config.json"):
        if not need.exists():
            raise SystemExit(f"emgeo lora-em: {need} missing (not a finished train-lora run)")
    training = json.loads((run / "run.json").read_text())
    source = FLAGS.model if FLAGS["model"].present else training["source"]
    out = FLAGS.out or str(run / "em")
    questions, question_prompts = common.questions_from_flags()
    sampling = common.sampling_from_flags()
    cfg = read_config(source)
    spec, lora = import_peft(run / "adapter", cfg)
    planned = common.planned_judge()
    config = lora_em_config(source, lora, spec, training, questions, sampling, planned)
    check_folder(out, config, FLAGS.overwrite)  # an --out of another run: refused first
    lm = load_model_from_flags(source, config=cfg)
    with common.judge_from_flags(lm, planned) as judge:
        results = run_lora_em(
            lm,
            lora,
            spec,
            questions,
            sampling=sampling,
            judge=judge,
            out_dir=out,
            model=source,
            training=training,
            question_prompts=question_prompts,
            overwrite=FLAGS.overwrite,
        )
    from emgeo_jax.hosts import is_primary

    if not is_primary():  # the summary once, however many processes run
        return
    c = results["conditions"]
    base, lora_rate = (common.rate_text(c[k]["em_rate"]) for k in ("base", "lora"))
    print(f"EM base {base}, with the LoRA {lora_rate}")
    print(f"wrote {out}/results.json")
