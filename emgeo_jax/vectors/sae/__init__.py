"""Sparse autoencoders: load public SAEs (dictionary_learning, SAELens), encode/decode in jnp,
check fit on a model, select features, export directions, and train TopK/BatchTopK SAEs."""

from emgeo_jax.vectors.sae.formats import (
    hook_to_layer,
    load_dictionary_learning,
    load_sae,
    load_saelens,
    save_feature_directions,
    save_saelens,
)
from emgeo_jax.vectors.sae.model import (
    SAE,
    SAEError,
    check_fits,
    decode,
    encode,
    feature_directions,
    make_sae,
    reconstruct,
    shard_sae,
)

__all__ = [
    "SAE",
    "SAEError",
    "check_fits",
    "decode",
    "encode",
    "feature_directions",
    "hook_to_layer",
    "load_dictionary_learning",
    "load_sae",
    "load_saelens",
    "make_sae",
    "reconstruct",
    "save_feature_directions",
    "save_saelens",
    "shard_sae",
]
