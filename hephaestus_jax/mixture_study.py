"""The mixing-ratio scaling-law study: which share r of agent data minimises held-out loss (the paper: r ≈ 0.36).

    python tools/mixture_study.py --gin_file configs/mixture_study/toy.gin [--gin_param ...] [--dry_run|--fit_only]

A study gin file is a training gin file (model, mesh, data, optimizer, token budget) that also binds
`MixtureStudy`: the agent shares r to sweep, the fixed code:text ratio of the rest, the model sizes (extra gin
files and bindings per size) and the weights of the benchmark loss. For every (size, r) the study trains one model
with the train CLI in `<TrainConfig.output_dir>/<size>/agent_<r>` (the same steps x batch x seq_len for every r)
and reads its held-out loss per Forge component at the last step (the run's eval entries in metrics.jsonl, else
the evaluate CLI on the final checkpoint). A run whose final losses are recorded is skipped, so rerunning the
command resumes a study.

The fit (docs/mixture_study.md): per component c, a power law in the component's effective data, its own token
share s_c (a linear function of r) plus transferred data σ_c, scaled with several sizes by training compute C:

    L_c = E_c + B_c * z_c^(-α_c),   z_c = (s_c + σ_c) / (s̄_c + σ_c) * (C / C_ref)^κ_c

The optimum r* minimises the weighted benchmark loss Σ_c w_c L_c over the swept range; its interval is the
percentile interval of r* over a residual bootstrap (whole runs resampled, all components together). Outputs under
the study directory: mixture_study.csv (every run), mixture_study.json (fits and optima), mixture_study.png.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

import gin
import numpy as np
from etils import epath
from scipy import optimize

from hephaestus_jax import cli, command
from hephaestus_jax.config import ConfigError
from hephaestus_jax.json_lines import read_json_lines
from hephaestus_jax.metrics import training_flops_per_token

log = logging.getLogger(__name__)

DEFAULT_AGENT_SHARES = (0.0, 0.1, 0.2, 0.36, 0.5, 0.7, 0.9)
# Agent ability (tool docs and trajectories together) counts as much as code and as text: the loss of a model
# that gains agent skills while keeping its general ones. Equal weights over the three data sources of the mix.
DEFAULT_WEIGHTS = {"tool_docs": 1 / 6, "trajectories": 1 / 6, "code": 1 / 3, "text": 1 / 3}
STUDY_FILES = ("mixture_study.csv", "mixture_study.json", "mixture_study.png")
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
        cli.load_gin(list(gin_files), list(gin_params))
        study = MixtureStudy()
        base = cli.build_configs()
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
                cli.load_gin(list(files), list(params))
                configs = cli.build_configs()
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
        return [entry for _, entry in read_json_lines(file)]
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


# ------------------------------------------------------------------------------------------------ fitted family
@dataclasses.dataclass(frozen=True)
class TransferLaw:
    """Held-out loss of one component as a power law in its effective data z, in Box-Cox form:

        L = level + scale * (z^(-α) - 1) / α      (α = 0: level - scale * ln z)
        z = (s + σ) / (s_ref + σ) * (C / C_ref)^κ

    i.e. L = E + B * z^(-α) with E = level - scale / α and B = scale / α, written so that the fit stays well
    conditioned down to the logarithmic limit α -> 0. s is the component's token share; σ the data transferred from
    the base model and the other components, in units of the run's tokens (the loss stays finite at s = 0); C the
    run's training FLOPs, which multiply the effective data by (C / C_ref)^κ (κ = 0 with one compute).
    `level` is the loss at s = s_ref and C = C_ref; `scale` is -dL/d ln z there.
    """

    level: float
    scale: float
    exponent: float  # α >= 0
    offset: float  # σ > 0
    reference_share: float  # s_ref
    compute_exponent: float = 0.0  # κ
    reference_flops: float = 1.0  # C_ref

    def __call__(self, share, flops=None) -> np.ndarray:
        log_flops = 0.0 if flops is None else np.log(np.asarray(flops, dtype=float) / self.reference_flops)
        nonlinear = np.array([[self.exponent, self.offset, self.compute_exponent]])
        basis = _shape_basis(nonlinear, np.atleast_1d(np.asarray(share, dtype=float)), np.atleast_1d(log_flops),
                             self.reference_share)[0]
        losses = self.level + self.scale * basis
        return losses if np.ndim(share) or np.ndim(log_flops) else losses[0]

    @property
    def irreducible(self) -> float | None:
        """E, the loss with unlimited data of this component; None in the logarithmic limit (α < 1e-6)."""
        return self.level - self.scale / self.exponent if self.exponent >= 1e-6 else None


# Starting grid for the nonlinear parameters (the linear ones, level and scale, are solved exactly for each point:
# variable projection). α = 0 is the logarithmic law; large α and σ together reach the exponential mixing law of
# Ye et al. (2024).
_EXPONENTS = np.concatenate([[0.0], np.geomspace(0.02, 100.0, 29)])
_OFFSETS = np.geomspace(1e-3, 30.0, 30)
_COMPUTE_EXPONENTS = np.linspace(-1.0, 3.0, 11)
_GRID = np.array([(a, s, 0.0) for a in _EXPONENTS for s in _OFFSETS])
_GRID_WITH_COMPUTE = np.array([(a, s, k) for a in _EXPONENTS for s in _OFFSETS for k in _COMPUTE_EXPONENTS])
_LOWER = np.array([0.0, np.log(1e-4), -5.0])  # α, log σ, κ
_UPPER = np.array([300.0, np.log(300.0), 10.0])


def _shape_basis(nonlinear: np.ndarray, share: np.ndarray, log_flops: np.ndarray, reference_share: float
                 ) -> np.ndarray:
    """(G, n): (z^(-α) - 1) / α (or -ln z at α = 0) for G settings of (α, σ, κ) at n observations."""
    alpha, sigma, kappa = (nonlinear[:, i:i + 1] for i in range(3))
    log_z = np.log(share + sigma) - np.log(reference_share + sigma) + kappa * log_flops
    logarithmic = alpha < 1e-9
    power = np.expm1(np.minimum(-alpha * log_z, 700.0)) / np.where(logarithmic, 1.0, alpha)
    return np.where(logarithmic, -log_z, power)


def _linear_fit(basis: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each basis row g and column of y (n, S): least squares level + scale * basis -> (rss, scale, level).

    A row that is constant (to rounding) leaves scale = 0: the fit is then the mean."""
    magnitude = np.max(np.abs(basis), axis=1, keepdims=True)
    scaled = basis / np.where(magnitude > 0, magnitude, 1.0)
    mean_basis = scaled.mean(axis=1, keepdims=True)
    centred = scaled - mean_basis
    spread = np.einsum("gn,gn->g", centred, centred)
    usable = spread > 1e-20 * basis.shape[1]
    y_centred = y - y.mean(axis=0)
    cross = centred @ y_centred
    slope = np.where(usable[:, None], cross / np.where(usable, spread, 1.0)[:, None], 0.0)
    rss = np.sum(y_centred ** 2, axis=0)[None, :] - slope * cross
    intercept = y.mean(axis=0)[None, :] - slope * mean_basis
    return rss, slope / np.where(magnitude > 0, magnitude, 1.0), intercept


