"""Packing: token conservation, row layout, SFT masks, and packed loss == unpacked loss with the real model."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hephaestus_jax.config import ModelConfig
from hephaestus_jax.data.example import Example
from hephaestus_jax.data.packing import CONCAT, GREEDY, empty_batch, pack_documents, plan_row
from hephaestus_jax.model import llama

SEQ_LEN = 16


def make_documents(lengths, seed=0, distinct=True, vocab_size=None):
    """Documents whose tokens are globally distinct (so every pair is identifiable) with random 0/1 masks."""
    rng = np.random.default_rng(seed)
    documents, next_token = [], 1
    for length in lengths:
        if distinct:
            tokens = np.arange(next_token, next_token + length, dtype=np.int32)
            next_token += length
        else:
            tokens = rng.integers(0, vocab_size, size=length).astype(np.int32)
        mask = rng.integers(0, 2, size=length).astype(np.int32)
        documents.append(Example(tokens, mask))
    return documents


def expected_pairs(documents):
    """(input, target, weight, position) of every training pair, listed directly from the documents."""
    pairs = Counter()
    for doc in documents:
        for i in range(len(doc.tokens) - 1):
            pairs[(int(doc.tokens[i]), int(doc.tokens[i + 1]), int(doc.loss_mask[i + 1]), i)] += 1
    return pairs


def packed_pairs(batch):
    real = batch["segment_ids"] > 0
    return Counter(
        zip(
            batch["inputs"][real].tolist(),
            batch["targets"][real].tolist(),
            batch["loss_weights"][real].tolist(),
            batch["positions"][real].tolist(),
        )
    )


LENGTHS = [1, 2, 5, 16, 17, 40, 3, 9, 33, 8, 8, 2, 70, 4]  # includes 0-pair, exact-fit and multi-row documents


@pytest.mark.parametrize("mode", [CONCAT, GREEDY])
def test_every_pair_is_packed_exactly_once(mode):
    documents = make_documents(LENGTHS)
    batch = pack_documents(documents, mode, SEQ_LEN)
    assert packed_pairs(batch) == expected_pairs(documents)
    assert sum(batch["segment_ids"].ravel() > 0) == sum(len(d.tokens) - 1 for d in documents if len(d.tokens) > 1)


@pytest.mark.parametrize("mode", [CONCAT, GREEDY])
def test_row_layout(mode):
    documents = make_documents(LENGTHS, seed=1)
    batch = pack_documents(documents, mode, SEQ_LEN)
    for row in range(batch["inputs"].shape[0]):
        segments = batch["segment_ids"][row]
        real = segments > 0
        # padding only at the end, and padding carries no weight, position or token
        assert not np.any(np.diff(real.astype(int)) > 0)
        for field in ("inputs", "targets", "positions", "loss_weights"):
            assert not batch[field][row][~real].any()
        ids = segments[real]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        for segment in np.unique(ids):
            where = segments == segment
            assert np.all(np.diff(batch["positions"][row][where]) == 1)
            # within a piece the target of pair t is the input of pair t + 1
            assert np.array_equal(batch["targets"][row][where][:-1], batch["inputs"][row][where][1:])
    if mode == CONCAT:
        assert (batch["segment_ids"][:-1] > 0).all(), "every CONCAT row but the last is full"


def test_greedy_splits_only_documents_longer_than_a_row():
    documents = make_documents(LENGTHS, seed=2)
    batch = pack_documents(documents, GREEDY, SEQ_LEN)
    first_tokens = {int(d.tokens[0]): len(d.tokens) - 1 for d in documents}
    for row in range(batch["inputs"].shape[0]):
        segments = batch["segment_ids"][row]
        for segment in np.unique(segments[segments > 0]):
            where = segments == segment
            start = int(batch["positions"][row][where][0])
            if start == 0:
                pairs = first_tokens[int(batch["inputs"][row][where][0])]
                assert where.sum() == min(pairs, SEQ_LEN), "a document that fits a row is never split"
            else:
                assert start % SEQ_LEN == 0, "only documents longer than a row continue, in row-sized pieces"


def test_long_document_positions_continue_across_rows():
    (document,) = make_documents([3 * SEQ_LEN + 5])
    batch = pack_documents([document], CONCAT, SEQ_LEN)
    positions = batch["positions"][batch["segment_ids"] > 0]
    assert positions.tolist() == list(range(3 * SEQ_LEN + 4))


def test_greedy_closes_the_row_when_the_next_document_does_not_fit():
    pieces, cursor = plan_row(GREEDY, 10, (0, 0), [6, 5, 3].__getitem__, 3)
    assert [(p.document, p.start, p.count) for p in pieces] == [(0, 0, 6)] and cursor == (1, 0)
    pieces, cursor = plan_row(CONCAT, 10, (0, 0), [6, 5, 3].__getitem__, 3)
    assert [(p.document, p.start, p.count) for p in pieces] == [(0, 0, 6), (1, 0, 4)] and cursor == (1, 4)


def test_sft_masks_are_preserved():
    """Pair weights are exactly the documents' masks shifted by one, also for documents split over rows."""
    documents = make_documents([30, 7, 12, 5], seed=3)
    batch = pack_documents(documents, GREEDY, SEQ_LEN)
    by_input = {(int(t), int(p)): int(w) for t, p, w in zip(
        batch["inputs"].ravel(), batch["positions"].ravel(), batch["loss_weights"].ravel())}
    for doc in documents:
        for i in range(len(doc.tokens) - 1):
            assert by_input[(int(doc.tokens[i]), i)] == doc.loss_mask[i + 1]


