"""`emgeo generate`: steered (or plain) sampling of many prompts into a JSONL file.

    emgeo generate --model default --prompts questions.yaml --steer v.safetensors \\
        --layer 15 --scale 4 --positions all --samples 10 --temperature 1 --out responses.jsonl

Prompt files: a text file (one prompt per line), JSONL rows with `question` (a string) or
`messages` (chat turns ending with a user turn), or a question YAML (a list of items with
`id`, `paraphrases`, optional `samples_per_paraphrase` and `system`). Each output row keeps
the row's fields and its `prompt`, and adds `response`, `sample`, `finish_reason` and the
steering used. `--samples` overrides `samples_per_paraphrase`. `emgeo judge` reads the
output as it is.

Interrupted runs resume: rows go to `OUT.partial` batch by batch and the file becomes `OUT`
only when every prompt is done; re-running the same command (same model, prompts, vector
files and flags) continues after the last whole batch, with the same seeds, so the result
equals an uninterrupted run.

Steering flags (`--steer`, `--layer`, `--scale`, `--positions`, `--ablate`) and vector files:
see `emgeo_jax.cli.common.build_steering` (shared with `emgeo serve`). `--mesh fsdp=8` splits
the model over 8 devices (see `emgeo_jax.cli.common`); greedy output is the same on any mesh.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from emgeo_jax.cli import common
from emgeo_jax.data.files import file_sha256
from emgeo_jax.experiments.questions import read_prompts
from emgeo_jax.generate import generate, with_system
from emgeo_jax.runs import ResumableJsonl

FLAGS = flags.FLAGS
common.define_sampling_flags(
    batch_size=16,
    samples_help="samples per prompt (default: a question YAML's samples_per_paraphrase, 50 in "
    "the shipped questions; other files 1); an explicit value overrides the YAML",
)
common.define_steering_flags()
flags.DEFINE_string("prompts", None, "prompt file: .txt, .jsonl or question .yaml")
flags.DEFINE_string("system", None, "system prompt for prompts that have none")
flags.DEFINE_string("out", "responses.jsonl", "output JSONL")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"emgeo generate: unexpected arguments {argv[1:]}")
    if not FLAGS.prompts:
        raise SystemExit("emgeo generate: --prompts FILE is required")
    rows = read_prompts(FLAGS.prompts)
    if not rows:
        raise SystemExit(f"{FLAGS.prompts}: no prompts found")
    cfg = common.read_config(FLAGS.model)
    common.check_vector_files(FLAGS, cfg)
    lm = common.load_model_from_flags(config=cfg)
    steering, summary = common.build_steering(lm.config, FLAGS)
    jobs = []
    for row in rows:
        n = FLAGS.samples or row.get("samples") or 1
        jobs += [(row, s) for s in range(n)]
    out = ResumableJsonl(FLAGS.out, run_config(summary), unit=FLAGS.batch_size)
    if out.done:
        print(f"resuming after {out.done}/{len(jobs)} responses in {out.partial}", flush=True)
    for k in range(out.done, len(jobs), FLAGS.batch_size):
        batch = jobs[k : k + FLAGS.batch_size]
        result = generate(
            lm,
            [with_system(row["prompt"], row.get("system") or FLAGS.system) for row, _ in batch],
            steering,
            max_new_tokens=FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_p=FLAGS.top_p,
            seed=FLAGS.seed + k // FLAGS.batch_size,
        )
        records = []
        for (row, s), text, reason in zip(batch, result.texts, result.finish_reasons, strict=True):
            fields = {key: v for key, v in row.items() if key != "samples"}
            record = {**fields, "response": text, "sample": s, "finish_reason": reason}
            records.append({**record, "steering": summary})
        out.append(records)
        print(f"{out.done}/{len(jobs)} responses", flush=True)
    out.finish()
    print(f"wrote {FLAGS.out}")


def run_config(steering: dict) -> dict:
    """What a resumed run must share with the interrupted one: every flag that changes the
    rows (the model by its path), and the bytes of the prompt and vector files."""
    digests = {
        flag: file_sha256(path)
        for flag, path in (("prompts", FLAGS.prompts), *steering.items())
        if flag in ("prompts", "steer", "ablate") and path and Path(path).is_file()
    }
    names = ("model", "prompts", "max_new_tokens", "temperature", "top_p", "seed")
    names += ("samples", "batch_size", "system")
    settings = {n: FLAGS[n].value for n in names} | {"dtype": common.resolve_dtype()}
    return {**settings, "steering": steering, "sha256": digests}
