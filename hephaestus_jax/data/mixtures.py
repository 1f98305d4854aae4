"""Forge tasks and mixtures as plain data, and the training and held-out streams read from them.

Tasks: forge_tool_docs, forge_trajectories, forge_code, forge_text, forge_sft, and the stage-II seed subsets
forge_seed_tool_docs, forge_seed_trajectories. Mixtures: forge_stage1 (tool_docs + trajectories + code + text at
`DataConfig.stage1_rates`), forge_stage2 (seed tool_docs + seed trajectories + code + text at `stage2_rates`).
Stage III trains on the task forge_sft directly. Everything comes from the `DataConfig` passed in: files, rates,
tokenizer and chat format, resolved once into a renderer (`renderer_of`). `data.tasks` registers the same tasks with seqio for tf.data users.
"""

from __future__ import annotations

from collections.abc import Mapping

from hephaestus_jax.config import DataConfig
from hephaestus_jax.data import forge
from hephaestus_jax.data.chat_format import ChatRenderer, forge_renderer
from hephaestus_jax.data.example import DocumentSource
from hephaestus_jax.data.packing import CONCAT, GREEDY
from hephaestus_jax.data.pipeline import EvalStream, StreamComponent, StreamSpec, TrainStream
from hephaestus_jax.data.sources import expand_patterns, open_documents

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


TASKS: dict[str, tuple[str, bool]] = {
    task_name(component, seed=seed): (component, seed)
    for component, seed in [(c, False) for c in forge.COMPONENTS] + [(c, True) for c in SEED_COMPONENTS]}
"""Task name -> (Forge component, whether it reads the seed subset)."""


def packing_of(component: str) -> str:
    """GREEDY for SFT (whole examples per row), CONCAT for pre-training components."""
    return GREEDY if component == "sft" else CONCAT


def mixture_rates(data: DataConfig) -> dict[str, dict[str, float]]:
    """Mixture name -> task -> share of training tokens (zero-rate tasks left out)."""
    stage1, stage2 = data.stage1_rates.shares(), data.stage2_rates.shares()
    return {
        STAGE1: {task_name(c): stage1[c] for c in CPT_COMPONENTS if stage1[c] > 0},
        STAGE2: {task_name(c, seed=c in SEED_COMPONENTS): stage2[c] for c in CPT_COMPONENTS if stage2[c] > 0},
    }


def task_rates(data: DataConfig, name: str) -> Mapping[str, float]:
    """Task -> rate of a mixture, or {name: 1} for a task; ValueError naming the known names otherwise.

    Tasks are in name order, as seqio orders a mixture's: a stream's lanes and saved state depend on the order."""
    mixtures = mixture_rates(data)
    if name in mixtures:
        return dict(sorted(mixtures[name].items()))
    if name in TASKS:
        return {name: 1.0}
    raise ValueError(f"unknown Forge task or mixture {name!r}; expected one of {sorted([*mixtures, *TASKS])}")


def split_patterns(data: DataConfig, task: str, split: str) -> list[str]:
    """The file patterns of a task's split."""
    component, seed = TASKS[task]
    return data.files.patterns(component, split, seed=seed)


def documents(data: DataConfig, task: str, split: str, renderer: ChatRenderer) -> DocumentSource:
    """Random access to a task split's rendered documents."""
    return open_documents(expand_patterns(split_patterns(data, task, split)), TASKS[task][0], renderer,
                          skip_bad_records=data.files.skip_bad_records)


def stream_components(data: DataConfig, name: str, split: str, renderer: ChatRenderer) -> list[StreamComponent]:
    """The components of a Forge task or mixture over `split`, with their token shares."""
    return [StreamComponent(task, documents(data, task, split, renderer), rate, packing_of(TASKS[task][0]))
            for task, rate in task_rates(data, name).items()]


def renderer_of(data: DataConfig) -> ChatRenderer:
    """The run's renderer: `DataConfig.tokenizer_path` and `DataConfig.chat_format`, resolved once."""
    return forge_renderer(data.tokenizer_path, data.chat_format)


def train_stream(data: DataConfig, spec: StreamSpec, *, name: str | None = None, split: str = "train",
                 renderer: ChatRenderer | None = None) -> TrainStream:
    """The deterministic, resumable training stream of `name` (default: DataConfig.mixture; this process's rows)."""
    renderer = renderer or renderer_of(data)
    return TrainStream(stream_components(data, name or data.mixture, split, renderer), spec)


def eval_streams(data: DataConfig, spec: StreamSpec, *, name: str | None = None, split: str | None = None,
                 renderer: ChatRenderer | None = None) -> dict[str, EvalStream]:
    """One finite iterator per task of `name` (default: DataConfig.eval_mixture, else .mixture) over its held-out
    split (default: DataConfig.eval_split)."""
    renderer = renderer or renderer_of(data)
    components = stream_components(data, name or data.eval_mixture or data.mixture, split or data.eval_split,
                                   renderer)
    return {component.name: EvalStream(component.documents, spec, packing=component.packing)
            for component in components}
