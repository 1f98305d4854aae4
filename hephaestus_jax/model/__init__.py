"""The Llama-3 model family."""

import jax

# Random initialisation must not depend on how the parameters are sharded.
jax.config.update("jax_threefry_partitionable", True)
