"""The training command: configuration errors before compiling, exact resume after kill -9, SIGTERM."""

import glob
import os
import re
import signal
import subprocess
import time

import gin
import pytest

from conftest import REPO_ROOT
from support.forge_fixture import write_forge_fixture
from support.train_helpers import losses_by_step, run_train, tiny_gin, train_command
from hephaestus_jax import gin_configs, hooks, train
from hephaestus_jax.config import MeshConfig, ModelConfig
from hephaestus_jax.metrics import read_metrics
from hephaestus_jax.sharding import check_model_fits


@pytest.fixture(scope="module")
def forge_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("forge")
    write_forge_fixture(root, records_per_file=(20, 6))
    return root


@pytest.mark.parametrize("binding, message", [
    ("TrainConfig.num_stepz = 3", "TrainConfig.num_stepz"),
    ("MeshConfig.fsdp = 3", r"data\*fsdp\*tensor = 1\*3\*1 = 3 does not match the 8 devices"),
    ("ModelConfig.num_kv_heads = 3", "num_heads=4 must be a multiple of num_kv_heads=3"),
    ("TrainConfig.batch_size = 6", r"batch_size / grad_accum_steps=6 is not divisible by data\*fsdp=8"),
    ("DataConfig.chat_format = 'template'", r"chat format 'template': the tokenizer .*byte_tokenizer.* ships no chat "
                                            "template"),
])
def test_configuration_errors_fail_before_compiling(tmp_path, forge_root, binding, message, capsys):
    returncode, stderr = _main_in_process(capsys, "--gin_file", tiny_gin(tmp_path, forge_root), "--gin_param", binding)
    assert returncode == 2, stderr[-2000:]
    assert "python -m hephaestus_jax.train: error: " in stderr
    assert re.search(message, stderr), stderr[-2000:]
    assert not os.path.exists(tmp_path / "run")


def test_missing_gin_file_is_named(tmp_path, capsys):
    returncode, stderr = _main_in_process(capsys, "--gin_file", str(tmp_path / "nope.gin"))
    assert returncode == 2 and "nope.gin: file not found" in stderr


@pytest.mark.parametrize("stage", ["sft", "stage1_cpt", "stage2_cpt"])
def test_the_stage_files_placeholders_fail_naming_the_bindings_before_anything_is_created(stage, tmp_path, capsys):
    """gs://YOUR_BUCKET left in place is one configuration line, not a DNS error from GCS: with a local
    output_dir bound, that directory is not even created."""
    output = tmp_path / "run"
    returncode, stderr = _main_in_process(
        capsys, "--gin_file", f"configs/{stage}.gin", "--gin_file", "configs/model/tiny.gin",
        "--gin_file", "configs/mesh/cpu.gin", "--gin_param", f"TrainConfig.output_dir = '{output}'")
    assert returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
    [line] = [line for line in stderr.splitlines() if "hephaestus_jax.train: error: " in line]
    assert "ForgeFiles.data_dir='gs://YOUR_BUCKET/forge'" in line and "TrainConfig.init_from='gs://YOUR_BUCKET/" in line
    assert "TrainConfig.output_dir" not in line and not output.exists()


