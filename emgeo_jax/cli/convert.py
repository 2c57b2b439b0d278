"""`emgeo convert SOURCE --out checkpoints/NAME [--adapter DIR] [--dtype bfloat16]`."""

from __future__ import annotations

import time

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "checkpoint folder to write, e.g. checkpoints/smollm2 (required)")
flags.DEFINE_string("adapter", None, "PEFT LoRA adapter folder to merge into SOURCE")
flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "parameter dtype to store (default: float32, or as stored)",
)
flags.DEFINE_bool("overwrite", False, "replace an existing checkpoint folder")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or not FLAGS.out:
        raise SystemExit(
            "usage: emgeo convert SOURCE --out checkpoints/NAME  (SOURCE: HF folder, "
            ".gguf file, or 'default')"
        )
    from emgeo_jax.convert.checkpoint import convert_streaming
    from emgeo_jax.convert.load import open_source

    start = time.perf_counter()
    cfg, src, tokenizer = open_source(argv[1], adapter=FLAGS.adapter)
    folder = convert_streaming(
        cfg,
        src,
        FLAGS.out,
        dtype=FLAGS.dtype or "float32",
        tokenizer=tokenizer,
        source=argv[1],
        overwrite=FLAGS.overwrite,
    )
    adapter = getattr(src, "adapter", None)
    merged = f", merged {adapter.describe()}" if adapter is not None else ""
    print(
        f"wrote {folder} ({cfg.model_type}, {cfg.num_layers} layers, d={cfg.hidden_size}, "
        f"{FLAGS.dtype or 'float32'}{merged}) in {time.perf_counter() - start:.1f} s"
    )
