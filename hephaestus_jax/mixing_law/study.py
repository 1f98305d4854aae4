"""The mixing-ratio scaling-law study: which share r of agent data minimises held-out loss (the paper: r ≈ 0.36).

The study's configuration, its runs and their measurement; the fit is mixing_law/fit.py, the report
mixing_law/report.py, the command tools/mixture_study.py (docs/mixture_study.md).

A study gin file is a training gin file (model, mesh, data, optimizer, token budget) that also binds
`MixtureStudy`: the agent shares r to sweep, the fixed code:text ratio of the rest, the model sizes (extra gin
files and bindings per size) and the weights of the benchmark loss. For every (size, r) the study trains one model
with the train CLI in `<TrainConfig.output_dir>/<size>/agent_<r>` (the same steps x batch x seq_len for every r)
and reads its held-out loss per Forge component at the last step (the run's eval entries in metrics.jsonl, else
the evaluate CLI on the final checkpoint). A run whose final losses are recorded is skipped, so rerunning the
command resumes a study.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

import gin
from etils import epath

from hephaestus_jax import gin_configs
from hephaestus_jax.config import ConfigError
from hephaestus_jax.json_lines import read_json_lines
from hephaestus_jax.metrics import training_flops_per_token

log = logging.getLogger(__name__)

DEFAULT_AGENT_SHARES = (0.0, 0.1, 0.2, 0.36, 0.5, 0.7, 0.9)
# Agent ability (tool docs and trajectories together) counts as much as code and as text: the loss of a model
# that gains agent skills while keeping its general ones. Equal weights over the three data sources of the mix.
DEFAULT_WEIGHTS = {"tool_docs": 1 / 6, "trajectories": 1 / 6, "code": 1 / 3, "text": 1 / 3}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class StudyError(RuntimeError):
    """A run failed, stopped early, or left no held-out losses to read."""


# ----------------------------------------------------------------------------------------------- configuration
@gin.configurable
@dataclasses.dataclass(frozen=True)
class MixtureStudy:
    """What the study sweeps and how it scores a run (bound in the study gin file).

    agent_shares: the agent-data shares r (tool docs + trajectories) to train at; code and text share 1 - r in the
        ratio code_text_ratio. The agent part splits as `stage1/mixture_rates.tool_docs_share_of_agent` says.
    sizes: name -> gin files added for that size (e.g. its model file); size_bindings: name -> gin bindings
        added for that size (e.g. its init checkpoint). Sizes are compared by training FLOPs.
    weights: component -> weight of its held-out loss in the benchmark loss (normalised to sum 1).
    bootstrap_samples, confidence, seed: the optimum's interval (0 samples: no interval).
    target_flops: training compute at which the multi-size fit reports the optimum (default: the largest swept).
    """

    agent_shares: Sequence[float] = DEFAULT_AGENT_SHARES
    code_text_ratio: Sequence[float] = (1.0, 1.0)
    sizes: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=lambda: {"base": ()})
    size_bindings: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    target_flops: float | None = None

    def __post_init__(self):
        shares = tuple(float(r) for r in self.agent_shares)
        if not shares or any(not 0 <= r <= 1 for r in shares):
            raise ConfigError(f"MixtureStudy.agent_shares must be values in [0, 1], got {list(self.agent_shares)}")
        if len({run_dir_name(r) for r in shares}) != len(shares):
            raise ConfigError(f"MixtureStudy.agent_shares must differ at 3 decimals, got {list(shares)}")
        ratio = tuple(float(x) for x in self.code_text_ratio)
        if len(ratio) != 2 or min(ratio) < 0 or sum(ratio) <= 0:
            raise ConfigError(f"MixtureStudy.code_text_ratio must be (code, text) >= 0 with a positive sum, got "
                              f"{self.code_text_ratio}")
        sizes = {name: tuple(files) for name, files in self.sizes.items()}
        if not sizes or not all(_NAME.fullmatch(name) for name in sizes):
            raise ConfigError(f"MixtureStudy.sizes needs at least one size named with letters, digits, '_', '.', "
                              f"'-' (it names a directory), got {list(self.sizes)}")
        unknown = sorted(set(self.size_bindings) - set(sizes))
        if unknown:
            raise ConfigError(f"MixtureStudy.size_bindings names sizes {unknown} that MixtureStudy.sizes lacks")
        weights = {c: float(w) for c, w in self.weights.items()}
        if min(weights.values(), default=-1) < 0 or sum(weights.values()) <= 0:
            raise ConfigError(f"MixtureStudy.weights must be >= 0 with a positive sum, got {dict(self.weights)}")
        if self.bootstrap_samples < 0 or not 0 < self.confidence < 1:
            raise ConfigError("MixtureStudy.bootstrap_samples must be >= 0 and confidence in (0, 1), got "
                              f"{self.bootstrap_samples}, {self.confidence}")
        if self.target_flops is not None and self.target_flops <= 0:
            raise ConfigError(f"MixtureStudy.target_flops must be positive, got {self.target_flops}")
        object.__setattr__(self, "agent_shares", tuple(sorted(shares)))
        object.__setattr__(self, "code_text_ratio", ratio)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "size_bindings", {k: tuple(v) for k, v in self.size_bindings.items()})
        total = sum(weights.values())
        object.__setattr__(self, "weights", {c: w / total for c, w in weights.items()})


def run_dir_name(agent_share: float) -> str:
    return f"agent_{agent_share:.3f}"


def run_bindings(run_dir: str, agent_share: float, code_text_ratio: Sequence[float]) -> list[str]:
    """The gin bindings that make one study run: its directory, no export, and the stage-I rates for r."""
    code, text = code_text_ratio
    rates = {"agent": agent_share, "code": (1 - agent_share) * code / (code + text),
             "text": (1 - agent_share) * text / (code + text)}
    return [f"TrainConfig.output_dir = {run_dir!r}", "TrainConfig.export_hf_dir = None",
            *(f"stage1/mixture_rates.{name} = {rate:.12g}" for name, rate in rates.items())]


# ------------------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One training run of the study, with what the fit needs to know about it."""

    size: str
    agent_share: float
    run_dir: str
    gin_files: tuple[str, ...]
    gin_params: tuple[str, ...]
    shares: Mapping[str, float]  # Forge component -> token share of the training mixture.
    num_steps: int
    tokens: int
    flops: float  # Training FLOPs of the whole run (forward + backward).
    params: int
    eval_max_batches: int | None  # Held-out batches per component (TrainConfig.eval_max_batches; None: all).

    def train_command(self) -> list[str]:
        return [sys.executable, "-m", "hephaestus_jax.train",
                *(a for path in self.gin_files for a in ("--gin_file", path)),
                *(a for param in self.gin_params for a in ("--gin_param", param))]


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    study: MixtureStudy
    directory: str
    runs: tuple[PlannedRun, ...]
    eval_keys: Mapping[str, str]  # Forge component -> its held-out loss key in metrics.jsonl.
    evaluate_args: tuple[str, ...]  # gin arguments for the evaluate CLI (every component in the eval mixture).


