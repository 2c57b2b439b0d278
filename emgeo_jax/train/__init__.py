"""Model organisms in JAX: LoRA as data, supervised fine-tuning, PEFT interop, rank-1
adapter scalars and probes."""
