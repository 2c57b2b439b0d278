"""emgeo-jax: the geometry of emergent misalignment, in JAX.

lm = emgeo_jax.load("default")            # or an HF folder, a .gguf, checkpoints/NAME
out = lm.forward(input_ids, attention_mask)
out.logits        # [B, T, V]
out.resid_post    # [L, B, T, D]; resid_post[l] = HF hidden_states[l + 1]

# layer l = output of decoder block l = HF hidden_states[l + 1]
steer = emgeo_jax.Steering.addition(lm, v, layers=[15], scale=4.0, positions="all")
steer = steer + emgeo_jax.Steering.ablation(lm, r, layers=None)   # None: all layers
from emgeo_jax.generate import generate   # generation is its own package
out = generate(lm, ["Hi!"], steer, max_new_tokens=64, temperature=1.0, seed=0)
pooled = lm.forward(ids, mask, taps=emgeo_jax.Taps(resid="pooled"), num_layers=16)
"""

from emgeo_jax.convert.hf import CheckpointError
from emgeo_jax.convert.load import load
from emgeo_jax.models.config import ConfigError, ModelConfig
from emgeo_jax.models.lm import LM
from emgeo_jax.models.steering import Steering
from emgeo_jax.models.taps import Taps

__all__ = ["load", "LM", "ModelConfig", "ConfigError", "CheckpointError", "Steering", "Taps"]