def test_a_bfloat16_stage_trains_on_cpu_with_cpu_gin_computing_in_float32(tmp_path):
    """configs/cpu.gin makes a stage file (its gs:// placeholders included) train on the bundled Forge sample;
    a bfloat16 ModelConfig.dtype (which XLA:CPU cannot run) computes in float32, said in one line, and the
    checkpoint records the dtype as configured."""
    from hephaestus_jax.stored_checkpoint import StoredCheckpoint

    output = tmp_path / "run"
    result = run_train("--gin_file", "configs/sft.gin", "--gin_file", "configs/model/tiny.gin",
                       "--gin_file", "configs/cpu.gin", "--gin_param", "ModelConfig.dtype = 'bfloat16'",
                       "--gin_param", f"TrainConfig.output_dir = '{output}'", "--gin_param", "TrainConfig.num_steps = 2",
                       "--gin_param", "TrainConfig.log_every = 1", "--gin_param", "TrainConfig.eval_every = 0",
                       "--gin_param", "TrainConfig.batch_size = 8")  # The tests' 8 simulated CPU devices.
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("ModelConfig.dtype=bfloat16: XLA:CPU has no bf16 dot; computing in float32 on CPU") == 1
    losses = losses_by_step(output / "metrics.jsonl")
    assert sorted(losses) == [1, 2] and all(0 < loss < 20 for loss in losses.values())
    assert StoredCheckpoint(str(output / "checkpoints")).model_config.dtype == "bfloat16"


def _main_in_process(capsys, *args: str) -> tuple[int, str]:
    """The train command's exit status and stderr, run in this process (no 6 s start-up per error case)."""
    try:
        returncode = train.main(list(args))
    finally:
        gin.clear_config()
    return returncode, capsys.readouterr().err


def _config_files():
    return sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.gin"), recursive=True))


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: os.path.relpath(p, REPO_ROOT))
def test_every_gin_file_parses_and_builds(path):
    from hephaestus_jax import recipe

    if "/recipe/" in path:  # A recipe binds Recipe; each of its stages must build a training configuration.
        try:
            gin_configs.load_gin([path], [])
            stages = recipe.Recipe()
        finally:
            gin.clear_config()
        assert all(recipe.stage_steps(stages.stage_arguments(stage)) > 0 for stage in recipe.STAGES)
        return
    try:
        gin_configs.load_gin([path], [])
        if "/model/" in path:
            ModelConfig()
        elif "/mesh/" in path:
            MeshConfig()
        else:
            configs = gin_configs.build_configs()
            assert configs.train.output_dir and configs.data.mixture
    finally:
        gin.clear_config()


@pytest.mark.parametrize("model, mesh, devices", [("llama3_8b", "v5p_32", 16), ("llama3_1_8b", "v5e_256", 256),
                                                  ("llama3_70b", "v5p_128", 64), ("llama3_8b", "v4_128", 64),
                                                  ("llama3_8b", "v5p_32x2", 32)])
