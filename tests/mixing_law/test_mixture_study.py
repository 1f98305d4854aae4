"""The mixing-ratio study: the fit recovers known optima, the sweep plan and resume logic, outputs, the toy study."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from support.cli_helpers import load_tool
from support.forge_fixture import write_forge_fixture
from hephaestus_jax.mixing_law import fit as mixture_fit, report as mixture_report
from hephaestus_jax.mixing_law import study as ms
from support.train_helpers import byte_vocab_bindings

TOY = "configs/mixture_study/toy.gin"
TPU = "configs/mixture_study/llama3_8b_v5p.gin"
WEIGHTS = {"tool_docs": 1 / 6, "trajectories": 1 / 6, "code": 1 / 3, "text": 1 / 3}
COMPONENTS = list(WEIGHTS)
SHARES = (0.0, 0.1, 0.2, 0.36, 0.5, 0.7, 0.9)
NOISE = 0.01  # nats: run-to-run noise of held-out losses, large next to the curves' spread near the optimum.


def component_shares(r):
    """Agent share r split evenly between tool docs and trajectories; code:text = 1:1."""
    return {"tool_docs": r / 2, "trajectories": r / 2, "code": (1 - r) / 2, "text": (1 - r) / 2}


# Truth 1, the fitted family: E + B * (s + sigma)^-alpha (* (C / 1e15)^-gamma) in each component's own share s.
POWER = {"tool_docs": (1.6, 0.4, 0.45, 0.03, 0.3), "trajectories": (1.2, 0.35, 0.5, 0.04, 0.25),
         "code": (0.9, 0.12, 0.5, 0.06, 0.05), "text": (2.0, 0.15, 0.4, 0.05, 0.05)}


def power_truth(r, flops=1e15):
    s = component_shares(r)
    return {c: e + b * (s[c] + sigma) ** -alpha * (flops / 1e15) ** -gamma
            for c, (e, b, alpha, sigma, gamma) in POWER.items()}


# Truth 2, another family: the exponential data mixing law of Ye et al. (2024), L_i = c_i + k_i exp(sum_j t_ij s_j).
MIXING_T = np.array([[-5.0, -2.0, 0.3, 0.2], [-2.5, -4.0, 0.2, 0.4], [0.1, 0.2, -3.0, 0.3], [0.2, 0.3, 0.4, -3.5]])
MIXING_CK = [(1.5, 1.0), (1.2, 0.8), (0.9, 0.3), (1.9, 0.35)]


def exponential_truth(r, flops=None):
    s = component_shares(r)
    shares = np.stack([np.asarray(s[c], dtype=float) for c in COMPONENTS])
    return {c: base + scale * np.exp(np.tensordot(MIXING_T[i], shares, 1))
            for i, (c, (base, scale)) in enumerate(zip(COMPONENTS, MIXING_CK))}


def true_optimum(truth, flops=1e15):
    grid = np.linspace(0.0, 0.9, 90001)
    losses = truth(grid, flops)
    return float(grid[np.argmin(sum(WEIGHTS[c] * losses[c] for c in COMPONENTS))])


def synthetic_runs(truth, seed, sizes=(("s", 1e15),), noise=NOISE):
    rng = np.random.default_rng(seed)
    runs = []
    for size, flops in sizes:
        for r in SHARES:
            losses = truth(r, flops)
            runs.append(ms.RunResult(size, r, component_shares(r), 1000, flops, 10,
                                     {c: float(losses[c] + noise * rng.standard_normal()) for c in COMPONENTS}))
    return runs


@pytest.mark.parametrize("truth, rmse", [(power_truth, 1e-6), (exponential_truth, 1e-3)],
                         ids=["fitted_family", "exponential_mixing_law"])
def test_noise_free_fit_finds_the_exact_optimum(truth, rmse):
    fit = mixture_fit.fit_mixture(synthetic_runs(truth, 0, noise=0.0), WEIGHTS)
    assert abs(fit.optimum_share() - true_optimum(truth)) < 1e-3
    assert max(fit.rmse.values()) < rmse


@pytest.mark.parametrize("truth, tolerance", [(power_truth, 0.04), (exponential_truth, 0.03)],
                         ids=["fitted_family", "exponential_mixing_law"])
def test_noisy_fit_recovers_the_optimum_and_its_interval_covers_it(truth, tolerance):
    expected = true_optimum(truth)
    assert 0.2 < expected < 0.8  # An interior optimum, away from the swept edges.
    covered = 0
    for seed in range(4):
        runs = synthetic_runs(truth, seed)
        optimum = mixture_fit.bootstrap_optimum(runs, mixture_fit.fit_mixture(runs, WEIGHTS), flops=None,
                                                samples=100, confidence=0.95, seed=seed)
        assert abs(optimum.agent_share - expected) < tolerance, (seed, optimum)
        assert optimum.low <= optimum.agent_share <= optimum.high and optimum.high - optimum.low < 0.2
        covered += optimum.low <= expected <= optimum.high
    # A 95% interval may miss now and then (on these laws the bootstrap covers ~90% of the time, docs).
    assert covered >= 3


def test_compute_fit_recovers_how_the_optimum_moves_with_compute():
    sizes = (("small", 1e14), ("medium", 1e15), ("large", 1e16))
    per_size = [true_optimum(power_truth, flops) for _, flops in sizes]
    assert per_size[0] - per_size[2] > 0.15  # Agent losses fall faster with compute: the optimum moves.
    study = ms.MixtureStudy(sizes={name: () for name, _ in sizes}, bootstrap_samples=60, weights=WEIGHTS)
    fitted = mixture_fit.fit_study(synthetic_runs(power_truth, 0, sizes), study)
    fit, optimum = fitted.compute
    assert fitted.headline is optimum and optimum.flops == 1e16
    assert abs(optimum.agent_share - per_size[2]) < 0.03
    assert optimum.low <= per_size[2] <= optimum.high
    found = [fitted.sizes[name][1].agent_share for name, _ in sizes]
    assert found == sorted(found, reverse=True)
    # The law extrapolates: ten times the largest compute moves the optimum further the same way.
    assert fit.optimum_share(1e17) < optimum.agent_share


def test_too_few_shares_are_reported_not_fitted():
    runs = [run for run in synthetic_runs(power_truth, 0) if run.agent_share in (0.1, 0.36, 0.9)]
    fitted = mixture_fit.fit_study(runs, ms.MixtureStudy(sizes={"s": ()}))
    assert fitted.headline is None and "at least 5" in fitted.sizes["s"]


def test_runs_with_different_ratios_cannot_share_one_fit():
    runs = synthetic_runs(power_truth, 0)
    runs[3] = ms.RunResult("s", 0.36, {**component_shares(0.36), "code": 0.4, "text": 0.24}, 1, 1e15, 1,
                           runs[3].losses)
    with pytest.raises(ms.StudyError, match="not one linear function"):
        mixture_fit.fit_mixture(runs, WEIGHTS)


# ------------------------------------------------------------------------------------------- plan and resume
def toy_params(study_dir, data_dir, shares, steps=3):
    return [f"TrainConfig.output_dir = {str(study_dir)!r}", f"ForgeFiles.data_dir = {str(data_dir)!r}",
            f"MixtureStudy.agent_shares = {list(shares)}", f"TrainConfig.num_steps = {steps}",
            "TrainConfig.batch_size = 8", "DataConfig.seq_len = 32",  # 8 simulated devices in tests.
            f"TrainConfig.eval_every = {steps}", f"TrainConfig.checkpoint_every = {steps}",
            "TrainConfig.eval_max_batches = 2", "TrainConfig.log_every = 1", "MixtureStudy.bootstrap_samples = 50"]


def test_plan_gives_each_share_its_directory_rates_and_the_same_budget(tmp_path):
    plan = ms.plan_study([TOY], toy_params(tmp_path / "study", tmp_path / "forge", (0.0, 0.36, 0.9), steps=10))
    assert [run.agent_share for run in plan.runs] == [0.0, 0.36, 0.9]
    assert [run.run_dir for run in plan.runs] == [str(tmp_path / "study" / "tiny" / f"agent_{r}")
                                                  for r in ("0.000", "0.360", "0.900")]
    for run in plan.runs:
        r = run.agent_share
        assert run.shares == pytest.approx({"tool_docs": r / 2, "trajectories": r / 2, "code": (1 - r) / 2,
                                            "text": (1 - r) / 2})
        assert run.tokens == 10 * 8 * 32 and run.num_steps == 10
        assert f"TrainConfig.output_dir = {run.run_dir!r}" in run.gin_params
        assert f"stage1/mixture_rates.agent = {r:g}" in run.gin_params
        assert run.train_command()[1:5] == ["-m", "hephaestus_jax.train", "--gin_file", TOY]
    assert len({run.flops for run in plan.runs}) == 1


def test_tpu_study_plans_three_sizes_from_their_own_checkpoints():
    plan = ms.plan_study([TPU], [])
    assert len(plan.runs) == 21 and plan.directory == "gs://YOUR_BUCKET/runs/mixture_study"
    by_size = {}
    for run in plan.runs:
        by_size.setdefault(run.size, []).append(run)
    assert list(by_size) == ["llama3_2_1b", "llama3_2_3b", "llama3_8b"]
    assert {run.tokens for run in plan.runs} == {1000 * 64 * 8192}
    flops = [runs[0].flops for runs in by_size.values()]
    assert flops == sorted(flops) and by_size["llama3_8b"][0].params == 8_030_261_248
    for size, runs in by_size.items():
        assert all(f"configs/model/{size}.gin" in run.gin_files for run in runs)
        assert all(any(p.startswith("TrainConfig.init_from = 'gs://") for p in run.gin_params) for run in runs)


@pytest.mark.parametrize("binding, message", [
    ("MixtureStudy.agent_shares = [0.1, 1.5]", "agent_shares must be values in"),
    ("MixtureStudy.weights = {'agent': 1.0}", "weights names"),
    ("MixtureStudy.size_bindings = {'huge': []}", "names sizes"),
    ("DataConfig.mixture = 'forge_stage2'", "DataConfig.mixture must be 'forge_stage1'"),
])
def test_configuration_errors_exit_2_naming_the_field(binding, message, capsys):
    assert load_tool("mixture_study").main(["--gin_file", TOY, "--gin_param", binding]) == 2
    assert message in capsys.readouterr().err


def write_metrics(run_dir, entries):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in entries)


def final_entries(steps, components=COMPONENTS, loss=2.0):
    return [{"step": steps, "loss": 3.0}, {"step": steps, **{f"eval/loss/forge_{c}": loss for c in components}}]


class FakeTrainer:
    """Stands in for the train and evaluate CLIs: records commands and writes what a finished run leaves."""

    def __init__(self, steps, stop_at=None, returncode=0):
        self.steps, self.stop_at, self.returncode = steps, stop_at, returncode
        self.commands = []

    def __call__(self, command, env=None):
        self.commands.append(command)
        params = [command[i + 1] for i, arg in enumerate(command) if arg == "--gin_param"]
        run_dir = [p.split(" = ")[1].strip("'") for p in params if p.startswith("TrainConfig.output_dir")][-1]
        agent = float([p.split(" = ")[1] for p in params if p.startswith("stage1/mixture_rates.agent")][-1])
        if command[2] == "hephaestus_jax.evaluate":
            output = command[command.index("--output") + 1]
            with open(output, "w") as f:
                f.write(json.dumps({"step": self.steps, **{f"eval/loss/forge_{c}": 2.5 for c in COMPONENTS}}) + "\n")
        else:
            evaluated = [c for c in COMPONENTS if agent > 0 or c in ("code", "text")]
            step = self.stop_at or self.steps
            write_metrics(run_dir, final_entries(step, evaluated) if step == self.steps else [{"step": step}])
        return subprocess.CompletedProcess(command, self.returncode)


def test_resume_skips_measured_runs_and_trains_the_rest(tmp_path, monkeypatch):
    plan = ms.plan_study([TOY], toy_params(tmp_path, tmp_path / "forge", (0.0, 0.2, 0.5, 0.9), steps=10))
    done, partial, wrong_step, fresh = plan.runs
    write_metrics(done.run_dir, final_entries(10))
    write_metrics(partial.run_dir, final_entries(10, ["code", "text"]))  # Not every component was evaluated.
    write_metrics(wrong_step.run_dir, final_entries(5))  # Evaluated mid-run, then interrupted.

    assert [result.run_dir for result in ms.execute(plan, train=False)] == [done.run_dir]

    fake = FakeTrainer(steps=10)
    monkeypatch.setattr(ms.subprocess, "run", fake)
    results = ms.execute(plan)
    train_dirs = [[p for p in c if p.startswith("TrainConfig.output_dir")][-1] for c in fake.commands]
    assert train_dirs == [f"TrainConfig.output_dir = {run.run_dir!r}" for run in (partial, wrong_step, fresh)]
    assert [r.run_dir for r in results] == [run.run_dir for run in plan.runs]
    assert results[1].losses == {c: 2.0 for c in COMPONENTS} and results[1].agent_share == 0.2

    fake.commands.clear()
    assert len(ms.execute(plan)) == 4 and fake.commands == []  # Everything measured: nothing runs.


def test_zero_agent_share_is_scored_by_the_evaluate_cli(tmp_path, monkeypatch):
    plan = ms.plan_study([TOY], toy_params(tmp_path, tmp_path / "forge", (0.0,), steps=10))
    fake = FakeTrainer(steps=10)
    monkeypatch.setattr(ms.subprocess, "run", fake)
    (result,) = ms.execute(plan)
    assert [c[2] for c in fake.commands] == ["hephaestus_jax.train", "hephaestus_jax.evaluate"]
    evaluate = fake.commands[1]
    assert "stage1/mixture_rates.agent = 1.0" in evaluate  # Every task in the evaluated mixture.
    assert evaluate[evaluate.index("--checkpoint_dir") + 1] == os.path.join(plan.runs[0].run_dir, "checkpoints")
    # The final step, on as many batches as the trainer's own evaluation reads.
    assert evaluate[evaluate.index("--step") + 1] == "10" and evaluate[evaluate.index("--max_batches") + 1] == "2"
    assert result.losses == {c: 2.5 for c in COMPONENTS}


@pytest.mark.parametrize("fake, message", [(FakeTrainer(10, returncode=1), "training failed"),
                                           (FakeTrainer(10, stop_at=4), "stopped before step 10")])
def test_failed_or_interrupted_runs_stop_the_study(tmp_path, monkeypatch, fake, message):
    plan = ms.plan_study([TOY], toy_params(tmp_path, tmp_path / "forge", (0.5,), steps=10))
    monkeypatch.setattr(ms.subprocess, "run", fake)
    with pytest.raises(ms.StudyError, match=message):
        ms.execute(plan)


# ------------------------------------------------------------------------------------------------- outputs
def test_report_writes_csv_json_and_png(tmp_path):
    from matplotlib import image

    runs = synthetic_runs(power_truth, 1, (("small", 1e14), ("large", 1e16)))
    study = ms.MixtureStudy(sizes={"small": (), "large": ()}, bootstrap_samples=30, weights=WEIGHTS)
    fitted, info = mixture_report.report(str(tmp_path), runs, study)
    back = mixture_report.read_csv(str(tmp_path / "mixture_study.csv"))
    assert back == runs
    with open(tmp_path / "mixture_study.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["weighted_loss"]) == pytest.approx(sum(WEIGHTS[c] * runs[0].losses[c] for c in COMPONENTS))
    saved = json.loads((tmp_path / "mixture_study.json").read_text())
    assert saved == json.loads(json.dumps(info))
    assert saved["optimum"]["agent_share"] == fitted.headline.agent_share
    assert saved["optimum"]["low"] <= saved["optimum"]["agent_share"] <= saved["optimum"]["high"]
    assert saved["optimum_source"].startswith("compute fit at 1e+16")
    assert set(saved["sizes"]) == {"small", "large"} and saved["sizes"]["large"]["laws"]["code"]["exponent"] > 0
    pixels = image.imread(str(tmp_path / "mixture_study.png"))
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600


def test_dry_run_prints_every_train_command(tmp_path, capsys):
    params = toy_params(tmp_path, tmp_path / "forge", (0.1, 0.9))
    argv = ["--gin_file", TOY, "--dry_run", *(a for p in params for a in ("--gin_param", p))]
    assert load_tool("mixture_study").main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("to run") == 2 and out.count("-m hephaestus_jax.train") == 2
    assert "'stage1/mixture_rates.agent = 0.9'" in out and not os.path.exists(tmp_path / "tiny")


@pytest.mark.slow
def test_toy_study_runs_end_to_end_then_resumes_without_training(tmp_path):
    write_forge_fixture(tmp_path / "forge", records_per_file=(20, 6))
    params = toy_params(tmp_path / "study", tmp_path / "forge", (0.0, 0.36, 0.9), steps=6)
    # A 512-token byte vocabulary (the 128256-row embedding and logits made each run ~3x slower) and no warm-up,
    # so that 6 steps separate the shares.
    params += [f"{key} = {value}" for key, value in byte_vocab_bindings(tmp_path).items()]
    params.append("OptimizerConfig.warmup_steps = 1")
    command = [sys.executable, "tools/mixture_study.py", "--gin_file", TOY,
               *(a for p in params for a in ("--gin_param", p))]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mixture_report.read_csv(str(tmp_path / "study" / "mixture_study.csv"))
    assert [run.agent_share for run in runs] == [0.0, 0.36, 0.9]
    assert all(np.isfinite(list(run.losses.values())).all() and set(run.losses) == set(COMPONENTS)
               for run in runs)
    # Less agent data, higher agent loss and lower code loss: the sweep measures what it should even at toy scale.
    assert runs[0].losses["trajectories"] > runs[2].losses["trajectories"]
    assert runs[0].losses["code"] < runs[2].losses["code"]
    summary = json.loads((tmp_path / "study" / "mixture_study.json").read_text())
    assert summary["optimum"] is None and "at least 5" in summary["sizes"]["tiny"]["not_fitted"]
    assert (tmp_path / "study" / "mixture_study.png").stat().st_size > 10_000

    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stderr.count("is complete; skipped") == 3, again.stderr[-3000:]
