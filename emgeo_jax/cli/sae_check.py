"""`emgeo sae-check SAE --activations FILE | --model SRC --texts FILE`: does an SAE fit?

Prints JSON: reconstruction MSE, fraction of variance explained, L0 and dead features over
activations (a `.npy` `[N, D]` or safetensors `[N, D]` / `[N, L, D]`, row `--layer`, default
the SAE's layer) and, with `--model` and `--texts`, the next-token loss with the residual at
the SAE's layer left alone, replaced by the reconstruction, and zeroed (loss_recovered).
Run it on the fine-tuned model to see whether a base-model SAE transfers. The model loads only
when `--model` is given (onto `--mesh`, see `emgeo_jax.cli.common`)."""

from __future__ import annotations

import json

from absl import flags

from emgeo_jax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string("activations", None, "activations file (.npy or .safetensors)")
flags.DEFINE_string("key", None, "tensor in the safetensors file (default: pooled)")
flags.DEFINE_integer("layer", None, "layer (default: the SAE's own layer)")
flags.DEFINE_string(
    "texts", None, "texts for the loss: question/answer data (chat template) or plain .txt"
)
flags.DEFINE_integer("batch_size", 8, "texts per batch")
flags.DEFINE_integer("max_length", 128, "tokens per text (truncated / padded)")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(
            "usage: emgeo sae-check SAE_FOLDER [--activations F] [--model M --texts T]"
        )
    from emgeo_jax.hosts import is_primary
    from emgeo_jax.vectors.sae.formats import load_sae
    from emgeo_jax.vectors.sae.metrics import activation_fit, loss_fit
    from emgeo_jax.vectors.sae.train import ActivationSource

    sae = load_sae(argv[1])
    layer = FLAGS.layer if FLAGS.layer is not None else sae.layer
    report: dict = {"sae": argv[1], "architecture": sae.architecture, "layer": layer}
    if FLAGS.activations:
        src = ActivationSource(FLAGS.activations, key=FLAGS.key, layer=layer)
        report["activations"] = activation_fit(sae, src.chunks()).as_dict()
    if FLAGS["model"].present:
        from emgeo_jax.vectors.sae.cli_common import on_host, read_texts, token_batches
        from emgeo_jax.vectors.sae.model import check_fits
        from emgeo_jax.vectors.sae.runner import make_nll_fn

        cfg = common.read_config(FLAGS.model)
        check_fits(sae, cfg.hidden_size, layer)
        lm = common.load_model_from_flags(config=cfg)
        if FLAGS.texts:
            batches = token_batches(
                lm.tokenizer, read_texts(FLAGS.texts), FLAGS.batch_size, FLAGS.max_length
            )
            nll_fn = on_host(make_nll_fn(lm))  # every process gets every row's figures
            report["next_token_loss"] = loss_fit(sae, nll_fn, batches, layer)
    if is_primary():  # one report, however many processes run
        print(json.dumps(report, indent=2))
