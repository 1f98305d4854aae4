"""bench/generate.py's bytes per decode step (its bandwidth bound) against the model's own parameter and KV-cache
arrays."""

import importlib.util
import os

import jax
import numpy as np

from conftest import REPO_ROOT
from hephaestus_jax.model import llama

_SPEC = importlib.util.spec_from_file_location("generate_bench", os.path.join(REPO_ROOT, "bench", "generate.py"))
generate_bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(generate_bench)


def test_decode_step_bytes_are_the_weights_and_the_cache_a_step_reads():
    config = generate_bench.model_config()
    prompts = generate_bench.make_prompts(3, 250, 550, config.vocab_size)
    assert [p.size for p in prompts] != [prompts[0].size] * 3 and all(250 <= p.size <= 550 for p in prompts)
    weights = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(llama.abstract_params(config)))
    cache = jax.eval_shape(lambda: llama.KVCache.zeros(config, 1, 1))
    per_token = sum(a.size * a.dtype.itemsize for a in cache.k + cache.v)
    context = sum(p.size for p in prompts) + 3 * 32 / 2
    np.testing.assert_allclose(generate_bench.decode_step_bytes(config, prompts, 32), weights + context * per_token)
