"""`emgeo serve`: an OpenAI-compatible chat-completions server for a (steered) model.

    emgeo serve --model default --port 8000
    emgeo serve --model checkpoints/qwen --steer v.safetensors --layer 15 --scale 4 --port 8000
    emgeo serve --model checkpoints/qwen --variant base=none \\
        --variant evil=v.safetensors:15:4 --variant good=v.safetensors:15:-4

Binds 127.0.0.1 unless `--host` says otherwise. Without `--variant` every request is answered
with the same steering (flags shared with `emgeo generate`, see `emgeo_jax.cli.common`),
under the id `--model_name` (default `--model`), whatever `model` a request names.

`--variant NAME=FILE:LAYER:SCALE` (repeatable) serves several named variants of the model at
once: `FILE` a vector file as `--steer` reads it (`--key` picks its tensor), its vector for
`LAYER` (an int) added there times `SCALE` (a float); `NAME=none` is the unsteered model.
`/v1/models` lists the names and a request's `model` picks one (several variants: an unknown
name is a 404). `--positions` applies to every variant; the single-steering flags (`--steer`,
`--layer`, `--scale`, `--ablate`, `--ablate_layers`) and `--model_name` are refused with
`--variant`. Every variant is checked before the model loads (spelling, file, layer range,
vector width, duplicate names), with one line naming `--variant`.

Requests of different variants share generation calls (per-row steering), sampled requests
of equal settings are batched (a seeded one still samples as it would alone), and `stream:
true` is answered with server-sent events: see `emgeo_jax.serve`. `--mesh` splits the model
over devices. Stops cleanly on Ctrl-C or SIGTERM.

Several hosts (`--distributed`, as `launch/` starts it: a model too big for one host's chips,
e.g. a 70B judge on a v4-32): process 0 listens and batches the requests; each model call it
makes is sent to the other processes, which run it in step over the one mesh and answer
nobody. Stop process 0; the others end with it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags

from emgeo_jax.cli import common

FLAGS = flags.FLAGS
common.define_steering_flags()
flags.DEFINE_string("model_name", None, "model id reported by /v1/models (default: --model)")
flags.DEFINE_multi_string(
    "variant",
    None,
    "a named variant NAME=FILE:LAYER:SCALE (the vector of FILE at LAYER times SCALE) or "
    "NAME=none (unsteered); repeatable; a request's model picks one",
)
flags.DEFINE_string("host", "127.0.0.1", "address to bind (anything but loopback is public)")
flags.DEFINE_integer("port", 8000, "port to listen on (0: pick a free one)")
flags.DEFINE_integer("max_batch", 16, "most rows per generation batch")
flags.DEFINE_integer("max_tokens_cap", 4096, "largest max_tokens a request may ask for")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SINGLE_STEERING_FLAGS = ("steer", "layer", "scale", "ablate", "ablate_layers", "model_name")
VARIANT_SPELLING = "NAME=FILE:LAYER:SCALE or NAME=none"


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """One `--variant`: its name and, unless unsteered (`file` None), what to add where."""

    name: str
    file: str | None = None
    layer: int | None = None
    scale: float = 0.0


def parse_variant(text: str) -> VariantSpec:
    """`NAME=FILE:LAYER:SCALE` or `NAME=none` (FILE may itself contain ':'); a ValueError
    naming `--variant` and the spelling otherwise."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest:
        raise ValueError(f"--variant {text!r}: spell it {VARIANT_SPELLING}")
    if any(c.isspace() for c in name):
        raise ValueError(f"--variant {text!r}: the name {name!r} contains whitespace")
    if rest.strip().lower() == "none":
        return VariantSpec(name)
    parts = rest.rsplit(":", 2)
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"--variant {text!r}: spell it {VARIANT_SPELLING}")
    path, layer, scale = parts
    try:
        layer_number = int(layer)
    except ValueError:
        raise ValueError(f"--variant {text!r}: LAYER {layer!r} is not an integer") from None
    try:
        scale_number = float(scale)
    except ValueError:
        raise ValueError(f"--variant {text!r}: SCALE {scale!r} is not a number") from None
    if not math.isfinite(scale_number):
        raise ValueError(f"--variant {text!r}: SCALE {scale!r} is not finite")
    return VariantSpec(name, path, layer_number, scale_number)


