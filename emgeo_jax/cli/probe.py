"""`emgeo probe SCALARS --topic medical --out probes.json`: the four L1 logistic-regression
probes of the rank-1 dissection on a file from `emgeo lora-scalars` (per-example means by
default, or every answer token with folds grouped by example), each beside a shuffled-label
control.
"""

from __future__ import annotations

import json

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("topic", "medical", "the topic of the fine-tuning data")
flags.DEFINE_enum("level", "example", ["example", "token"], "probe examples or tokens")
flags.DEFINE_float("l1", 0.01, "L1 penalty (z-scored features)")
flags.DEFINE_integer("folds", 5, "cross-validation folds")
flags.DEFINE_integer("repeats", 10, "repeated cross-validations")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_string("out", None, "write the results as JSON here")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: emgeo probe SCALARS.safetensors [--flags]")
    import numpy as np

    from emgeo_jax.train.probe import four_tests
    from emgeo_jax.train.scalars import load_scalars

    tensors, meta = load_scalars(argv[1])
    if FLAGS.topic not in meta.get("topics", []):
        raise SystemExit(f"{argv[1]}: topic {FLAGS.topic!r} not in {meta.get('topics')}")
    topic = tensors["topic"] == meta["topics"].index(FLAGS.topic)
    label = tensors["label"]
    if FLAGS.level == "example":
        X, groups = tensors["pooled"], np.arange(len(label))
    else:
        groups = tensors["token_example"]
        X, label, topic = tensors["scalars"], label[groups], topic[groups]
    keep = label >= 0
    opts = dict(l1=FLAGS.l1, k=FLAGS.folds, repeats=FLAGS.repeats, seed=FLAGS.seed)
    args = (X[keep], label[keep], topic[keep], groups[keep])
    result = {
        "adapters": meta.get("adapters"),
        "level": FLAGS.level,
        "tests": four_tests(*args, **opts),
        "shuffled": four_tests(*args, shuffle_labels=True, **opts),
    }
    for name, r in result["tests"].items():
        auc, null = r["auc"], result["shuffled"][name]["auc"]
        print(
            f"{name:32s} AUC {auc['mean']:.3f} [{auc['ci'][0]:.3f}, {auc['ci'][1]:.3f}]  "
            f"F1 {r['f1']['mean']:.3f}  (shuffled AUC {null['mean']:.3f})"
        )
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)