def plan_study(gin_files: Sequence[str], gin_params: Sequence[str]) -> StudyPlan:
    """Parse the study gin (MixtureStudy + a stage-I training configuration) into one run per (size, share)."""
    from hephaestus_jax.data import mixtures  # lazy: imports seqio (TensorFlow); reporting does not need it.

    try:
        gin_configs.load_gin(list(gin_files), list(gin_params))
        study = MixtureStudy()
        base = gin_configs.build_configs()
        if base.data.mixture != mixtures.STAGE1:
            raise ConfigError(f"the study sweeps the stage-I rates, so DataConfig.mixture must be "
                              f"{mixtures.STAGE1!r}, got {base.data.mixture!r}")
        unknown = sorted(set(study.weights) - set(mixtures.CPT_COMPONENTS))
        if unknown:
            raise ConfigError(f"MixtureStudy.weights names {unknown}; components are "
                              f"{list(mixtures.CPT_COMPONENTS)}")
        root = base.train.output_dir
        runs = []
        for size, size_files in study.sizes.items():
            for share in study.agent_shares:
                run_dir = os.path.join(root, size, run_dir_name(share))
                files = (*gin_files, *size_files)
                params = (*gin_params, *study.size_bindings.get(size, ()),
                          *run_bindings(run_dir, share, study.code_text_ratio))
                gin_configs.load_gin(list(files), list(params))
                configs = gin_configs.build_configs()
                shares = configs.data.stage1_rates.shares()
                tokens = configs.train.num_steps * configs.train.batch_size * configs.data.seq_len
                runs.append(PlannedRun(
                    size=size, agent_share=share, run_dir=run_dir, gin_files=files, gin_params=params,
                    shares={c: shares[c] for c in mixtures.CPT_COMPONENTS}, num_steps=configs.train.num_steps,
                    tokens=tokens, flops=tokens * training_flops_per_token(configs.model, configs.data.seq_len),
                    params=configs.model.num_params(), eval_max_batches=configs.train.eval_max_batches))
    finally:
        gin.clear_config()
    # Evaluate with every rate positive: a mixture leaves out zero-rate tasks, and r = 0 or 1 must still be scored.
    evaluate_args = ("stage1/mixture_rates.agent = 1.0", "stage1/mixture_rates.code = 1.0",
                     "stage1/mixture_rates.text = 1.0")
    keys = {c: f"eval/loss/{mixtures.task_name(c)}" for c in mixtures.CPT_COMPONENTS}
    return StudyPlan(study, root, tuple(runs), keys, evaluate_args)


# ---------------------------------------------------------------------------------------------------- measure
EVALUATION_FILE = "mixture_study_eval.jsonl"  # The evaluate CLI's result for a run, in metrics.jsonl form.