def fit_transfer_laws(share: np.ndarray, losses: np.ndarray, flops: np.ndarray | None = None) -> list[TransferLaw]:
    """Least-squares TransferLaw for each column of `losses` (n observations x S columns) at shares `share` (n,).

    With `flops` (n,) spanning more than one value the compute exponent κ is fitted too; otherwise κ = 0.
    A grid over (α, σ, κ) picks the start, then a bounded least-squares refinement (level and scale solved
    exactly at every step).
    """
    share = np.asarray(share, dtype=float)
    losses = np.asarray(losses, dtype=float).reshape(len(share), -1)
    with_compute = flops is not None and np.ptp(np.log(flops)) > 0
    reference_share = float(share.mean())
    reference_flops = float(np.exp(np.mean(np.log(flops)))) if with_compute else 1.0
    log_flops = np.log(np.asarray(flops, dtype=float) / reference_flops) if with_compute else np.zeros_like(share)
    grid = _GRID_WITH_COMPUTE if with_compute else _GRID
    rss, _, _ = _linear_fit(_shape_basis(grid, share, log_flops, reference_share), losses)
    starts = grid[np.argmin(rss, axis=0)]
    free = 3 if with_compute else 2

    def nonlinear(x: np.ndarray) -> np.ndarray:
        return np.array([[x[0], np.exp(x[1]), x[2] if with_compute else 0.0]])

    laws = []
    for column, start in zip(losses.T, starts):
        def residuals(x):
            basis = _shape_basis(nonlinear(x), share, log_flops, reference_share)
            _, scale, level = _linear_fit(basis, column[:, None])
            return level[0, 0] + scale[0, 0] * basis[0] - column

        x0 = np.clip(np.array([start[0], np.log(start[1]), start[2]]), _LOWER, _UPPER)[:free]
        x = optimize.least_squares(residuals, x0, bounds=(_LOWER[:free], _UPPER[:free])).x
        alpha, sigma, kappa = nonlinear(x)[0]
        _, scale, level = _linear_fit(_shape_basis(nonlinear(x), share, log_flops, reference_share), column[:, None])
        laws.append(TransferLaw(float(level[0, 0]), float(scale[0, 0]), float(alpha), float(sigma), reference_share,
                                float(kappa), reference_flops))
    return laws


