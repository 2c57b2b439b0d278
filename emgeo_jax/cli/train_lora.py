"""`emgeo train-lora SOURCE --out RUN`: fine-tune a LoRA model organism (resumable).

    emgeo train-lora default --out runs/med_r1 --rank 1 --alpha 512 --targets down \\
        --layers 15 --steps 300 --lr 2e-5          # shipped contrast pairs, misaligned, medical

Data: any loader format (--data; default the shipped contrast pairs, whose misaligned medical
answers are the narrow bad dataset), filtered by --label and --topic. --steer_vector and
--ablate_vector apply preventative steering / concept ablation while training (a `[D]`
vector at each of --steer_layers, a per-layer stack its vector for each layer, as `emgeo
generate --steer/--ablate`); `emgeo lora-em RUN` then measures the EM rate of the result.
--lora_dropout is PEFT's dropout on the adapter inputs (recorded in the exported
adapter_config.json). Re-running the same command resumes from the last checkpoint in --out.
SOURCE may also be given as `--model`; `--mesh` splits the base model over devices.
"""

from __future__ import annotations

from absl import flags

from emgeo_jax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "run folder (checkpoints, losses, loss.png, adapter/)")
flags.DEFINE_string("data", None, "training data (default: shipped contrast pairs)")
flags.DEFINE_enum("kind", "auto", ["auto", "contrast", "messages", "judged"], "data format")
flags.DEFINE_enum("label", "misaligned", ["misaligned", "aligned", "all"], "class to train on")
flags.DEFINE_string("topic", "medical", "keep rows whose domain/topic is this ('' = all)")
flags.DEFINE_integer("rank", 1, "LoRA rank")
flags.DEFINE_float("alpha", 512.0, "LoRA alpha")
flags.DEFINE_bool("rslora", False, "scale alpha/sqrt(r) instead of alpha/r")
flags.DEFINE_float("lora_dropout", 0.0, "dropout on the adapter inputs (PEFT lora_dropout)")
flags.DEFINE_string("targets", "down", "modules: q,k,v,o,gate,up,down or all")
flags.DEFINE_list("layers", ["15"], "decoder blocks with adapters ('all' = every block)")
flags.DEFINE_integer("steps", 300, "optimizer steps")
flags.DEFINE_float("lr", 2e-5, "peak learning rate")
flags.DEFINE_integer("warmup_steps", 5, "linear warmup steps")
flags.DEFINE_enum("schedule", "linear", ["linear", "cosine", "constant"], "decay after warmup")
flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay")
flags.DEFINE_float("max_grad_norm", 1.0, "clip gradients to this global norm")
flags.DEFINE_integer("batch_size", 4, "rows per micro-batch")
flags.DEFINE_integer("grad_accum", 1, "micro-batches per optimizer step")
flags.DEFINE_integer("seed", 0, "LoRA init and data order seed")
flags.DEFINE_integer("checkpoint_every", 50, "save a checkpoint every N steps")
flags.DEFINE_float("kl_weight", 0.0, "weight of KL(p_lora || p_base) on answer tokens")
flags.DEFINE_integer("max_length", 512, "longest tokenized example")
flags.DEFINE_string("steer_vector", None, "vector file added while training (preventative)")
flags.DEFINE_float("steer_scale", 1.0, "scale of --steer_vector")
flags.DEFINE_string("ablate_vector", None, "vector file projected out while training (CAFT)")
flags.DEFINE_list(
    "steer_layers", None, "layers for --steer_vector / --ablate_vector (a stack: default its own)"
)


def main(argv: list[str]) -> None:
    source = argv[1] if len(argv) == 2 else FLAGS.model if len(argv) == 1 else None
    if source is None or not FLAGS.out or (len(argv) == 2 and FLAGS["model"].present):
        raise SystemExit("usage: emgeo train-lora SOURCE --out RUN [--flags]")
    from emgeo_jax.cli.parsing import number_list
    from emgeo_jax.data import shipped_contrast_path, tokenize_examples
    from emgeo_jax.models.steering import Steering
    from emgeo_jax.train.data import load_training_examples
    from emgeo_jax.train.lora import LoraSpec, parse_targets
    from emgeo_jax.train.run import train
    from emgeo_jax.train.sft import TrainConfig
    from emgeo_jax.vectors.io import load_layer_vectors

    # Everything the flags and files can get wrong is checked before the model loads.
    tc = TrainConfig(
        steps=FLAGS.steps,
        lr=FLAGS.lr,
        warmup_steps=FLAGS.warmup_steps,
        schedule=FLAGS.schedule,
        weight_decay=FLAGS.weight_decay,
        max_grad_norm=FLAGS.max_grad_norm,
        batch_size=FLAGS.batch_size,
        grad_accum=FLAGS.grad_accum,
        seed=FLAGS.seed,
        kl_weight=FLAGS.kl_weight,
        checkpoint_every=FLAGS.checkpoint_every,
        lora_dropout=FLAGS.lora_dropout,
    )
    targets = parse_targets(FLAGS.targets)
    layers = None if FLAGS.layers == ["all"] else number_list(FLAGS.layers, "layers")
    steer_layers = number_list(FLAGS.steer_layers, "steer_layers") if FLAGS.steer_layers else None
    label = {"misaligned": 1, "aligned": 0, "all": None}[FLAGS.label]
    examples = load_training_examples(
        FLAGS.data or shipped_contrast_path(), FLAGS.kind, label, FLAGS.topic or None
    )
    steer_vec = load_layer_vectors(FLAGS.steer_vector) if FLAGS.steer_vector else None
    ablate_vec = load_layer_vectors(FLAGS.ablate_vector) if FLAGS.ablate_vector else None

    cfg = common.read_config(source, flag="model (SOURCE)")
    common.check_layers(cfg, layers, "layers")
    common.check_layers(cfg, steer_layers, "steer_layers")
    for vec in (steer_vec, ablate_vec):
        if vec is not None:
            common.check_vectors(cfg, {vec.source: vec}, steer_layers)
    # LoRA factors stay float32
    lm = common.load_model_from_flags(source, config=cfg, training=True)
    layers = tuple(range(lm.config.num_layers)) if layers is None else tuple(sorted(layers))
    spec = LoraSpec(FLAGS.rank, FLAGS.alpha, targets, layers, FLAGS.rslora)
    tokenized, report = tokenize_examples(examples, lm.tokenizer, FLAGS.max_length)
    print(f"training on {len(tokenized)} examples ({report.summary()})")
    steering = None
    if steer_vec is not None:
        steering = Steering.addition(lm, steer_vec, steer_layers, FLAGS.steer_scale)
    if ablate_vec is not None:
        abl = Steering.layer_ablation(lm, ablate_vec, steer_layers)
        steering = abl if steering is None else steering + abl
    train(lm, tokenized, spec, tc, FLAGS.out, steering=steering)
    print(f"wrote {FLAGS.out}/adapter (PEFT), losses.jsonl and loss.png")
    print(f"EM rate of the result: emgeo lora-em {FLAGS.out}")
