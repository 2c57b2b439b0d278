"""Checkpoint sources (HF folders, GGUF files, PEFT adapters) -> emgeo_jax params."""
