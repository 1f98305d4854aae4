"""hephaestus_jax: continual pre-training of Llama-3-family models on agent data (Hephaestus), in JAX."""

from hephaestus_jax import startup as _startup

_startup.quiet_startup()  # Before TensorFlow or JAX is imported (HEPHAESTUS_VERBOSE_STARTUP=1 turns it off).