def test_shipped_stage_configs_fit_their_meshes(model, mesh, devices):
    try:
        gin_configs.load_gin(["configs/stage1_cpt.gin", f"configs/model/{model}.gin", f"configs/mesh/{mesh}.gin"], [])
        configs = gin_configs.build_configs()
    finally:
        gin.clear_config()
    slices = configs.mesh.num_slices
    data, fsdp, tensor = configs.mesh.ici_shape(devices // slices)
    fake_mesh = type("Mesh", (), {"shape": {"data": data * configs.mesh.dcn_data, "fsdp": fsdp, "tensor": tensor}})
    check_model_fits(configs.model, fake_mesh)
    assert configs.train.batch_size % (data * configs.mesh.dcn_data * fsdp) == 0


# The runs below share one schedule (constant after warmup), so a run's length does not change its losses.
STEPS = 24
RUN = {"TrainConfig.num_steps": STEPS, "TrainConfig.log_every": 2, "OptimizerConfig.schedule": "'constant'",
       "TrainConfig.z_loss": 1e-3}


def _wait_until(done, process: subprocess.Popen) -> None:
    """Until `done()` (or the process ended, or 300 s passed)."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not done():
        time.sleep(0.1)


def _lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _saved_steps(run) -> list[int]:
    return sorted(int(p) for p in os.listdir(run / "checkpoints") if p.isdigit()) if (run / "checkpoints").exists() \
        else []


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, forge_root):
    """One uninterrupted run: the reference losses for the interrupted run, and the run whose metrics,
    TensorBoard events, in-loop evaluations and progress bar are checked (one process for both)."""
    directory = tmp_path_factory.mktemp("straight")
    gin_file = tiny_gin(directory, forge_root, **RUN, **{
        "TrainConfig.eval_every": STEPS, "TrainConfig.eval_max_batches": 1, "TrainConfig.function_calling_limit": 1,
        "TrainConfig.function_calling_max_new_tokens": 8,
        "TrainConfig.function_calling_eval": repr(os.path.join(REPO_ROOT, "tests", "fixtures", "bfcl"))})
    result = run_train("--gin_file", gin_file)
    assert result.returncode == 0, result.stderr[-3000:]
    return directory / "run", result


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, forge_root):
    """The same run (without evaluations) killed with -9 mid-run (async checkpoints every 2 steps), resumed and
    stopped by SIGTERM (no periodic checkpoint then, and room to run), then resumed to the end."""
    directory = tmp_path_factory.mktemp("interrupted")
    gin_file = tiny_gin(directory, forge_root, **RUN, **{"TrainConfig.async_checkpointing": True})
    metrics = directory / "run" / "metrics.jsonl"
    killed = subprocess.Popen(train_command("--gin_file", gin_file), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _wait_until(lambda: _lines(metrics) >= 3 and _saved_steps(directory / "run"), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    lines_at_kill = _lines(metrics)

    stopped = subprocess.Popen(train_command("--gin_file", gin_file, "--gin_param", "TrainConfig.num_steps=1000",
                                             "--gin_param", "TrainConfig.checkpoint_every=1000"),
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_until(lambda: _lines(metrics) > lines_at_kill, stopped)
    stopped.send_signal(signal.SIGTERM)
    _, sigterm_stderr = stopped.communicate(timeout=300)
    saved = _saved_steps(directory / "run")[-1]
    # To the end, and at least 2 steps past the SIGTERM's save.
    final = run_train("--gin_file", gin_file, "--gin_param", f"TrainConfig.num_steps={max(STEPS, saved + 2)}")
    return {"lines_at_kill": lines_at_kill, "sigterm": (stopped.returncode, sigterm_stderr), "saved": saved,
            "final": final, "metrics": metrics}


def test_a_preemption_mid_window_logs_the_steps_since_the_last_log_then_saves(tmp_path, forge_root, capsys,
                                                                              monkeypatch):
    """In process, asked to stop after step 3 of a run logging every 2 steps: step 3 is logged alone, then saved."""
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # Leave pytest's own SIGTERM handler in place.
    monkeypatch.setattr(hooks.PreemptionWatcher, "should_stop", lambda self, step: step == 3)
    returncode, stderr = _main_in_process(capsys, "--gin_file", tiny_gin(tmp_path, forge_root, **RUN))
    assert returncode == 0 and "preemption requested: saved step 3" in stderr, stderr[-2000:]
    logged = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(entry["step"], entry["mean_of_steps"]) for entry in logged] == [(2, 2.0), (3, 1.0)]
    assert _saved_steps(tmp_path / "run") == [2, 3]


def _resumed_step(stderr: str) -> int:
    return int(re.findall(r"resumed from \S+/(\d+)", stderr)[-1])


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_uninterrupted_losses(straight_run, interrupted_run):
    expected = losses_by_step(straight_run[0] / "metrics.jsonl")
    assert sorted(expected) == list(range(2, STEPS + 1, 2))
    assert interrupted_run["lines_at_kill"] < STEPS // 2  # Killed mid-run, then resumed from its checkpoint.
    assert 2 <= _resumed_step(interrupted_run["sigterm"][1]) < STEPS
    final = interrupted_run["final"]
    assert final.returncode == 0, final.stderr[-3000:]
    logged = {entry["step"]: entry for entry in read_metrics(interrupted_run["metrics"]) if "loss" in entry}
    for step, loss in expected.items():
        if logged[step]["mean_of_steps"] == 2:
            assert logged[step]["loss"] == loss, step  # Bit-identical floats.
        else:  # SIGTERM stopped the run at step - 1, which logged that step alone; the resumed run logs this one.
            assert logged[step - 1]["mean_of_steps"] == logged[step]["mean_of_steps"] == 1, step
            assert (logged[step - 1]["loss"] + logged[step]["loss"]) / 2 == pytest.approx(loss, rel=1e-6), step


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_zero(interrupted_run):
    returncode, stderr = interrupted_run["sigterm"]
    saved = interrupted_run["saved"]
    assert returncode == 0, stderr[-3000:]
    assert f"preemption requested: saved step {saved}" in stderr
    assert _resumed_step(stderr) < saved < 1000  # Saved where it stopped, not by a periodic checkpoint.
    final = interrupted_run["final"]
    assert final.returncode == 0 and _resumed_step(final.stderr) == saved, final.stderr[-3000:]
    losses = losses_by_step(interrupted_run["metrics"])
    assert max(losses) == max(STEPS, saved + 2) and saved in losses  # The stop logged the steps since the last log.


@pytest.mark.slow
def test_a_run_logs_metrics_tensorboard_and_in_loop_evaluations(straight_run):
    run, result = straight_run
    entries = read_metrics(run / "metrics.jsonl")
    logged = [e for e in entries if "grad_norm" in e]
    assert [e["step"] for e in logged] == list(range(2, STEPS + 1, 2))
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_second", "step_seconds", "mfu",
                "input_wait_share"):
        assert key in logged[-1] and logged[-1][key] >= 0, key
    assert 0 < logged[-1]["mfu"] < 1 and 0 <= logged[-1]["input_wait_share"] < 1
    assert all(e["total_loss"] > e["loss"] for e in logged)  # TrainConfig.z_loss reached the step (nll + z-loss).
    evaluations = [e for e in entries if "eval/loss" in e]
    assert len(evaluations) == 1 and evaluations[0]["step"] == STEPS
    assert {"eval/loss/forge_code", "eval/loss/forge_text", "eval/function_calling/overall",
            "eval/function_calling/irrelevance"} <= set(evaluations[0])
    assert os.listdir(run / "tensorboard")
    assert f"[########################] {STEPS}/{STEPS}" in result.stderr  # The progress bar.


def test_missing_data_files_are_a_configuration_error_before_compiling(tmp_path, capsys):
    """In process (no 6 s start-up): a data_dir without the mixture's files exits 2 naming the pattern."""
    empty = tmp_path / "empty_forge"
    empty.mkdir()
    returncode, stderr = _main_in_process(capsys, "--gin_file", tiny_gin(tmp_path, empty))
    assert returncode == 2, stderr[-2000:]
    assert re.search(rf"train: error: no file matches the pattern\(s\): {empty}/\w+/train-\*\.jsonl\*", stderr), \
        stderr[-2000:]
    assert not os.path.exists(tmp_path / "run")  # Found after the run made its output_dir: removed again.


def test_a_broken_chat_template_is_one_line_naming_it_and_leaves_nothing(tmp_path, forge_root, capsys):
    """The tokenizer's own template is read from the checkpoint's files: a syntax error in it is bad input."""
    from support.train_helpers import byte_tokenizer

    tokenizer = byte_tokenizer(tmp_path)
    with open(os.path.join(tokenizer, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write("{% for m in messages %}{{ m.content }}\n{% endfor %\n")
    returncode, stderr = _main_in_process(capsys, "--gin_file", tiny_gin(tmp_path, forge_root), "--gin_param",
                                          "DataConfig.mixture = 'forge_sft'")
    assert returncode == 2, stderr[-2000:]
    [line] = [line for line in stderr.splitlines() if "hephaestus_jax.train: error: " in line]
    assert "chat_template.jinja" in line and "line 2" in line and ".jsonl" not in line  # Found on loading.
    assert not os.path.exists(tmp_path / "run")
