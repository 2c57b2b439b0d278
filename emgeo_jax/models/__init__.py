"""The model core: one layer scan and one small function per use.

Read in this order:

    config.py     ModelConfig (from an HF config.json or GGUF metadata); axis names
    params.py     the one parameter table (Flax path, HF and GGUF names, partition axes,
                  LoRA module) that conversion, sharding and LoRA targets derive from
    llama.py      the blocks: RMSNorm, rotary GQA attention, SwiGLU MLP, DecoderBlock
                  (returns its named intermediates), Transformer (embedding, blocks
                  stacked or, for decoding, unstacked; head), KVCache
    attention.py  jax.nn.dot_product_attention in query chunks
    steering.py   Steering: additions and ablations as data
    taps.py       BlockOut (the capture sites) and Taps (which sites, reduced how)
    scan.py       scan_blocks: the one layer scan (unrolled over unstacked blocks);
                  LayerInputs, BlockContext, RunOptions
    lm.py         the functions per use on top of it (forward, resume_from, prefill,
                  decode_step, score_tree, train_forward), unstack_layers and `LM`, a
                  loaded model

Every function in `lm.py` is pure over `(graphdef, params)` and pytrees of arrays
(`Steering`, `Taps`, `KVCache`, `LoraInput`): changing their values never recompiles.
Layer l = output of block l = HF `hidden_states[l + 1]`. Sampling and the decode loop are
`emgeo_jax.generate`; the model knows nothing of them.
"""

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import (
    KVCache,
    LoraInput,
    cache_shapes,
    default_positions,
    init_cache,
)
from emgeo_jax.models.lm import (
    LM,
    ForwardOutput,
    decode_step,
    forward,
    prefill,
    resume_from,
    score_tree,
    train_forward,
    unstack_layers,
)
from emgeo_jax.models.scan import RunOptions
from emgeo_jax.models.steering import Steering
from emgeo_jax.models.taps import BlockOut, Taps

__all__ = [
    "LM",
    "BlockOut",
    "ForwardOutput",
    "KVCache",
    "LoraInput",
    "ModelConfig",
    "RunOptions",
    "Steering",
    "Taps",
    "decode_step",
    "default_positions",
    "forward",
    "cache_shapes",
    "init_cache",
    "prefill",
    "resume_from",
    "score_tree",
    "train_forward",
    "unstack_layers",
]
