"""`emgeo train-sae --activations FILE --layer L --width W --k K --out DIR`: train a TopK or
BatchTopK SAE on extracted activations (streamed from disk), report its fit on held-out rows
(the last `--holdout` fraction) and save it as a SAELens folder. The training state is kept
in OUT/train_state: rerunning the same command resumes an interrupted run."""

from __future__ import annotations

import json

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "activations", None, "activations (.npy [N, D], safetensors [N, D] / [N, L, D])"
)
flags.DEFINE_string("key", None, "tensor in the safetensors file (default: pooled)")
flags.DEFINE_integer("layer", None, "layer (row of [N, L, D]; recorded in the SAE)")
flags.DEFINE_integer("width", None, "number of features F")
flags.DEFINE_integer("k", 32, "active features per token")
flags.DEFINE_enum("architecture", "topk", ["topk", "batchtopk"], "sparsity rule")
flags.DEFINE_integer("steps", 2000, "optimizer steps")
flags.DEFINE_integer("batch_size", 1024, "rows per step")
flags.DEFINE_float("lr", None, "Adam learning rate (default 2e-4 / sqrt(width / 2^14))")
flags.DEFINE_float("holdout", 0.1, "fraction of rows (at the end) held out for the fit report")
flags.DEFINE_integer("seed", 0, "PRNG seed")
flags.DEFINE_string("model_name", "", "model the activations came from (saved in metadata)")
flags.DEFINE_string("out", None, "output SAELens folder")
flags.DEFINE_integer("checkpoint_every", 500, "save the training state in OUT/train_state")
flags.DEFINE_integer("stop_at", None, "stop after this many total steps (resume by rerunning)")
flags.mark_flags_as_required(["activations", "layer", "width", "out"])


def main(argv: list[str]) -> None:
    del argv
    import logging

    from emgeo_jax.vectors.sae.formats import save_saelens
    from emgeo_jax.vectors.sae.metrics import activation_fit
    from emgeo_jax.vectors.sae.train import ActivationSource, TrainConfig, train_sae

    logging.getLogger("emgeo_jax").setLevel(logging.INFO)
    full = ActivationSource(FLAGS.activations, key=FLAGS.key, layer=FLAGS.layer)
    split = full.n - max(1, int(full.n * FLAGS.holdout))
    source = ActivationSource(FLAGS.activations, FLAGS.key, FLAGS.layer, rows=(0, split))
    held = ActivationSource(FLAGS.activations, FLAGS.key, FLAGS.layer, rows=(split, full.n))
    cfg = TrainConfig(
        width=FLAGS.width,
        k=FLAGS.k,
        architecture=FLAGS.architecture,
        steps=FLAGS.steps,
        batch_size=min(FLAGS.batch_size, source.n),
        lr=FLAGS.lr,
        seed=FLAGS.seed,
    )
    sae = train_sae(
        source,
        cfg,
        layer=FLAGS.layer,
        log_every=max(1, FLAGS.steps // 10),
        checkpoint=f"{FLAGS.out}/train_state",
        checkpoint_every=FLAGS.checkpoint_every,
        stop_at=FLAGS.stop_at,
    )
    fit = activation_fit(sae, held.chunks()).as_dict()
    meta = dict(model_name=FLAGS.model_name, activations=FLAGS.activations, steps=FLAGS.steps)
    save_saelens(sae, FLAGS.out, extra=meta | {"heldout_fit": fit})
    print(json.dumps({"out": FLAGS.out, "heldout": fit}, indent=2))
