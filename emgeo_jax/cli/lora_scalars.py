"""`emgeo lora-scalars SOURCE --adapter DIR --out scalars.safetensors`: per-token adapter
scalars on answer tokens of a labelled dataset (default: the shipped contrast pairs), and the
B vectors of rank-1 `down_proj` adapters as a `[L, D]` steering-direction file.

    emgeo lora-scalars default --adapter runs/med_r1/adapter --out med_r1_scalars.safetensors \\
        --directions_out med_r1_B.safetensors
    emgeo probe med_r1_scalars.safetensors --topic medical
    emgeo geometry med_r1_B.safetensors other.safetensors --layer 15 --out geo
"""

from __future__ import annotations

from absl import flags

from emgeo_jax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string("adapter", None, "PEFT LoRA adapter folder (e.g. RUN/adapter)")
flags.DEFINE_string("data", None, "labelled data (default: shipped contrast pairs)")
flags.DEFINE_string("out", None, "scalars file (.safetensors)")
flags.DEFINE_string("directions_out", None, "write B vectors of rank-1 down_proj adapters here")
flags.DEFINE_integer("batch_size", 8, "rows per forward pass")
flags.DEFINE_integer("max_length", 512, "longest tokenized example")


def main(argv: list[str]) -> None:
    source = argv[1] if len(argv) == 2 else FLAGS.model if len(argv) == 1 else None
    if source is None or not FLAGS.adapter or not FLAGS.out:
        raise SystemExit("usage: emgeo lora-scalars SOURCE --adapter DIR --out FILE")
    from emgeo_jax.data import load_examples, shipped_contrast_path, tokenize_examples
    from emgeo_jax.train.data import topics
    from emgeo_jax.train.peft_io import import_peft
    from emgeo_jax.train.scalars import b_directions, collect_scalars, save_scalars
    from emgeo_jax.vectors.io import save_vectors

    lm = common.load_model_from_flags(source, training=True)
    spec, lora = import_peft(FLAGS.adapter, lm.config)
    examples, _ = load_examples(FLAGS.data or shipped_contrast_path())
    tokenized, _ = tokenize_examples(examples, lm.tokenizer, FLAGS.max_length)
    kept = [examples[t.example_index] for t in tokenized]
    collected = collect_scalars(lm, lora, spec, tokenized, FLAGS.batch_size)
    meta = {"model": lm.source, "adapter": str(FLAGS.adapter)}
    save_scalars(FLAGS.out, collected, spec, topics(kept), meta)
    print(
        f"wrote {FLAGS.out}: {collected['scalars'].shape[0]} answer tokens x "
        f"{collected['scalars'].shape[1]} adapters, {len(kept)} examples"
    )
    if FLAGS.directions_out:
        dirs = b_directions(lora, spec, lm.config)
        save_vectors(
            FLAGS.directions_out,
            {"directions": dirs},
            {
                "model": lm.source,
                "method": "lora_B",
                "adapter_layers": list(spec.layers),  # rows are all layers, 0..L-1
                "adapter": str(FLAGS.adapter),
            },
        )
        print(f"wrote {FLAGS.directions_out}: B directions at layers {list(spec.layers)}")
