"""`emgeo geometry FILES... --out DIR`: the geometry suite on vector files.

    emgeo geometry med.safetensors med2.npy prof.pt mal.npy --layer 15 \\
        --clusters "medical=med,med2;persona=prof,mal" --out out/geometry

Names default to the file stems. Files holding `[L, D]` stacks need --layer for the main
analysis, a real layer (output of block l): a stack's rows are for the layers of its metadata
`layers` (e.g. `emgeo extract --layers 12,16`), else for 0..L-1, and a file without a row for
--layer is refused. When every file is a stack over the same layers, layer traces to
--trace_reference are drawn as well.
--activations NAME=FILE adds a mean-diff direction NAME built from pooled per-example
activations (`pooled` `[N, L, D]`, `label` `[N]`, `tokens` `[N]`: `emgeo extract --per_example`)
at --layer, which gives bootstrap intervals, label-permutation nulls, split-half reliability and
the per-layer disentanglement figure. The mean difference is token-weighted by default (as
`emgeo vectors`); `--weighting example` takes the mean of per-example means (needed for files
without `tokens`). The report records the weighting.
--pca_activations NAME=FILE adds the first principal component of the same kind of file at
--layer (unit length, sign towards its mean difference, as the demo and `emgeo vectors`),
rebuilt in every bootstrap replicate too. Directions built from the same FILE are resampled
together (one draw of its examples per replicate).
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from emgeo_jax.geometry.analyze import analyze
from emgeo_jax.geometry.independence import Thresholds
from emgeo_jax.geometry.inputs import read_example_file
from emgeo_jax.geometry.report import write_report
from emgeo_jax.vectors.io import load_layer_vectors, row_of

FLAGS = flags.FLAGS
flags.DEFINE_list("names", None, "names for the files, in order (default: file stems)")
flags.DEFINE_string("clusters", None, 'clusters, e.g. "medical=a,b;persona=c,d"')
flags.DEFINE_string("sets", None, "sets for within/between mean cosines (default: clusters)")
flags.DEFINE_integer("layer", None, "layer of [L, D] stacks to analyse (output of block L)")
flags.DEFINE_string("key", None, "tensor name inside files holding several tensors")
flags.DEFINE_integer(
    "num_layers",
    None,
    "the models' decoder-block count L: a plain [L+1, D] stack is then read as persona_vectors' "
    "hidden_states order (row 0 = embeddings, dropped); without it a plain stack is layers 0..R-1",
)
flags.DEFINE_list("activations", [], "NAME=FILE pooled activations -> mean-diff direction NAME")
flags.DEFINE_list("pca_activations", [], "NAME=FILE pooled activations -> PC1 direction NAME")
flags.DEFINE_enum("weighting", "token", ["token", "example"], "--activations mean-diff weighting")
flags.DEFINE_list("reference_pair", None, "two names for projection magnitudes (default: closest)")
flags.DEFINE_string("trace_reference", None, "reference name for layer traces (default: first)")
flags.DEFINE_string("out", None, "output directory")
flags.DEFINE_integer("n_null", 500, "Monte Carlo draws for nulls")
flags.DEFINE_integer("n_boot", 200, "bootstrap resamples of examples")
flags.DEFINE_integer("n_perm", 500, "permutations for permutation tests")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_float("cluster_angle_min_deg", 80.0, "test 1: independent if angle >= this")
flags.DEFINE_float("projection_max", 0.3, "test 2: independent if projection < this")
flags.DEFINE_float("cross_reduction_max", 0.0, "test 3: independent if reduction % < this")
flags.DEFINE_float("pc1_differential_min", 0.1, "test 4: independent if spread >= this")
flags.DEFINE_float("cross_variance_max", 0.10, "test 5: independent if cross variance < this")


def parse_groups(text: str | None, flag: str) -> dict[str, list[str]] | None:
    """ "a=x,y;b=z" -> {"a": ["x", "y"], "b": ["z"]}; errors name the flag and the part."""
    if not text:
        return None
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if "=" not in part:
            raise ValueError(f"--{flag}: '{part}' is not NAME=member,member")
        name, members = part.split("=", 1)
        out[name.strip()] = [m.strip() for m in members.split(",") if m.strip()]
    return out


def main(argv: list[str]) -> None:
    files = argv[1:]
    if not files:
        raise SystemExit("emgeo geometry: give one or more vector files")
    if not FLAGS.out:
        raise SystemExit("emgeo geometry: --out DIR is required")
    names = FLAGS.names or [Path(f).stem for f in files]
    if len(names) != len(files) or len(set(names)) != len(names):
        raise SystemExit(f"emgeo geometry: --names must give {len(files)} distinct names")
    vectors, stacks = {}, {}
    for name, f in zip(names, files, strict=True):
        vec = load_layer_vectors(f, key=FLAGS.key, num_layers=FLAGS.num_layers)
        if vec.is_stack:
            stacks[name] = vec
            if FLAGS.layer is None:
                raise SystemExit(
                    f"emgeo geometry: {f} holds [L, D] = {vec.values.shape}; pass --layer"
                )
        vectors[name] = vec.at(FLAGS.layer)
    made = {"activations": {}, "pca_activations": {}}  # flag -> name -> examples at --layer
    by_file: dict[Path, list[str]] = {}  # one extraction's directions: resampled together
    disentangle = None
    for flag, specs in (
        ("activations", FLAGS.activations),
        ("pca_activations", FLAGS.pca_activations),
    ):
        for spec in specs:
            if "=" not in spec:
                raise SystemExit(f"emgeo geometry: --{flag} '{spec}' is not NAME=FILE")
            name, f = spec.split("=", 1)
            pooled, labels, tokens, layers = read_example_file(f)
            if FLAGS.layer is None:
                raise SystemExit(f"emgeo geometry: --{flag} needs --layer")
            made[flag][name] = (pooled[:, row_of(layers, FLAGS.layer, f)], labels, tokens)
            by_file.setdefault(Path(f).resolve(), []).append(name)
            disentangle = disentangle or (pooled, labels)
    same_layers = len({s.layers for s in stacks.values()}) == 1
    traces = None
    if len(stacks) == len(files) and len(stacks) >= 2 and same_layers:
        traces = {name: s.values for name, s in stacks.items()}
    thresholds = Thresholds(
        cluster_angle_min_deg=FLAGS.cluster_angle_min_deg,
        projection_max=FLAGS.projection_max,
        cross_reduction_max=FLAGS.cross_reduction_max,
        pc1_differential_min=FLAGS.pc1_differential_min,
        cross_variance_max=FLAGS.cross_variance_max,
    )
    result = analyze(
        vectors,
        parse_groups(FLAGS.clusters, "clusters"),
        sets=parse_groups(FLAGS.sets, "sets"),
        examples=made["activations"],
        pca_examples=made["pca_activations"],
        same_examples=[names for names in by_file.values() if len(names) > 1],
        weighting=FLAGS.weighting,
        stacks=traces,
        trace_reference=FLAGS.trace_reference,
        reference_pair=FLAGS.reference_pair,
        thresholds=thresholds,
        n_null=FLAGS.n_null,
        n_boot=FLAGS.n_boot,
        n_perm=FLAGS.n_perm,
        seed=FLAGS.seed,
    )
    result["inputs"]["files"] = dict(zip(names, files, strict=True))
    result["inputs"]["layer"] = FLAGS.layer
    path = write_report(result, FLAGS.out, disentangle)
    for pair, block in result.get("independence", {}).items():
        print(f"{pair}: {block['verdict']}")
    print(f"wrote {Path(FLAGS.out) / 'geometry.json'} and {path}")