def parse_variants(texts: Sequence[str]) -> list[VariantSpec]:
    """Every `--variant`, parsed; names must differ."""
    specs, seen = [], set()
    for text in texts:
        spec = parse_variant(text)
        if spec.name in seen:
            raise ValueError(f"--variant: the name {spec.name!r} is given twice")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def refuse_single_steering(args: Any) -> None:
    """With `--variant`, the single-steering flags would be ambiguous: refuse them."""
    given = [f"--{name}" for name in SINGLE_STEERING_FLAGS if args[name].present]
    if given:
        raise ValueError(
            f"--variant names every variant's steering; drop {', '.join(given)} (or give "
            "one steering with --steer/--ablate and no --variant)"
        )


def check_variants(specs: Sequence[VariantSpec], cfg: Any, key: str | None) -> None:
    """Each variant's file reads, its layer is one of the model's and the vector fits the
    model (before the model loads); errors name `--variant` and the variant."""
    from emgeo_jax.vectors.io import load_layer_vectors

    for spec in specs:
        if spec.file is None:
            continue
        where = f"--variant {spec.name}"
        if not Path(spec.file).is_file():
            raise FileNotFoundError(f"{where}: no such vector file {spec.file}")
        n = cfg.num_layers
        if not 0 <= spec.layer < n:
            raise ValueError(
                f"{where}: layer {spec.layer} out of range; the model has {n} layers (0..{n - 1})"
            )
        try:
            vec = load_layer_vectors(spec.file, key=key)
            common.check_vectors(cfg, {spec.file: vec}, [spec.layer])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def build_variants(specs: Sequence[VariantSpec], cfg: Any, key: str | None, positions: str):
    """`{name: Steering or None}` and a JSON summary of each variant."""
    from emgeo_jax.models.steering import Steering
    from emgeo_jax.vectors.io import load_layer_vectors

    variants, summary = {}, {}
    for spec in specs:
        if spec.file is None:
            variants[spec.name], summary[spec.name] = None, "none"
            continue
        vec = load_layer_vectors(spec.file, key=key)
        steering = Steering.addition(cfg, vec, layers=[spec.layer], scale=spec.scale)
        variants[spec.name] = steering.at_positions(positions)
        summary[spec.name] = dict(
            steer=spec.file, layer=spec.layer, scale=spec.scale, positions=positions
        )
    return variants, summary


def main(argv: list[str]) -> None:
    import jax

    from emgeo_jax import hosts
    from emgeo_jax.serve import ModelServer, ModelWorker

    if len(argv) > 1:
        raise SystemExit(f"emgeo serve: unexpected arguments {argv[1:]}")
    specs = None
    if FLAGS.variant:
        refuse_single_steering(FLAGS)
        specs = parse_variants(FLAGS.variant)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if FLAGS.host not in LOOPBACK:
        logging.warning("serving on %s: anyone who can reach it can use the model", FLAGS.host)
    cfg = common.read_config(FLAGS.model)
    if specs is not None:
        check_variants(specs, cfg, FLAGS.key)
    else:
        common.check_vector_files(FLAGS, cfg)
    lm = common.load_model_from_flags(config=cfg)
    kwargs: dict[str, Any] = dict(
        host=FLAGS.host,
        port=FLAGS.port,
        max_batch=FLAGS.max_batch,
        max_tokens_cap=FLAGS.max_tokens_cap,
    )
    if specs is not None:
        variants, summary = build_variants(specs, lm.config, FLAGS.key, FLAGS.positions)
        name = FLAGS.model
    else:
        steering, summary = common.build_steering(lm.config, FLAGS)
        name = FLAGS.model_name or FLAGS.model
        variants = {name: steering}
    if not hosts.is_primary():  # run process 0's model calls until it stops
        worker = ModelWorker(lm, variants=list(variants.values()), follower=True)
        worker.follow()
        print(f"process {jax.process_index()}: process 0's server stopped", flush=True)
        return
    server = ModelServer(lm, variants=variants, model_name=name, **kwargs)

    def stop(signum, frame) -> None:  # shutdown() blocks until serve_forever returns
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if specs is not None:
        names = ", ".join(server.names)
        print(f"serving variants {names} at {server.base_url} steering={summary}", flush=True)
    else:
        print(f"serving {server.model_name} at {server.base_url} steering={summary}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close(grace=2.0)  # at most the batch in flight, for at most 2 s
        w = server.worker
        print(
            f"stopped: {w.jobs_queued} requests queued, {server.refused} refused as busy "
            f"(429), {w.jobs_dropped} dropped (client hung up)",
            flush=True,
        )
        if server.worker.alive:
            # a batch still computes in the (daemon) worker thread: interpreter teardown under
            # it aborts in XLA's C++ runtime, so leave without it
            sys.stderr.flush()
            os._exit(0)