LAW_PARAMETERS = 4  # level, scale, α, σ per component (+ κ when several computes are fitted together).


# --------------------------------------------------------------------------------------------------- the fit
@dataclasses.dataclass(frozen=True)
class MixtureFit:
    """Per-component laws over the agent share r (component shares are linear in r) and the weighted loss."""

    laws: Mapping[str, TransferLaw]
    share_lines: Mapping[str, tuple[float, float]]  # component -> (share at r = 0, slope): s_c = a + b * r.
    weights: Mapping[str, float]
    share_range: tuple[float, float]  # The swept r: the optimum is searched only there.
    with_compute: bool
    rmse: Mapping[str, float]

    def component_loss(self, component: str, agent_share, flops=None) -> np.ndarray:
        intercept, slope = self.share_lines[component]
        share = intercept + slope * np.asarray(agent_share, dtype=float)
        return self.laws[component](share, flops if self.with_compute else None)

    def weighted_loss(self, agent_share, flops=None) -> np.ndarray:
        return sum(w * self.component_loss(c, agent_share, flops) for c, w in self.weights.items())

    def optimum_share(self, flops=None) -> float:
        """argmin over the swept range of the weighted loss: a fine grid, then a bounded refinement."""
        low, high = self.share_range
        grid = np.linspace(low, high, 2001)
        best = int(np.argmin(self.weighted_loss(grid, flops)))
        bracket = (grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)])
        refined = optimize.minimize_scalar(lambda r: float(self.weighted_loss(r, flops)), bounds=bracket,
                                           method="bounded", options={"xatol": 1e-7})
        return float(refined.x) if refined.fun <= self.weighted_loss(grid[best], flops) else float(grid[best])


