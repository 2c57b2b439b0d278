"""`emgeo sae-features SAE --method cosine|class_diff|steering ... --out FILE`: the features
a direction or a contrast turns on, ranked beside their null, exported as a vector file.

- cosine:     `--vector FILE` (a `[D]` or `[L, D]` vector file): its vector for the SAE's layer
              L is compared with the decoder rows
- class_diff: `--activations FILE` with `pooled [N, L, D]` + `label [N]` (1 = misaligned), the
              rows of the SAE's layer L
- steering:   `--vector FILE --model SRC --texts FILE` (seed 000: "steer activations in layer
              L-1 with the mean-diff vector for layer L-1", count features newly active at the
              SAE's layer L): the file's vector for layer L-1, added after block L-1
Layers are real layers (output of block l): a stack's rows are for the layers of its metadata
`layers` (e.g. `emgeo extract --layers`), else 0..L-1; a file without the layer needed is
refused (`emgeo_jax.vectors.io.row_of`); a `[D]` vector serves any layer.
Prints the ranking as JSON; `--out` writes the top features' decoder rows (unit, no b_dec)."""

from __future__ import annotations

import json

import numpy as np
from absl import flags

from emgeo_jax.cli import common as flags_common

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "cosine", ["cosine", "class_diff", "steering"], "selection method")
flags.DEFINE_string("vector", None, "direction file (.npy or safetensors)")
flags.DEFINE_string("vector_key", None, "tensor in the vector file")
flags.DEFINE_string("activations", None, "safetensors with pooled [N, L, D] and label [N]")
flags.DEFINE_string(
    "texts", None, "steering-method texts: question/answer data (chat template) or plain .txt"
)
flags.DEFINE_float("scale", 1.0, "steering scale applied to the vector")
flags.DEFINE_integer("top", 10, "features to report and export")
flags.DEFINE_integer("n_null", 200, "null draws (random directions or label permutations)")
flags.DEFINE_integer("batch_size", 8, "texts per batch")
flags.DEFINE_integer("max_length", 128, "tokens per text")
flags.DEFINE_integer("seed", 0, "PRNG seed for the null")
flags.DEFINE_string("out", None, "vector file to write (safetensors)")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: emgeo sae-features SAE_FOLDER --method ... [--out FILE]")
    from emgeo_jax.hosts import is_primary
    from emgeo_jax.vectors.io import load_activations, load_vectors
    from emgeo_jax.vectors.sae import select
    from emgeo_jax.vectors.sae.cli_common import on_host, read_texts, token_batches
    from emgeo_jax.vectors.sae.formats import load_sae, save_feature_directions
    from emgeo_jax.vectors.sae.model import SAEError, check_fits

    sae = load_sae(argv[1])
    layer = sae.layer
    common = dict(k=FLAGS.top, seed=FLAGS.seed)
    if FLAGS.method == "class_diff":
        if not FLAGS.activations:
            raise SAEError("--method class_diff needs --activations")
        acts, labels, _ = load_activations(FLAGS.activations, layer=layer)
        check_fits(sae, acts.shape[-1])
        ranking = select.class_diff(sae, acts, labels, n_perm=FLAGS.n_null, **common)
    else:
        if not FLAGS.vector:
            raise SAEError(f"--method {FLAGS.method} needs --vector")
        vector_layer = select.vector_layer(FLAGS.method, layer)
        # with --model, a plain [L+1, D] stack (persona_vectors) is read with its layer count
        cfg = flags_common.read_config(FLAGS.model) if FLAGS["model"].present else None
        vec, _ = load_vectors(
            FLAGS.vector,
            layer=vector_layer,
            key=FLAGS.vector_key,
            num_layers=cfg.num_layers if cfg is not None else None,
        )
        vec = vec * FLAGS.scale
        check_fits(sae, vec.shape[0])
        if FLAGS.method == "cosine":
            ranking = select.cosine(sae, vec, n_null=FLAGS.n_null, **common)
        else:
            from emgeo_jax.vectors.sae.runner import make_resid_fn

            if not (FLAGS["model"].present and FLAGS.texts):
                raise SAEError("--method steering needs --model and --texts")
            check_fits(sae, cfg.hidden_size)
            used = [x for x in (layer, vector_layer) if x is not None]
            flags_common.check_layers(cfg, used, "layer (the SAE's)")
            lm = flags_common.load_model_from_flags(config=cfg)
            batches = token_batches(
                lm.tokenizer, read_texts(FLAGS.texts), FLAGS.batch_size, FLAGS.max_length
            )
            resid_fn = on_host(make_resid_fn(lm))  # every process gets every row
            ranking = select.steering(
                sae, resid_fn, batches, vec, layer, n_null=FLAGS.n_null, **common
            )
    report = ranking.as_dict() | {"sae": argv[1], "layer": layer}
    if FLAGS.method != "class_diff":
        report["vector_layer"] = vector_layer
    if FLAGS.out:
        meta = {"selection": FLAGS.method, "source_vector": FLAGS.vector}
        if is_primary():  # written once, however many processes run
            scores = np.asarray(ranking.scores)
            save_feature_directions(FLAGS.out, sae, ranking.features, meta, scores)
        report["out"] = FLAGS.out
    if is_primary():
        print(json.dumps(report, indent=2))
