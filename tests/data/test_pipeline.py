"""Training lanes, mixing, determinism, exact resume across process counts, and the eval iterator."""

import hashlib
from collections import Counter

import numpy as np
import pytest

from hephaestus_jax.data.example import Example
from hephaestus_jax.data.packing import CONCAT, GREEDY
from hephaestus_jax.data.pipeline import EvalStream, LaneOrder, StreamComponent, StreamSpec, TrainStream, process_rows
from hephaestus_jax.data.sources import ExampleList


def distinct_documents(count, first_token, seed, min_len=2, max_len=40):
    """Documents with globally distinct tokens starting at `first_token`, random lengths and 0/1 masks."""
    rng = np.random.default_rng(seed)
    documents, token = [], first_token
    for length in rng.integers(min_len, max_len + 1, size=count):
        documents.append(Example(np.arange(token, token + length, dtype=np.int32),
                                 rng.integers(0, 2, size=length).astype(np.int32)))
        token += length
    return documents


def owner_of(documents):
    """token -> (document index, position) for documents with distinct tokens."""
    return {int(t): (d, i) for d, doc in enumerate(documents) for i, t in enumerate(doc.tokens)}


def mixture(counts=(60, 25, 9), rates=(0.5, 0.3, 0.2), packings=(CONCAT, CONCAT, GREEDY)):
    components, start = [], 1
    for c, (count, rate, packing) in enumerate(zip(counts, rates, packings)):
        documents = distinct_documents(count, start, seed=c)
        start += sum(len(d.tokens) for d in documents)
        components.append(StreamComponent(f"c{c}", ExampleList(documents), rate, packing))
    return components


def batch_digest(batch):
    digest = hashlib.sha256()
    for name in sorted(batch):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(batch[name]).tobytes())
    return digest.hexdigest()


def take(stream, steps):
    return [next(stream) for _ in range(steps)]


