"""`emgeo convert SOURCE --out checkpoints/NAME [--adapter DIR] [--dtype bfloat16]`."""

from __future__ import annotations

import time

from absl import flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "out", None, "checkpoint folder to write, e.g. checkpoints/smollm2", required=True
)
flags.DEFINE_string("adapter", None, "PEFT LoRA adapter folder to merge into SOURCE")
flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "parameter dtype to store (default: float32, or as stored)",
)
flags.DEFINE_bool("overwrite", False, "replace an existing checkpoint folder")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(
            "usage: emgeo convert SOURCE --out checkpoints/NAME  (SOURCE: HF folder, "
            ".gguf file, or 'default')"
        )
    from emgeo_jax.convert.checkpoint import save_checkpoint
    from emgeo_jax.convert.load import load

    start = time.perf_counter()
    lm = load(argv[1], dtype=FLAGS.dtype, adapter=FLAGS.adapter)
    logging.info(
        "loaded %s (%.1fM params) in %.1f s",
        argv[1],
        lm.param_count() / 1e6,
        time.perf_counter() - start,
    )
    folder = save_checkpoint(lm, FLAGS.out, overwrite=FLAGS.overwrite)
    print(
        f"wrote {folder} ({lm.config.model_type}, {lm.config.num_layers} layers, "
        f"d={lm.config.hidden_size}, {lm.dtype}) in {time.perf_counter() - start:.1f} s"
    )
