"""The mixture study's outputs under the study directory: mixture_study.csv (every run), mixture_study.json
(fits and optima), mixture_study.png (losses against the agent share, with the fits)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from hephaestus_jax.mixing_law.fit import MixtureFit, Optimum, StudyFit, fit_study
from hephaestus_jax.mixing_law.study import MixtureStudy, RunResult, StudyError

STUDY_FILES = ("mixture_study.csv", "mixture_study.json", "mixture_study.png")


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
    title = "no fit" if fitted.headline is None else describe_optimum(fitted.headline)
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


def describe_optimum(optimum: Optimum) -> str:
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
