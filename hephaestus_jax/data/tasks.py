"""seqio Tasks and Mixtures over Forge data, for users of seqio's tf.data pipeline.

`register_forge_tasks(data)` registers the tasks and mixtures of `data.mixtures` (same names, files and rates)
with seqio; nothing is registered on import. Each task's source is a `ForgeDataSource`, whose `get_dataset` yields
features `targets` and `loss_mask`; training does not go through seqio (`data.mixtures.train_stream`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from hephaestus_jax.config import DataConfig
from hephaestus_jax.data import forge
from hephaestus_jax.data.example import DocumentSource
from hephaestus_jax.data.chat_format import ChatRenderer
from hephaestus_jax.data.mixtures import SPLITS, TASKS, mixture_rates, renderer_of, split_patterns
from hephaestus_jax.data.sources import expand_patterns, iter_file_examples, open_documents


class ForgeDataSource(seqio.DataSource):
    """One Forge component: split -> file patterns, read as seqio tf.data or as random-access documents.

    Each example has `targets` (int32 tokens, starting with BOS) and `loss_mask` (int32, 1 where the token is a
    training target). Documents are in file order then line order in both views; `get_dataset(shuffle=True)`
    shuffles the file order (seqio's Task then shuffles examples).
    """

    def __init__(
        self,
        component: str,
        split_patterns: Mapping[str, Sequence[str]],
        renderer: ChatRenderer,
        *,
        skip_bad_records: bool = False,
    ):
        if component not in forge.COMPONENTS:
            raise ValueError(f"unknown Forge component {component!r}; expected one of {forge.COMPONENTS}")
        super().__init__(splits=tuple(split_patterns), caching_permitted=True)
        self.component = component
        self.split_patterns = split_patterns
        self.renderer = renderer
        self.skip_bad_records = skip_bad_records
        self._documents: dict[str, DocumentSource] = {}

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def _check_split(self, split: str) -> None:
        if split not in self.split_patterns:
            raise ValueError(f"{self.component}: unknown split {split!r}; expected one of {list(self.split_patterns)}")

    def list_shards(self, split: str) -> list[str]:
        """The split's files (raises naming the pattern when one matches nothing)."""
        self._check_split(split)
        return expand_patterns(self.split_patterns[split])

    def documents(self, split: str) -> DocumentSource:
        """Random access to the split's rendered documents (opened once per split)."""
        if split not in self._documents:
            self._documents[split] = open_documents(
                self.list_shards(split), self.component, self.renderer, skip_bad_records=self.skip_bad_records
            )
        return self._documents[split]

    def num_input_examples(self, split: str) -> int:
        return len(self.documents(split))

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: Mapping[str, int] | None = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs  # seqio's Task handles these
        files = self.list_shards(split)
        if shard_info is not None:
            files = files[shard_info.index :: shard_info.num_shards]
        if shuffle:
            files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
        component, renderer, skip = self.component, self.renderer, self.skip_bad_records

        def examples():
            for path in files:
                for example in iter_file_examples(path, component, renderer, skip_bad_records=skip):
                    yield {"targets": example.tokens, "loss_mask": example.loss_mask}

        signature = {name: tf.TensorSpec([None], tf.int32) for name in ("targets", "loss_mask")}
        return tf.data.Dataset.from_generator(examples, output_signature=signature)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {
        "targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
        "loss_mask": seqio.Feature(seqio.PassThroughVocabulary(2), add_eos=False, dtype=tf.int32),
    }


def _add_task(name: str, source: ForgeDataSource, features: Mapping[str, seqio.Feature]) -> None:
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, source=source, output_features=features, preprocessors=[])


def _add_mixture(name: str, rates: Mapping[str, float]) -> None:
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(task, rate) for task, rate in rates.items() if rate > 0])


class _LazyPatterns(Mapping):
    """split -> patterns, resolved from `ForgeFiles` when read (so registering needs no data_dir)."""

    def __init__(self, data: DataConfig, task: str):
        self._data, self._task = data, task

    def __getitem__(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise KeyError(split)
        return split_patterns(self._data, self._task, split)

    def __iter__(self):
        return iter(SPLITS)

    def __len__(self) -> int:
        return len(SPLITS)


def register_forge_tasks(data: DataConfig) -> None:
    """(Re-)registers every Forge task and mixture of `data` with seqio."""
    renderer = renderer_of(data)
    features = output_features(renderer.vocab)
    for task, (component, _) in TASKS.items():
        source = ForgeDataSource(component, _LazyPatterns(data, task), renderer,
                                 skip_bad_records=data.files.skip_bad_records)
        _add_task(task, source, features)
    for mixture, rates in mixture_rates(data).items():
        _add_mixture(mixture, rates)