def share_lines(results: Sequence[RunResult], components: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Each component's token share as a line in r, from the runs (which must lie on one line: same ratios)."""
    r = np.array([run.agent_share for run in results])
    lines = {}
    for component in components:
        share = np.array([run.shares[component] for run in results])
        slope, intercept = np.polyfit(r, share, 1)
        if np.max(np.abs(intercept + slope * r - share)) > 1e-6:
            raise StudyError(f"the runs' {component} shares {share.tolist()} are not one linear function of the "
                             "agent share: the runs mix different code:text or tool-docs ratios")
        lines[component] = (float(intercept), float(slope))
    return lines


def _observations(results: Sequence[RunResult], components: Sequence[str]):
    r = np.array([run.agent_share for run in results])
    losses = np.array([[run.losses[c] for c in components] for run in results])
    flops = np.array([run.flops for run in results])
    return r, losses, flops


def _fit_laws(results: Sequence[RunResult], lines: Mapping[str, tuple[float, float]], losses: np.ndarray,
              with_compute: bool) -> list[dict[str, TransferLaw]]:
    """Laws for every component and every set of losses: `losses` is (n runs, components, sets)."""
    r = np.array([run.agent_share for run in results])
    flops = np.array([run.flops for run in results]) if with_compute else None
    per_component = {}
    for index, (component, (intercept, slope)) in enumerate(lines.items()):
        per_component[component] = fit_transfer_laws(intercept + slope * r, losses[:, index, :], flops)
    return [{c: laws[k] for c, laws in per_component.items()} for k in range(losses.shape[2])]


def fit_mixture(results: Sequence[RunResult], weights: Mapping[str, float], *, with_compute: bool = False
                ) -> MixtureFit:
    """One TransferLaw per component fitted to the runs' final held-out losses (compute term: with_compute)."""
    components = list(results[0].losses)
    r, observed, flops = _observations(results, components)
    lines = share_lines(results, components)
    laws = _fit_laws(results, lines, observed[:, :, None], with_compute)[0]
    fit = MixtureFit(laws, lines, dict(weights), (float(r.min()), float(r.max())), with_compute, {})
    predicted = np.stack([fit.component_loss(c, r, flops) for c in components], axis=1)
    rmse = np.sqrt(np.mean((predicted - observed) ** 2, axis=0))
    return dataclasses.replace(fit, rmse=dict(zip(components, rmse.tolist())))


@dataclasses.dataclass(frozen=True)
class Optimum:
    """The fitted optimal agent share, its bootstrap interval (None without one) and the predicted loss there."""

    agent_share: float
    low: float | None
    high: float | None
    confidence: float
    weighted_loss: float
    flops: float | None
    at_boundary: bool
    bootstrap_samples: int


def bootstrap_optimum(results: Sequence[RunResult], fit: MixtureFit, *, flops: float | None, samples: int,
                      confidence: float, seed: int) -> Optimum:
    """The fit's optimum and a residual-bootstrap percentile interval for it.

    Each replicate adds to the fitted losses the residual rows of runs drawn with replacement (a run's residuals
    move together across components: they share the model and the data order), inflated by sqrt(n / (n - p)) for
    the p fitted parameters per component, then refits every component and takes the replicate's optimum.
    """
    components = list(fit.laws)
    r, observed, run_flops = _observations(results, components)
    fitted = np.stack([fit.component_loss(c, r, run_flops) for c in components], axis=1)
    parameters = LAW_PARAMETERS + int(fit.with_compute)
    best = fit.optimum_share(flops)
    low = high = None
    if samples and len(results) > parameters:
        residuals = (observed - fitted) * math.sqrt(len(results) / (len(results) - parameters))
        draws = np.random.default_rng(seed).integers(len(results), size=(samples, len(results)))
        replicates = fitted[:, :, None] + np.moveaxis(residuals[draws], 0, -1)  # (runs, components, samples)
        optima = [dataclasses.replace(fit, laws=laws).optimum_share(flops)
                  for laws in _fit_laws(results, fit.share_lines, replicates, fit.with_compute)]
        low, high = (float(q) for q in np.quantile(optima, [(1 - confidence) / 2, (1 + confidence) / 2]))
    tolerance = 1e-3 * (fit.share_range[1] - fit.share_range[0])
    at_boundary = min(best - fit.share_range[0], fit.share_range[1] - best) <= tolerance
    return Optimum(best, low, high, confidence, float(fit.weighted_loss(best, flops)), flops, at_boundary,
                   samples if low is not None else 0)


@dataclasses.dataclass(frozen=True)
class StudyFit:
    """Per-size fits, the joint compute fit (several sizes), and the headline optimum."""

    sizes: Mapping[str, tuple[MixtureFit, Optimum] | str]  # size -> fit and optimum, or why it was not fitted.
    compute: tuple[MixtureFit, Optimum] | str | None  # None with one compute; a string says why not fitted.
    headline: Optimum | None
    headline_source: str


def fit_study(results: Sequence[RunResult], study: MixtureStudy) -> StudyFit:
    """Fit every size on its own, and all sizes together in compute when they differ in training FLOPs."""
    options = dict(samples=study.bootstrap_samples, confidence=study.confidence, seed=study.seed)
    sizes: dict[str, tuple[MixtureFit, Optimum] | str] = {}
    for size in dict.fromkeys(run.size for run in results):
        runs = [run for run in results if run.size == size]
        needed = LAW_PARAMETERS + 1
        if len({run.agent_share for run in runs}) < needed:
            sizes[size] = f"{len(runs)} measured agent shares; the fit needs at least {needed}"
            continue
        fit = fit_mixture(runs, study.weights)
        sizes[size] = (fit, bootstrap_optimum(runs, fit, flops=None, **options))
    compute: tuple[MixtureFit, Optimum] | str | None = None
    fitted_runs = [run for run in results if not isinstance(sizes[run.size], str)]
    computes = sorted({run.flops for run in fitted_runs})
    if len(computes) > 1:
        target = study.target_flops or computes[-1]
        fit = fit_mixture(fitted_runs, study.weights, with_compute=True)
        compute = (fit, bootstrap_optimum(fitted_runs, fit, flops=target, **options))
    elif len({run.flops for run in results}) > 1:
        compute = "fewer than two sizes have enough measured agent shares for the compute fit"
    if isinstance(compute, tuple):
        return StudyFit(sizes, compute, compute[1], f"compute fit at {compute[1].flops:.3g} training FLOPs")
    fitted = [(size, entry) for size, entry in sizes.items() if not isinstance(entry, str)]
    if not fitted:
        return StudyFit(sizes, compute, None, "no size has enough measured agent shares")
    size, (_, optimum) = max(fitted, key=lambda item: max(run.flops for run in results if run.size == item[0]))
    return StudyFit(sizes, compute, optimum, f"size {size}")


# ------------------------------------------------------------------------------------------------------ report
def write_csv(path: str, results: Sequence[RunResult], weights: Mapping[str, float]) -> None:
    """One row per run: size, r, component shares, model params, tokens, FLOPs, losses, weighted loss, run dir."""
    components = list(results[0].losses) if results else list(weights)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["size", "agent_share", *(f"share_{c}" for c in components), "params", "tokens", "flops",
                     *(f"loss_{c}" for c in components), "weighted_loss", "run_dir"])
    for run in results:
        writer.writerow([run.size, run.agent_share, *(run.shares[c] for c in components), run.params, run.tokens,
                         run.flops, *(run.losses[c] for c in components), run.weighted_loss(weights), run.run_dir])
    epath.Path(path).write_text(out.getvalue())