def test_process_rows_and_uneven_split():
    assert process_rows(8, 0, 1) == range(0, 8)
    assert [process_rows(8, p, 4) for p in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        process_rows(8, 0, 3)
    with pytest.raises(ValueError, match="does not split evenly"):
        TrainStream(mixture(), StreamSpec(global_rows=6, seq_len=8, seed=0, process_index=1, process_count=4))


@pytest.mark.parametrize("num_documents,num_lanes", [(50, 8), (3, 8), (1, 4), (8, 8)])
def test_lanes_read_disjoint_documents_and_cover_each_epoch(num_documents, num_lanes):
    order = LaneOrder("c", num_documents, num_lanes, seed=7)
    for epoch in range(3):
        positions = range(epoch * num_documents, (epoch + 1) * num_documents)
        read = [order.document(p % num_lanes, p // num_lanes) for p in positions]
        assert sorted(read) == list(range(num_documents))
    epoch0 = [order.document(p % num_lanes, p // num_lanes) for p in range(num_documents)]
    epoch1 = [order.document(p % num_lanes, p // num_lanes) for p in range(num_documents, 2 * num_documents)]
    assert num_documents < 8 or epoch0 != epoch1, "each epoch has its own permutation"
    other_seed = LaneOrder("c", num_documents, num_lanes, seed=8)
    other_epoch0 = [other_seed.document(p % num_lanes, p // num_lanes) for p in range(num_documents)]
    assert num_documents < 8 or epoch0 != other_epoch0, "the order depends on the seed"


def test_global_batch_is_the_same_for_every_process_and_thread_count():
    components = mixture()
    single = take(TrainStream(components, StreamSpec(global_rows=8, seq_len=16, seed=3, prefetch=0)), 12)
    for count, threads in ((2, 1), (4, 1), (1, 3)):
        streams = [TrainStream(components, StreamSpec(global_rows=8, seq_len=16, seed=3, process_index=p,
                                                      process_count=count, num_threads=threads))
                   for p in range(count)]
        local = [take(stream, 12) for stream in streams]
        for step in range(12):
            joined = {k: np.concatenate([local[p][step][k] for p in range(count)]) for k in single[step]}
            assert batch_digest(joined) == batch_digest(single[step])


def test_processes_read_disjoint_pairs_whose_union_is_the_single_process_set():
    documents = distinct_documents(400, 1, seed=5)
    owner = owner_of(documents)
    component = [StreamComponent("only", ExampleList(documents), 1.0, CONCAT)]

    def pairs_read(process_index, count):
        stream = TrainStream(component, StreamSpec(global_rows=8, seq_len=16, seed=1, process_index=process_index,
                                                   process_count=count))
        read = Counter()
        for batch in take(stream, 15):  # 15 rows of 16 pairs per lane: far less than the 50 documents of a lane
            read.update(owner[t] for t in batch["inputs"][batch["segment_ids"] > 0].tolist())
        return read

    reference = pairs_read(0, 1)
    assert max(reference.values()) == 1, "no pair is read twice within an epoch"
    for count in (2, 4):
        per_process = [pairs_read(p, count) for p in range(count)]
        union = sum(per_process, Counter())
        assert union == reference
        documents_per_process = [{d for d, _ in read} for read in per_process]
        for a in range(count):
            for b in range(a + 1, count):
                assert not documents_per_process[a] & documents_per_process[b]


def test_mixture_shares_match_rates_within_one_percent():
    components = mixture(counts=(80, 50, 30), rates=(0.5, 0.3, 0.2), packings=(CONCAT, GREEDY, CONCAT))
    first_token = [int(c.documents[0].tokens[0]) for c in components]
    stream = TrainStream(components, StreamSpec(global_rows=8, seq_len=64, seed=11))
    pairs = np.zeros(3)
    first_batch_components = None
    for step in range(250):
        batch = next(stream)
        row_component = np.searchsorted(first_token, batch["inputs"][:, 0], side="right") - 1
        if step == 0:
            first_batch_components = set(row_component.tolist())
        real = (batch["segment_ids"] > 0).sum(axis=1)
        np.add.at(pairs, row_component, real)
    shares = pairs / pairs.sum()
    assert np.all(np.abs(shares - np.array([0.5, 0.3, 0.2])) < 0.01), shares
    assert len(first_batch_components) > 1, "lanes do not all start on the same component"
    state_pairs = stream.get_state()[:, :, 2].sum(axis=0)
    np.testing.assert_array_equal(state_pairs, pairs)


def test_zero_rate_component_is_never_read():
    components = mixture(rates=(0.0, 1.0, 0.0))
    stream = TrainStream(components, StreamSpec(global_rows=4, seq_len=16, seed=0))
    take(stream, 20)
    state = stream.get_state()
    assert state[:, 0, 2].sum() == 0 and state[:, 2, 2].sum() == 0 and state[:, 1, 2].sum() == 20 * 4 * 16


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_reproduces_the_uninterrupted_stream(prefetch):
    components = mixture()
    spec = StreamSpec(global_rows=4, seq_len=16, seed=9)
    straight = [batch_digest(b) for b in take(TrainStream(components, spec), 30)]
    first = TrainStream(components, StreamSpec(global_rows=4, seq_len=16, seed=9, prefetch=prefetch))
    head = [batch_digest(b) for b in take(first, 11)]
    state = first.get_state()
    take(first, 2)  # batches consumed after the save do not affect the saved state
    first.close()
    resumed = TrainStream(components, StreamSpec(global_rows=4, seq_len=16, seed=9, prefetch=prefetch))
    resumed.set_state(state)
    tail = [batch_digest(b) for b in take(resumed, 19)]
    assert head + tail == straight


def test_state_describes_consumed_batches_while_prefetching():
    components = mixture()
    stream = TrainStream(components, StreamSpec(global_rows=4, seq_len=16, seed=2, prefetch=4))
    take(stream, 5)
    reference = TrainStream(components, StreamSpec(global_rows=4, seq_len=16, seed=2, prefetch=0))
    take(reference, 5)
    np.testing.assert_array_equal(stream.get_state(), reference.get_state())
    stream.set_state(reference.get_state())  # rewinding a running stream discards the prefetched batches
    assert batch_digest(next(stream)) == batch_digest(next(reference))
    stream.close()


def test_resume_two_processes_on_one_and_one_on_two():
    components = mixture()
    kwargs = dict(global_rows=8, seq_len=16, seed=4)
    straight = take(TrainStream(components, StreamSpec(**kwargs)), 25)

    two = [TrainStream(components, StreamSpec(process_index=p, process_count=2, **kwargs)) for p in range(2)]
    for stream in two:
        take(stream, 10)
    global_state = np.concatenate([stream.get_state() for stream in two])
    assert global_state.shape == two[0].global_state_shape == (8, 3, 3)
    one = TrainStream(components, StreamSpec(**kwargs))
    one.set_state(global_state)
    assert [batch_digest(b) for b in take(one, 15)] == [batch_digest(b) for b in straight[10:]]

    single = TrainStream(components, StreamSpec(**kwargs))
    take(single, 7)
    state = single.get_state()
    halves = [TrainStream(components, StreamSpec(process_index=p, process_count=2, **kwargs)) for p in range(2)]
    for p, stream in enumerate(halves):
        stream.set_state(state[p * 4 : (p + 1) * 4])
    for step in range(7, 25):
        joined = [next(stream) for stream in halves]
        merged = {k: np.concatenate([part[k] for part in joined]) for k in joined[0]}
        assert batch_digest(merged) == batch_digest(straight[step])


def test_bad_state_shape_names_the_expected_shape():
    stream = TrainStream(mixture(), StreamSpec(global_rows=4, seq_len=16, seed=0))
    with pytest.raises(ValueError, match=r"expected \(4, 3, 3\)"):
        stream.set_state(np.zeros((8, 3, 3), np.int64))


class FailingDocuments:
    def __len__(self):
        return 10

    def __getitem__(self, index):
        raise OSError(f"shard-3.arrayrecord: cannot read document {index}")


def test_reader_errors_reach_the_consumer_through_the_prefetch_thread():
    stream = TrainStream([StreamComponent("bad", FailingDocuments(), 1.0)], StreamSpec(global_rows=2, seq_len=8))
    with pytest.raises(OSError, match="shard-3.arrayrecord: cannot read document"):
        next(stream)


def test_component_without_documents_is_named():
    with pytest.raises(ValueError, match="'empty' has no documents"):
        TrainStream([StreamComponent("empty", ExampleList([]), 1.0)], StreamSpec(global_rows=2, seq_len=8, seed=0))


@pytest.mark.parametrize("packing", [CONCAT, GREEDY])
@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_stream_covers_each_document_exactly_once(packing, process_count):
    documents = distinct_documents(37, 1, seed=6, max_len=30)
    owner = owner_of(documents)
    streams = [EvalStream(ExampleList(documents), StreamSpec(global_rows=6, seq_len=16, process_index=p,
                                                             process_count=process_count), packing=packing)
               for p in range(process_count)]
    batches = [list(stream) for stream in streams]
    assert len({len(b) for b in batches}) == 1, "every process yields the same number of batches"
    if process_count > 1:
        assert len(batches[0]) == streams[0].num_batches()
    read = Counter()
    for local in batches:
        for batch in local:
            assert batch["inputs"].shape == (6 // process_count, 16)
            assert not batch["loss_weights"][batch["segment_ids"] == 0].any()
            read.update(owner[t] for t in batch["inputs"][batch["segment_ids"] > 0].tolist())
    expected = Counter((d, i) for d, doc in enumerate(documents) for i in range(len(doc.tokens) - 1))
    assert read == expected
    last = batches[0][-1]
    assert (last["segment_ids"] == 0).any(), "the last batch is padded"
