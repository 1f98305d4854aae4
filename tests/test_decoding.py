"""Continuous batching: a prompt's greedy tokens do not depend on refilling, its slot, its neighbours, its length
bucket or compaction; each is compared with the prompt decoded alone, token for token. (Parity of the decoding
itself with transformers: tests/test_generate.py and tests/test_smollm2.py.)"""

import jax
import numpy as np
import pytest

from hephaestus_jax import decoding, inference
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.model import llama

CONFIG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=512, dtype="float32", param_dtype="float32")
LENGTHS = (3, 70, 9, 33, 1, 75, 12)  # Buckets 16, 128, 16, 64, 16, 128, 16.
MAX_NEW = 12


@pytest.fixture(scope="module")
def params():
    boxed = llama.init_params(CONFIG, jax.random.key(3))
    # Larger weights than init's 0.02, so that greedy tokens vary from step to step and prompt to prompt.
    return jax.tree.map(lambda a: a * 6 if a.ndim > 1 else a, llama.unbox(boxed))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(3, 300, n).astype(np.int32) for n in LENGTHS]


@pytest.fixture(scope="module")
def stop_ids(params, prompts):
    """Stop ids that end the prompts at different steps (some never): three tokens of the stop-free completions."""
    free = [c.tokens for c in decoding.decode(CONFIG, params, prompts, max_new_tokens=MAX_NEW, stop_ids=(),
                                              slots=len(prompts))]
    return (int(free[0][2]), int(free[3][7]), int(free[5][10]))


@pytest.fixture(scope="module")
def alone(params, prompts, stop_ids):
    """Each prompt decoded by itself: one slot, its own length bucket, no neighbours, no refill."""
    return [decoding.decode(CONFIG, params, [prompt], max_new_tokens=MAX_NEW, stop_ids=stop_ids, slots=1)[0]
            for prompt in prompts]


def test_the_prompts_stop_at_different_steps(alone, stop_ids):
    lengths = [c.tokens.size for c in alone]
    assert len(set(lengths)) >= 4 and MAX_NEW in lengths, lengths
    assert [c.stopped for c in alone] == [c.tokens[-1] in stop_ids for c in alone]


def test_refilled_slots_give_each_prompt_its_tokens_alone(params, prompts, stop_ids, alone):
    """7 prompts in 3 slots: finished rows are refilled from the queue (prompts of other lengths land in slots
    with stale keys of longer ones), in the order `complete` takes them."""
    completions = inference.complete(CONFIG, params, prompts, max_new_tokens=MAX_NEW, stop_ids=stop_ids,
                                     batch_size=3)
    for index, (ours, reference) in enumerate(zip(completions, alone)):
        expected = reference.tokens[:reference.tokens.size - reference.stopped]
        np.testing.assert_array_equal(ours, expected, err_msg=f"prompt {index}")


def test_shared_buckets_other_slots_and_compaction_do_not_change_a_row(params, prompts, stop_ids, alone):
    """Reversed order in 8 slots prefilled two at a time (a short prompt padded to its partner's bucket), the
    batch then compacted from 8 rows to 4 as rows finish."""
    order = list(reversed(range(len(prompts))))
    completions = decoding.decode(CONFIG, params, [prompts[i] for i in order], max_new_tokens=MAX_NEW,
                                  stop_ids=stop_ids, slots=8, shards=2)
    for index, ours in zip(order, completions):
        np.testing.assert_array_equal(ours.tokens, alone[index].tokens, err_msg=f"prompt {index}")
        assert ours.stopped == alone[index].stopped


def test_length_buckets():
    assert [decoding.length_bucket(n) for n in (1, 16, 17, 20, 21, 33, 250, 256, 257, 300, 550)] == [
        16, 16, 32, 32, 32, 64, 256, 256, 320, 320, 640]
