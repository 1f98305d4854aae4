"""Real multi-process runs: 2 processes x 4 CPU devices (gloo collectives) against 1 process x 8 devices."""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import REPO_ROOT
from support.forge_fixture import write_forge_fixture
from support.train_helpers import losses_by_step, run_train, tiny_gin, train_command

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(*args: str) -> list[subprocess.Popen]:
    """The train CLI as 2 cooperating processes with 4 simulated CPU devices each."""
    port = _free_port()
    processes = []
    for process_id in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "HEPHAESTUS_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "HEPHAESTUS_NUM_PROCESSES": "2",
               "HEPHAESTUS_PROCESS_ID": str(process_id), "HEPHAESTUS_BARRIER_TIMEOUT_S": "120"}
        processes.append(subprocess.Popen(train_command(*args), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    return processes


@pytest.fixture(scope="module")
def forge_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("forge")
    write_forge_fixture(root, records_per_file=(20, 6))
    return root


# A constant learning rate after warmup, so that runs of different lengths share a schedule.
PAIR = {"MeshConfig.fsdp": 4, "MeshConfig.tensor": 2, "OptimizerConfig.schedule": "'constant'"}


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, forge_root):
    """One 2-process run (fsdp=4 x tensor=2 over 2 x 4 devices, no periodic checkpoint) that only the second host
    is told to stop (SIGTERM) after 3 steps: its metrics, checkpoint and both hosts' exit status and stderr."""
    directory = tmp_path_factory.mktemp("two")
    gin_file = tiny_gin(directory, forge_root, **PAIR, **{"TrainConfig.num_steps": 1000,
                                                          "TrainConfig.checkpoint_every": 1000})
    processes = start_two_processes("--gin_file", gin_file)
    metrics = directory / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)  # Only the second host gets the notice.
    outputs = [process.communicate(timeout=300) for process in processes]
    return directory / "run", [(process.returncode, stderr) for process, (_, stderr) in zip(processes, outputs)]


def _saved_steps(run) -> list[int]:
    return [int(p) for p in os.listdir(run / "checkpoints") if p.isdigit()]


def test_sigterm_on_one_host_makes_every_host_save_the_same_step(pair_run):
    """JAX's preemption sync point: a notice on any host stops all hosts at one agreed step, saved, exit 0."""
    run, hosts = pair_run
    for returncode, stderr in hosts:
        assert returncode == 0, stderr[-3000:]
    assert "pre-flight passed on 2 processes" in hosts[0][1]
    saved = _saved_steps(run)
    assert len(saved) == 1 and 3 <= saved[0] < 1000
    assert f"saved step {saved[0]}" in hosts[0][1] and f"saved step {saved[0]}" in hosts[1][1]


def test_two_processes_match_one_process_and_their_checkpoint_resumes_on_another_mesh(tmp_path, forge_root,
                                                                                       pair_run):
    run, hosts = pair_run
    assert all(returncode == 0 for returncode, _ in hosts)
    stopped = max(_saved_steps(run))
    total = stopped + 3
    (tmp_path / "one").mkdir()
    one = tiny_gin(tmp_path / "one", forge_root, **{**PAIR, "TrainConfig.num_steps": total})
    result = run_train("--gin_file", one)
    assert result.returncode == 0, result.stderr[-3000:]
    straight = losses_by_step(tmp_path / "one" / "run" / "metrics.jsonl")
    pair = losses_by_step(run / "metrics.jsonl")
    assert sorted(pair) == list(range(1, stopped + 1))
    for step, loss in pair.items():
        assert abs(loss - straight[step]) <= 1e-6 * abs(straight[step]), (step, loss, straight[step])

    # The 2-process checkpoint continues in 1 process on a different mesh (fsdp=8), with the same losses.
    shutil.copytree(run, tmp_path / "resumed" / "run")
    resumed = tiny_gin(tmp_path / "resumed", forge_root, **{**PAIR, "TrainConfig.num_steps": total,
                                                            "MeshConfig.fsdp": 8, "MeshConfig.tensor": 1})
    result = run_train("--gin_file", resumed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    continued = losses_by_step(tmp_path / "resumed" / "run" / "metrics.jsonl")
    for step in range(stopped + 1, total + 1):
        assert abs(continued[step] - straight[step]) <= 1e-6 * abs(straight[step]), (step, continued, straight)


def test_a_missing_host_is_an_error_not_a_hang(tmp_path, forge_root):
    """Process 1 never starts: process 0 gives up after the configured timeout with a clear message."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "HEPHAESTUS_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "HEPHAESTUS_NUM_PROCESSES": "2",
           "HEPHAESTUS_PROCESS_ID": "0", "HEPHAESTUS_BARRIER_TIMEOUT_S": "10"}
    result = subprocess.run(train_command("--gin_file", tiny_gin(tmp_path, forge_root)), cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "DEADLINE" in result.stderr or "timed out" in result.stderr.lower() or "within" in result.stderr
