"""`emgeo serve`: an OpenAI-compatible chat-completions server for a (steered) model.

    emgeo serve --model default --port 8000
    emgeo serve --model checkpoints/qwen --steer v.safetensors --layer 15 --scale 4 --port 8000

Binds 127.0.0.1 unless `--host` says otherwise. Every request is answered with the same
steering (flags shared with `emgeo generate`, see `emgeo_jax.cli.common`); `--mesh` splits the
model over devices. Endpoints,
batching and seeds: see `emgeo_jax.serve`. Stops cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from absl import flags

from emgeo_jax.cli import common

FLAGS = flags.FLAGS
common.define_steering_flags()
flags.DEFINE_string("model_name", None, "model id reported by /v1/models (default: --model)")
flags.DEFINE_string("host", "127.0.0.1", "address to bind (anything but loopback is public)")
flags.DEFINE_integer("port", 8000, "port to listen on (0: pick a free one)")
flags.DEFINE_integer("max_batch", 16, "most rows per generation batch")
flags.DEFINE_integer("max_tokens_cap", 4096, "largest max_tokens a request may ask for")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def main(argv: list[str]) -> None:
    from emgeo_jax.serve import ModelServer

    if len(argv) > 1:
        raise SystemExit(f"emgeo serve: unexpected arguments {argv[1:]}")
    common.one_process_only(
        "serve",
        "only process 0 would receive requests, and every generation needs all of them; "
        "serve from one host with --mesh over its own devices (e.g. --mesh fsdp=8)",
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if FLAGS.host not in LOOPBACK:
        logging.warning("serving on %s: anyone who can reach it can use the model", FLAGS.host)
    cfg = common.read_config(FLAGS.model)
    common.check_vector_files(FLAGS, cfg)
    lm = common.load_model_from_flags(config=cfg)
    steering, summary = common.build_steering(lm.config, FLAGS)
    server = ModelServer(
        lm,
        steering,
        host=FLAGS.host,
        port=FLAGS.port,
        model_name=FLAGS.model_name or FLAGS.model,
        max_batch=FLAGS.max_batch,
        max_tokens_cap=FLAGS.max_tokens_cap,
    )

    def stop(signum, frame) -> None:  # shutdown() blocks until serve_forever returns
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving {server.model_name} at {server.base_url} steering={summary}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close(grace=2.0)  # at most the batch in flight, for at most 2 s
        print("stopped", flush=True)
        if server.worker.alive:
            # a batch still computes in the (daemon) worker thread: interpreter teardown under
            # it aborts in XLA's C++ runtime, so leave without it
            sys.stderr.flush()
            os._exit(0)