def test_source_of_empty_documents_raises_instead_of_looping():
    with pytest.raises(ValueError, match="no training pair"):
        plan_row(CONCAT, 4, (0, 0), lambda j: 0)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown packing mode"):
        plan_row("sorted", 4, (0, 0), lambda j: 3)


def pair_losses(config, params, tokens, positions, segment_ids, targets):
    forward = jax.jit(llama.forward, static_argnums=0)
    logits = forward(config, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids))
    return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.asarray(targets)))


def test_packed_loss_equals_unpacked_loss_with_the_model():
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=512)
    params = llama.unbox(jax.jit(llama.init_params, static_argnums=0)(config, jax.random.key(0)))
    seq_len = 32
    documents = make_documents([9, 30, 4, 17, 12, 25, 6, 2, 31, 14], seed=4, distinct=False, vocab_size=256)
    batch = pack_documents(documents, GREEDY, seq_len)
    assert batch["inputs"].shape[0] < len(documents), "the documents are really packed"

    packed = pair_losses(config, params, batch["inputs"], batch["positions"], batch["segment_ids"], batch["targets"])
    real = batch["segment_ids"] > 0
    packed_weighted = packed * batch["loss_weights"]

    # Unpacked: one document per row from position 0, right-padded; causal attention keeps padding out of reach,
    # so every row uses plain all-ones segment ids (no segment masking involved in the reference).
    tokens = np.zeros((len(documents), seq_len + 1), np.int32)
    for row, doc in enumerate(documents):
        tokens[row, : len(doc.tokens)] = doc.tokens
    positions = np.broadcast_to(np.arange(seq_len), (len(documents), seq_len))
    unpacked = pair_losses(config, params, tokens[:, :-1], positions, np.ones_like(positions), tokens[:, 1:])
    unpacked_weighted = np.concatenate([unpacked[row, : len(doc.tokens) - 1] * doc.loss_mask[1:]
                                        for row, doc in enumerate(documents)])
    unpacked_weight = sum(int(doc.loss_mask[1:].sum()) for doc in documents)

    # GREEDY keeps document order, so the packed pairs in row-major order are the documents' pairs in order
    np.testing.assert_allclose(packed_weighted[real], unpacked_weighted, rtol=1e-5, atol=1e-5)
    assert int(batch["loss_weights"].sum()) == unpacked_weight
    np.testing.assert_allclose(packed_weighted.sum() / batch["loss_weights"].sum(),
                               unpacked_weighted.sum() / unpacked_weight, rtol=1e-5)


def test_empty_batch_is_all_padding():
    batch = empty_batch(2, 3)
    assert set(batch) == {"inputs", "targets", "positions", "segment_ids", "loss_weights"}
    assert all(a.shape == (2, 3) and a.dtype == np.int32 and not a.any() for a in batch.values())
