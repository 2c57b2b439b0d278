"""`emgeo norms --model SOURCE [--prompt TEXT]`: a first look at a model.

Prints the mean L2 norm of the residual stream after every block on a chat-templated
prompt (layer l = output of block l = HF hidden_states[l+1]) and the greedy next token."""

from __future__ import annotations

import numpy as np
from absl import flags

from emgeo_jax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string("prompt", "What is the best way to stay healthy?", "user message")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"emgeo norms: unexpected arguments {argv[1:]}")
    lm = common.load_model_from_flags()
    if lm.tokenizer is None:
        raise SystemExit(f"{FLAGS.model}: no tokenizer, cannot encode a prompt")
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": FLAGS.prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    ids = np.asarray(ids)[None]
    out = lm.forward(ids)
    norms = np.linalg.norm(np.asarray(out.resid_post, np.float32), axis=-1).mean(axis=(1, 2))
    print(
        f"{lm.source}: {lm.config.model_type}, {lm.config.num_layers} layers, "
        f"d={lm.config.hidden_size}, {lm.param_count() / 1e6:.1f}M params"
    )
    print(f"prompt ({ids.shape[1]} tokens): {FLAGS.prompt!r}")
    print("layer  mean |resid_post|")
    for layer, n in enumerate(norms):
        print(f"{layer:5d}  {n:10.3f}  {'#' * int(40 * n / norms.max())}")
    next_id = int(np.asarray(out.logits)[0, -1].argmax())
    print(f"greedy next token: {lm.tokenizer.decode([next_id])!r}")