def read_csv(path: str) -> list[RunResult]:
    """The runs of a mixture_study.csv (to refit or plot without the run directories)."""
    with epath.Path(path).open() as f:
        rows = list(csv.DictReader(f))
    results = []
    for line, row in enumerate(rows, 2):
        try:
            components = [key[len("share_"):] for key in row if key.startswith("share_")]
            results.append(RunResult(row["size"], float(row["agent_share"]),
                                     {c: float(row[f"share_{c}"]) for c in components}, int(row["tokens"]),
                                     float(row["flops"]), int(row["params"]),
                                     {c: float(row[f"loss_{c}"]) for c in components}, row["run_dir"]))
        except (KeyError, ValueError, TypeError) as e:
            raise StudyError(f"{path}:{line}: bad row ({type(e).__name__}: {e})") from None
    return results


def _fit_json(fit: MixtureFit) -> dict:
    return {"laws": {c: {**dataclasses.asdict(law), "irreducible": law.irreducible} for c, law in fit.laws.items()},
            "share_lines": {c: {"at_zero": a, "slope": b} for c, (a, b) in fit.share_lines.items()},
            "rmse": dict(fit.rmse), "agent_share_range": list(fit.share_range)}


def summary(results: Sequence[RunResult], study: MixtureStudy, fitted: StudyFit) -> dict:
    """The JSON summary: settings, each size's fit and optimum, the compute fit, the headline optimum."""
    sizes = {}
    for size, entry in fitted.sizes.items():
        runs = [run for run in results if run.size == size]
        info = {"params": runs[0].params, "tokens": runs[0].tokens, "flops": runs[0].flops,
                "agent_shares": [run.agent_share for run in runs]}
        if isinstance(entry, str):
            info["not_fitted"] = entry
        else:
            info.update(_fit_json(entry[0]), optimum=dataclasses.asdict(entry[1]))
        sizes[size] = info
    if isinstance(fitted.compute, tuple):
        compute = {**_fit_json(fitted.compute[0]), "optimum": dataclasses.asdict(fitted.compute[1])}
    else:
        compute = fitted.compute
    return {
        "law": "L_c = level + scale * (z^-alpha - 1) / alpha (alpha = 0: level - scale * ln z), "
               "z = (s_c + offset) / (reference_share + offset) * (C / reference_flops)^compute_exponent",
        "weights": dict(study.weights),
        "code_text_ratio": list(study.code_text_ratio),
        "runs": len(results),
        "sizes": sizes,
        "compute_fit": compute,
        "optimum": None if fitted.headline is None else dataclasses.asdict(fitted.headline),
        "optimum_source": fitted.headline_source,
    }


