"""`emgeo generate`: steered (or plain) sampling of many prompts into a JSONL file.

    emgeo generate --model default --prompts questions.yaml --steer v.safetensors \\
        --layer 15 --scale 4 --positions all --samples 10 --temperature 1 --out responses.jsonl

Prompt files: a text file (one prompt per line), JSONL rows with `question` (a string) or
`messages` (chat turns ending with a user turn), or a question YAML (a list of items with
`id`, `paraphrases`, optional `samples_per_paraphrase` and `system`). Each output row keeps
the row's fields and its `prompt`, and adds `response`, `sample`, `finish_reason` and the
steering used. `--samples` overrides `samples_per_paraphrase`.

Steering flags (`--steer`, `--layer`, `--scale`, `--positions`, `--ablate`) and vector files:
see `emgeo_jax.steer_flags` (shared with `emgeo serve`).
"""

from __future__ import annotations

import json

from absl import flags

from emgeo_jax.experiments.questions import read_prompts
from emgeo_jax.generate import with_system
from emgeo_jax.steer_flags import build_steering

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "default", "model source (see emgeo_jax.load)")
flags.DEFINE_string("prompts", None, "prompt file: .txt, .jsonl or question .yaml")
flags.DEFINE_integer("max_new_tokens", 600, "new tokens per response")
flags.DEFINE_float("temperature", 1.0, "0 = greedy")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
flags.DEFINE_integer("seed", 0, "PRNG seed (batch k uses seed + k)")
flags.DEFINE_integer("samples", None, "samples per prompt (default: the YAML's, else 1)")
flags.DEFINE_integer("batch_size", 16, "rows per generation batch")
flags.DEFINE_string("system", None, "system prompt for prompts that have none")
flags.DEFINE_string("dtype", "float32", "float32 or bfloat16")
flags.DEFINE_string("out", "responses.jsonl", "output JSONL")


def main(argv: list[str]) -> None:
    import emgeo_jax

    if len(argv) > 1:
        raise SystemExit(f"emgeo generate: unexpected arguments {argv[1:]}")
    if not FLAGS.prompts:
        raise SystemExit("emgeo generate: --prompts FILE is required")
    rows = read_prompts(FLAGS.prompts)
    if not rows:
        raise SystemExit(f"{FLAGS.prompts}: no prompts found")
    lm = emgeo_jax.load(FLAGS.model, dtype=FLAGS.dtype)
    steering, summary = build_steering(lm.config, FLAGS)
    jobs = []
    for row in rows:
        n = FLAGS.samples or row.get("samples") or 1
        jobs += [(row, s) for s in range(n)]
    with open(FLAGS.out, "w") as out:
        for k in range(0, len(jobs), FLAGS.batch_size):
            batch = jobs[k : k + FLAGS.batch_size]
            result = lm.generate(
                [with_system(row["prompt"], row.get("system") or FLAGS.system) for row, _ in batch],
                steering,
                max_new_tokens=FLAGS.max_new_tokens,
                temperature=FLAGS.temperature,
                top_p=FLAGS.top_p,
                seed=FLAGS.seed + k // FLAGS.batch_size,
            )
            for (row, s), text, reason in zip(
                batch, result.texts, result.finish_reasons, strict=True
            ):
                fields = {key: v for key, v in row.items() if key != "samples"}
                record = {**fields, "response": text, "sample": s, "finish_reason": reason}
                out.write(json.dumps({**record, "steering": summary}) + "\n")
            print(f"{min(k + FLAGS.batch_size, len(jobs))}/{len(jobs)} responses", flush=True)
    print(f"wrote {FLAGS.out}")
