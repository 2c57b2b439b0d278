"""emgeo-jax: the geometry of emergent misalignment, in JAX.

lm = emgeo_jax.load("default")            # or an HF folder, a .gguf, checkpoints/NAME
out = lm.forward(input_ids, attention_mask)
out.logits        # [B, T, V]
out.resid_post    # [L, B, T, D]; resid_post[l] = HF hidden_states[l + 1]
"""

from emgeo_jax.convert.hf import CheckpointError
from emgeo_jax.convert.load import load
from emgeo_jax.models.config import ConfigError, ModelConfig
from emgeo_jax.models.lm import LM

__all__ = ["load", "LM", "ModelConfig", "ConfigError", "CheckpointError"]