def read_entries(path: str) -> list[dict]:
    """The JSON lines of a metrics.jsonl-style file ([] when it does not exist)."""
    file = epath.Path(path)
    if not file.exists():
        return []
    try:
        return [line.value for line in read_json_lines(file)]
    except ValueError as e:
        raise StudyError(str(e)) from None


def final_heldout_losses(path: str, num_steps: int, eval_keys: Mapping[str, str]) -> dict[str, float] | None:
    """component -> held-out loss logged at step `num_steps`, or None unless every component's loss is there."""
    final: dict[str, float] = {}
    for entry in read_entries(path):
        if entry.get("step") == num_steps:
            final.update(entry)
    if not all(key in final for key in eval_keys.values()):
        return None
    return {component: float(final[key]) for component, key in eval_keys.items()}


def measured_losses(plan: StudyPlan, run: PlannedRun) -> dict[str, float] | None:
    """The run's final held-out losses: its metrics.jsonl eval entries, else the evaluate CLI's saved result."""
    for name in ("metrics.jsonl", EVALUATION_FILE):
        losses = final_heldout_losses(os.path.join(run.run_dir, name), run.num_steps, plan.eval_keys)
        if losses is not None:
            return losses
    return None


def evaluate_final_checkpoint(plan: StudyPlan, run: PlannedRun, env: Mapping[str, str] | None = None) -> None:
    """Score the final checkpoint on every component with the evaluate CLI; saved as EVALUATION_FILE.

    The CLI reads the same held-out batches as the trainer's evaluation (same gin: split, rows, seq_len; the
    same number of batches), so its losses compare with those of runs measured during training.
    """
    output = os.path.join(run.run_dir, EVALUATION_FILE)
    command = [sys.executable, "-m", "hephaestus_jax.evaluate", "loss",
               *(a for path in run.gin_files for a in ("--gin_file", path)),
               *(a for param in (*run.gin_params, *plan.evaluate_args) for a in ("--gin_param", param)),
               "--checkpoint_dir", os.path.join(run.run_dir, "checkpoints"), "--step", str(run.num_steps),
               "--output", output]
    if run.eval_max_batches:
        command += ["--max_batches", str(run.eval_max_batches)]
    log.info("evaluating %s with the evaluate CLI", run.run_dir)
    result = subprocess.run(command, env={**os.environ, **(env or {})})
    if result.returncode:
        raise StudyError(f"{run.run_dir}: the evaluate CLI failed (exit status {result.returncode}): "
                         f"{shlex.join(command)}")


def train_and_measure(plan: StudyPlan, run: PlannedRun, env: Mapping[str, str] | None = None) -> dict[str, float]:
    """Train the run (the train CLI resumes it, or returns at once when it is done), then read its losses."""
    log.info("training %s (agent share %.3f, %d steps)", run.run_dir, run.agent_share, run.num_steps)
    result = subprocess.run(run.train_command(), env={**os.environ, **(env or {})})
    if result.returncode:
        raise StudyError(f"{run.run_dir}: training failed (exit status {result.returncode}); rerun the study to "
                         "resume it")
    losses = measured_losses(plan, run)
    logged = [entry.get("step", 0) for entry in read_entries(os.path.join(run.run_dir, "metrics.jsonl"))]
    if losses is None and max(logged, default=0) == run.num_steps:
        evaluate_final_checkpoint(plan, run, env)  # Components left out of the trainer's evaluation (rate 0).
        losses = measured_losses(plan, run)
    if losses is None:
        raise StudyError(f"{run.run_dir}: stopped before step {run.num_steps} (preempted?) or left no held-out loss "
                         f"for every component ({', '.join(plan.eval_keys.values())}); rerun the study")
    return losses


def execute(plan: StudyPlan, *, train: bool = True, env: Mapping[str, str] | None = None) -> list[RunResult]:
    """Train and measure every run not yet measured (in plan order); returns the measured runs.

    With train=False nothing is started: runs without final losses are left out (with a warning).
    """
    results = []
    for run in plan.runs:
        losses = measured_losses(plan, run)
        if losses is not None:
            log.info("%s is complete; skipped", run.run_dir)
        elif train:
            losses = train_and_measure(plan, run, env)
        else:
            log.warning("%s has no final held-out losses yet; left out of the fit", run.run_dir)
            continue
        results.append(RunResult.from_plan(run, losses))
    return results


# ----------------------------------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class RunResult:
    """One measured run: where it sits in the sweep and its final held-out loss per component."""

    size: str
    agent_share: float
    shares: Mapping[str, float]
    tokens: int
    flops: float
    params: int
    losses: Mapping[str, float]
    run_dir: str = ""

    @classmethod
    def from_plan(cls, run: PlannedRun, losses: Mapping[str, float]) -> "RunResult":
        return cls(run.size, run.agent_share, dict(run.shares), run.tokens, run.flops, run.params, dict(losses),
                   run.run_dir)

    def weighted_loss(self, weights: Mapping[str, float]) -> float:
        return sum(w * self.losses[c] for c, w in weights.items())
