"""hephaestus_jax: continual pre-training of Llama-3-family models on agent data (Hephaestus), in JAX."""
