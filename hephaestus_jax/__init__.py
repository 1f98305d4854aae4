"""hephaestus_jax: continual pre-training of Llama-3-family models on agent data (Hephaestus), in JAX."""

import jax

# Random initialisation must not depend on how the parameters are sharded.
jax.config.update("jax_threefry_partitionable", True)