def plot(path: str, results: Sequence[RunResult], weights: Mapping[str, float], fitted: StudyFit) -> None:
    """Left: weighted loss vs r per size with the fits and optima (± interval); right: each component's loss."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(13, 5))
    colours = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    grid = np.linspace(0.0, 1.0, 401)
    sizes = list(dict.fromkeys(run.size for run in results))
    components = list(results[0].losses)
    markers = "osD^v<>p*h"
    for index, size in enumerate(sizes):
        runs = [run for run in results if run.size == size]
        colour = colours[index % len(colours)]
        left.plot([run.agent_share for run in runs], [run.weighted_loss(weights) for run in runs], "o",
                  color=colour, label=f"{size} ({runs[0].flops:.2g} FLOPs)")
        for c_index, component in enumerate(components):
            right.plot([run.agent_share for run in runs], [run.losses[component] for run in runs],
                       markers[index % len(markers)], color=colours[c_index % len(colours)],
                       label=f"{component}" if index == 0 else None)
        entry = fitted.sizes.get(size)
        if isinstance(entry, tuple):
            fit, optimum = entry
            inside = grid[(grid >= fit.share_range[0]) & (grid <= fit.share_range[1])]
            left.plot(inside, fit.weighted_loss(inside), "-", color=colour)
            _mark_optimum(left, optimum, colour)
            for c_index, component in enumerate(components):
                right.plot(inside, fit.component_loss(component, inside), "-",
                           color=colours[c_index % len(colours)], alpha=0.6)
    if isinstance(fitted.compute, tuple):
        fit, optimum = fitted.compute
        inside = grid[(grid >= fit.share_range[0]) & (grid <= fit.share_range[1])]
        left.plot(inside, fit.weighted_loss(inside, optimum.flops), "--", color="black",
                  label=f"compute fit at {optimum.flops:.2g} FLOPs")
        _mark_optimum(left, optimum, "black")
    title = "no fit" if fitted.headline is None else _describe(fitted.headline)
    left.set(xlabel="agent-data share r", ylabel="weighted held-out loss (nats/token)", title=f"optimum: {title}")
    legend = ", ".join(f"{markers[i % len(markers)]} {size}" for i, size in enumerate(sizes))
    right.set(xlabel="agent-data share r", ylabel="held-out loss (nats/token)",
              title=f"per component (markers: {legend})")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    pyplot.close(figure)
    epath.Path(path).write_bytes(buffer.getvalue())


def _mark_optimum(axes, optimum: Optimum, colour: str) -> None:
    if optimum.low is not None:
        axes.axvspan(optimum.low, optimum.high, color=colour, alpha=0.12)
    axes.axvline(optimum.agent_share, color=colour, linestyle=":")


def _describe(optimum: Optimum) -> str:
    text = f"r* = {optimum.agent_share:.3f}"
    if optimum.low is not None:
        text += f" ({optimum.confidence:.0%} interval {optimum.low:.3f}-{optimum.high:.3f})"
    return text + (" at the edge of the swept range" if optimum.at_boundary else "")


def report(directory: str, results: Sequence[RunResult], study: MixtureStudy) -> tuple[StudyFit, dict]:
    """Fit, then write mixture_study.{csv,json,png} under `directory`; returns the fit and the JSON summary."""
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = (os.path.join(directory, name) for name in STUDY_FILES)
    write_csv(csv_path, results, study.weights)
    fitted = fit_study(results, study)
    info = summary(results, study, fitted)
    epath.Path(json_path).write_text(json.dumps(info, indent=2) + "\n")
    plot(png_path, results, study.weights, fitted)
    return fitted, info


# --------------------------------------------------------------------------------------------------------- CLI
@command.entry_point(prog="tools/mixture_study.py")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], required=True,
                        help="study gin file (repeatable): a training configuration that also binds MixtureStudy")
    parser.add_argument("--gin_param", action="append", default=[], help="gin binding for the study and its runs")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry_run", action="store_true", help="print each run's train command and status; run nothing")
    mode.add_argument("--fit_only", action="store_true", help="train nothing: fit and report the measured runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with command.input_errors(ValueError):  # Gin's error for a binding the dataclass does not have.
        plan = plan_study(args.gin_file, args.gin_param)
    if args.dry_run:
        for run in plan.runs:
            status = "complete" if measured_losses(plan, run) is not None else "to run"
            print(f"# {run.size} agent share {run.agent_share:.3f}: {status}, {run.tokens:,} tokens, "
                  f"{run.flops:.3g} FLOPs\n{shlex.join(run.train_command())}")
        return 0
    try:
        results = execute(plan, train=not args.fit_only)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not results:
        print("error: no run has final held-out losses yet", file=sys.stderr)
        return 1
    fitted, _ = report(plan.directory, results, plan.study)
    paths = ", ".join(os.path.join(plan.directory, name) for name in STUDY_FILES)
    if fitted.headline is None:
        print(f"no optimum ({fitted.headline_source}); wrote {paths}")
    else:
        print(f"optimal agent-data share ({fitted.headline_source}): {_describe(fitted.headline)}; "
              f"predicted weighted loss {fitted.headline.weighted_loss:.4f}. Wrote {paths}")
    return 0
