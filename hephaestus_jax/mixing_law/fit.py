"""The mixture study's fit: per component c, a power law in the component's effective data, its own token share
s_c (a linear function of the agent share r) plus transferred data σ_c, scaled with several sizes by training
compute C (docs/mixture_study.md):

    L_c = E_c + B_c * z_c^(-α_c),   z_c = (s_c + σ_c) / (s̄_c + σ_c) * (C / C_ref)^κ_c

The optimum r* minimises the weighted benchmark loss Σ_c w_c L_c over the swept range; its interval is the
percentile interval of r* over a residual bootstrap (whole runs resampled, all components together).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import optimize

from hephaestus_jax.mixing_law.study import MixtureStudy, RunResult, StudyError


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
