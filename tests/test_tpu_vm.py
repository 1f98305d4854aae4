"""tools/tpu_vm.py: the gcloud commands it prints, and the worker scripts run for real under bash.

No gcloud is needed: dry-run output is parsed back with shlex and compared as argument lists. The remote
scripts (setup, launch, status, logs, stop) are executed by a local bash in a fake home directory whose
PATH holds stand-ins for curl (the metadata server), git, python3.11, pip and the training entry point.
"""

import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from support.cli_helpers import load_tool

REPO = Path(__file__).resolve().parents[1]
ZONE = "us-east5-a"
TOOL = load_tool("tpu_vm")  # tools/tpu_vm.py: its argparse and main
GIN_PARAM_WITH_SPACES = "TrainConfig.run_name='a b'"
GIN_PARAM_NASTY = """Foo.msg = "it's $HOME `date` \\n" """


def dry_run(capsys, *args: str) -> list[list[str]]:
    """Run the tool with --dry_run and parse each printed line back into an argument list."""
    assert TOOL.main([*args, "--dry_run"]) == 0
    out = capsys.readouterr().out
    return [shlex.split(line) for line in out.splitlines()]


def ssh_prefix(node: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, "--zone", ZONE, f"--worker={worker}", "--command"]


def remote_command(argv: list[str], node: str, worker: str = "all") -> str:
    """The --command string of an ssh command, after checking everything before it."""
    assert argv[:-1] == ssh_prefix(node, worker)
    return argv[-1]


def detached_command(script: str) -> tuple[dict[str, str], list[str]]:
    """The environment and the argv of the training process that the launch script starts under setsid/nohup."""
    words = shlex.split(script)
    start = words.index("setsid")
    assert words[start:start + 4] == ["setsid", "nohup", "env", "PATH=$HOME/hephaestus_venv/bin:$PATH"]
    python_at = words.index("python", start)
    end = words.index(">>", python_at)
    return dict(item.split("=", 1) for item in words[start + 4:python_at]), words[python_at + 1:end]


# ---------------------------------------------------------------------------------------------- create
@pytest.mark.parametrize("accelerator, api_name, runtime", [
    ("v5p-32", "v5p-32", "v2-alpha-tpuv5"),
    ("v5e-256", "v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v4-128", "v4-128", "tpu-ubuntu2204-base"),
    ("v6e-64", "v6e-64", "v2-alpha-tpuv6e"),
])
def test_create_single_slice_uses_the_generations_runtime(capsys, accelerator, api_name, runtime):
    plan = dry_run(capsys, "create", "--name", "hx", "--zone", ZONE, "--accelerator_type", accelerator)
    assert plan == [["gcloud", "compute", "tpus", "tpu-vm", "create", "hx", "--zone", ZONE,
                     "--accelerator-type", api_name, "--version", runtime]]


def test_create_options_spot_project_and_runtime_override(capsys):
    plan = dry_run(capsys, "create", "--name", "hx", "--zone", ZONE, "--accelerator_type", "v5p-32", "--spot",
                   "--project", "my-proj", "--runtime_version", "v2-alpha-tpuv5-custom")
    assert plan == [["gcloud", "compute", "tpus", "tpu-vm", "create", "hx", "--zone", ZONE,
                     "--accelerator-type", "v5p-32", "--version", "v2-alpha-tpuv5-custom", "--spot",
                     "--project", "my-proj"]]
    plan = dry_run(capsys, "create", "--name", "hx", "--zone", ZONE, "--accelerator_type", "v4-8", "--reserved")
    assert plan[0][-1] == "--reserved"


def test_create_multislice_is_a_queued_resource(capsys):
    plan = dry_run(capsys, "create", "--name", "hx", "--zone", ZONE, "--accelerator_type", "v5p-32",
                   "--num_slices", "2")
    assert plan == [["gcloud", "compute", "tpus", "queued-resources", "create", "hx", "--zone", ZONE,
                     "--accelerator-type", "v5p-32", "--runtime-version", "v2-alpha-tpuv5",
                     "--node-count", "2", "--node-prefix", "hx"]]
    plan = dry_run(capsys, "create", "--name", "hx", "--zone", ZONE, "--accelerator_type", "v6e-256",
                   "--num_slices", "4", "--node_prefix", "slice", "--spot")
    assert plan[0][plan[0].index("--node-count"):] == ["--node-count", "4", "--node-prefix", "slice", "--spot"]


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("args, message", [
    (["create", "--accelerator_type", "v5p-31"], "v5p-31"),
    (["create", "--accelerator_type", "v9-8"], "unsupported TPU generation 'v9'"),
    (["create", "--accelerator_type", "v5e-12"], "v5e-12"),
    (["create", "--accelerator_type", "tpu"], "GENERATION-SIZE"),
    (["create", "--accelerator_type", "v5p-32", "--num_slices", "0"], "--num_slices must be at least 1"),
    (["create", "--accelerator_type", "v5p-32", "--spot", "--reserved"], "not allowed with argument"),
    (["create", "--accelerator_type", "v5p-32", "--node_prefix", "p"], "--node_prefix"),
    (["launch", "--run_name", "r1"], "--gin_file"),
    (["launch", "--run_name", "a b", "--gin_file", "c.gin"], "--run_name 'a b'"),
    (["launch", "--run_name", "r1", "--gin_file", "c.gin", "--output_dir", "/local/out"], "--output_dir"),
    (["launch", "--run_name", "r1", "--gin_file", "c.gin", "--gin_param", " "], "--gin_param must not be empty"),
    (["launch", "--run_name", "r1", "--gin_file", "c.gin", "--env", "1X=2"], "--env '1X=2'"),
    (["launch", "--run_name", "r1", "--gin_file", "c.gin", "--tpu_stderr_log_level", "7"], "0..3"),
    (["setup"], "--source_dir"),
    (["setup", "--source_dir", str(REPO), "--git_ref", "main"], "--git_ref needs --git_url"),
    (["setup", "--source_dir", "/nonexistent/checkout"], "has no setup.py"),
    (["logs", "--run_name", "r1", "--slice", "1"], "--slice '1'"),
    (["logs", "--run_name", "r1", "--worker", "first"], "--worker 'first'"),
    (["logs", "--run_name", "r1", "--lines", "0"], "--lines must be at least 1"),
    (["ssh", "--worker", "all"], "interactive ssh goes to one worker"),
    (["stop", "--run_name", "r1", "--grace_seconds", "-1"], "--grace_seconds"),
])
def test_invalid_options_fail_before_printing_anything(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        TOOL.main([*args, "--name", "hx", "--zone", ZONE, "--dry_run"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


@pytest.mark.parametrize("flag, value", [("--name", "My_TPU"), ("--zone", "us-east5")])
def test_invalid_names_are_rejected(capsys, flag, value):
    args = {"--name": "hx", "--zone": ZONE, flag: value}
    with pytest.raises(SystemExit):
        TOOL.main(["delete", "--name", args["--name"], "--zone", args["--zone"], "--dry_run"])
    captured = capsys.readouterr()
    assert captured.out == "" and f"{flag} {value!r}" in captured.err


# ---------------------------------------------------------------------------------------------- setup
def test_setup_from_git_runs_on_every_slice(capsys):
    plan = dry_run(capsys, "setup", "--name", "hx", "--zone", ZONE, "--num_slices", "2",
                   "--git_url", "https://example.com/hephaestus_jax.git", "--git_ref", "v1.2")
    assert len(plan) == 2
    scripts = [remote_command(argv, node) for argv, node in zip(plan, ["hx-0", "hx-1"])]
    assert scripts[0] == scripts[1]
    words = shlex.split(scripts[0])
    clone = ["git", "clone", "--quiet", "https://example.com/hephaestus_jax.git", "hephaestus_jax"]
    checkout = ["git", "-C", "hephaestus_jax", "checkout", "--quiet", "v1.2"]
    for expected in (clone, checkout, ["-e", ".[tpu]"]):
        assert any(words[i:i + len(expected)] == expected for i in range(len(words))), expected


def test_setup_from_source_dir_tars_copies_then_installs(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    source = tmp_path / "checkout"
    (source / "pkg" / "__pycache__").mkdir(parents=True)
    (source / ".git").mkdir()
    (source / "venv" / "bin").mkdir(parents=True)
    for name in ("setup.py", "pkg/a.py", "pkg/__pycache__/a.cpython-311.pyc", ".git/HEAD", "venv/bin/python"):
        (source / name).write_text(name)

    plan = dry_run(capsys, "setup", "--name", "hx", "--zone", ZONE, "--source_dir", str(source))
    assert len(plan) == 3
    archive = str(tmp_path / "hephaestus_jax-hx.tar.gz")
    assert plan[0][:3] == ["tar", "-czf", archive] and plan[0][-3:] == ["-C", str(source), "."]
    assert plan[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "hx:hephaestus_jax-src.tar.gz",
                       "--zone", ZONE, "--worker=all"]
    script = remote_command(plan[2], "hx")

    subprocess.run(plan[0], check=True)  # The local step runs for real; scp is a copy into the fake home.
    home = make_fake_home(tmp_path)
    (home / "hephaestus_jax-src.tar.gz").write_bytes(Path(archive).read_bytes())
    (home / "hephaestus_jax").mkdir()
    (home / "hephaestus_jax" / "stale.py").write_text("left from an earlier setup")
    result = run_remote(home, script)
    assert result.returncode == 0, result.stderr

    project = home / "hephaestus_jax"
    files = sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file())
    assert files == ["pkg/a.py", "setup.py"]
    assert not (home / "hephaestus_jax-src.tar.gz").exists()
    assert (home / "pip.log").read_text().splitlines() == [
        f"{home} install --quiet --upgrade pip", f"{project} install --quiet -e .[tpu]"]


def test_setup_git_script_clones_checks_out_and_installs(capsys, tmp_path):
    plan = dry_run(capsys, "setup", "--name", "hx", "--zone", ZONE, "--git_url", "git@example.com:me/hx.git",
                   "--git_ref", "feature/x")
    home = make_fake_home(tmp_path)
    result = run_remote(home, remote_command(plan[0], "hx"))
    assert result.returncode == 0, result.stderr
    project = home / "hephaestus_jax"
    assert (project / "cloned_from").read_text() == "git@example.com:me/hx.git\n"
    assert (project / "checked_out").read_text() == "feature/x\n"
    assert (home / "pip.log").read_text().splitlines()[-1] == f"{project} install --quiet -e .[tpu]"


def test_setup_installs_python_with_apt_when_venv_fails(capsys, tmp_path):
    plan = dry_run(capsys, "setup", "--name", "hx", "--zone", ZONE, "--git_url", "https://example.com/r.git")
    home = make_fake_home(tmp_path, python_installed=False)
    result = run_remote(home, remote_command(plan[0], "hx"))
    assert result.returncode == 0, result.stderr
    sudo_calls = (home / "sudo.log").read_text().splitlines()
    assert sudo_calls[-1].endswith("install -y -qq python3.11 python3.11-venv")
    assert (home / "hephaestus_venv" / "bin" / "pip").exists()


# ---------------------------------------------------------------------------------------------- launch
LAUNCH_ARGS = ("launch", "--name", "hx", "--zone", ZONE, "--run_name", "cpt1",
               "--gin_file", "configs/stage1_cpt.gin", "--gin_file", "configs/model/llama3_8b.gin",
               "--gin_param", GIN_PARAM_WITH_SPACES, "--gin_param", GIN_PARAM_NASTY,
               "--output_dir", "gs://my-bucket/runs", "--libtpu_init_args", '--xla_foo=1 --xla_bar="a b"',
               "--env", "XLA_FLAGS=--xla_dump_to=/tmp/dump x")
EXPECTED_TRAIN_ARGV = [
    "-m", "hephaestus_jax.train",
    "--gin_file", "configs/stage1_cpt.gin", "--gin_file", "configs/model/llama3_8b.gin",
    "--gin_param", 'TrainConfig.run_name = "cpt1"',
    "--gin_param", 'TrainConfig.output_dir = "gs://my-bucket/runs"',
    "--gin_param", GIN_PARAM_WITH_SPACES, "--gin_param", GIN_PARAM_NASTY,
]
EXPECTED_ENV = {"HEPHAESTUS_DISTRIBUTED": "auto", "TPU_STDERR_LOG_LEVEL": "2", "LIBTPU_INIT_ARGS": '--xla_foo=1 --xla_bar="a b"',
                "XLA_FLAGS": "--xla_dump_to=/tmp/dump x"}


def test_launch_quoting_round_trips_through_both_shell_layers(capsys):
    plan = dry_run(capsys, *LAUNCH_ARGS)
    assert len(plan) == 1
    env, train_argv = detached_command(remote_command(plan[0], "hx"))
    assert env == EXPECTED_ENV
    assert train_argv == EXPECTED_TRAIN_ARGV


def test_launch_multislice_runs_on_each_node_and_checks_the_slice_count(capsys):
    plan = dry_run(capsys, *LAUNCH_ARGS, "--num_slices", "2", "--project", "p")
    assert [argv[5] for argv in plan] == ["hx-0", "hx-1"]
    assert all(argv[-2:] == ["--project", "p"] for argv in plan)
    assert plan[0][-3] == plan[1][-3] and "MEGASCALE_NUM_SLICES" in plan[0][-3]
    assert detached_command(plan[0][-3])[1] == EXPECTED_TRAIN_ARGV


def test_launch_status_logs_stop_on_a_fake_worker(capsys, tmp_path):
    """The real scripts, run by bash: detached start, duplicate refusal, status, logs, stop."""
    home = make_fake_worker(tmp_path)
    launch = remote_command(dry_run(capsys, *LAUNCH_ARGS)[0], "hx")
    status = remote_command(dry_run(capsys, "status", "--name", "hx", "--zone", ZONE)[1], "hx")
    logs = remote_command(dry_run(capsys, "logs", "--name", "hx", "--zone", ZONE, "--run_name", "cpt1",
                                  "--worker", "3")[0], "hx", worker="3")
    stop = remote_command(dry_run(capsys, "stop", "--name", "hx", "--zone", ZONE, "--run_name", "cpt1",
                                  "--grace_seconds", "10")[0], "hx")
    run_dir = home / "hephaestus_logs" / "cpt1"
    pid = None
    try:
        started = run_remote(home, launch)
        assert started.returncode == 0, started.stderr
        assert "worker 3: started pid" in started.stdout
        pid = int((run_dir / "worker-3.pid").read_text())
        call = wait_for_json(home / "train_calls.jsonl")
        assert call["argv"] == EXPECTED_TRAIN_ARGV
        assert {k: call["env"].get(k) for k in EXPECTED_ENV} == EXPECTED_ENV
        assert call["cwd"] == str(home / "hephaestus_jax")
        assert call["executable"] == str(home / "hephaestus_venv" / "bin" / "python")
        assert call["pid"] == pid and os.getpgid(pid) == pid  # Its own process group: `stop` kills the group.
        wait_for(lambda: "step 1" in (run_dir / "worker-3.log").read_text())

        again = run_remote(home, launch)
        assert again.returncode != 0 and "already running" in again.stderr

        listing = run_remote(home, status).stdout
        assert f"cpt1 worker-3 pid={pid} running: step 1" in listing
        assert "step 1" in run_remote(home, logs).stdout

        stopped = run_remote(home, stop)
        assert stopped.returncode == 0 and f"stopped cpt1 (pid {pid})" in stopped.stdout
        assert not process_alive(pid)
        assert "SIGTERM: checkpoint saved" in (run_dir / "worker-3.log").read_text()
        assert f"pid={pid} exited" in run_remote(home, status).stdout
        assert "was not running" in run_remote(home, stop).stdout
        relaunched = run_remote(home, launch)  # Resuming after preemption is the same command again.
        assert relaunched.returncode == 0, relaunched.stderr
        pid = int((run_dir / "worker-3.pid").read_text())
        assert (run_dir / "worker-3.log").read_text().count("=== ") == 2  # The log is appended to, not replaced.
    finally:
        if pid is not None and process_alive(pid):
            kill_run(pid)


def test_stop_kills_a_run_that_ignores_sigterm_after_the_grace_period(capsys, tmp_path):
    home = make_fake_worker(tmp_path)
    (home / "hephaestus_jax" / "ignore_sigterm").touch()
    launch = remote_command(dry_run(capsys, *LAUNCH_ARGS)[0], "hx")
    stop = remote_command(dry_run(capsys, "stop", "--name", "hx", "--zone", ZONE, "--run_name", "cpt1",
                                  "--grace_seconds", "1")[0], "hx")
    pid = None
    try:
        assert run_remote(home, launch).returncode == 0
        pid = wait_for_json(home / "train_calls.jsonl")["pid"]
        wait_for(lambda: "step 1" in (home / "hephaestus_logs" / "cpt1" / "worker-3.log").read_text())
        stopped = run_remote(home, stop)
        assert f"stopped cpt1 (pid {pid})" in stopped.stdout
        assert not process_alive(pid)
    finally:
        if pid is not None and process_alive(pid):
            kill_run(pid)


@pytest.mark.parametrize("num_slices, tpu_env, ok", [
    (2, "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n", True),
    (2, "MEGASCALE_NUM_SLICES: '4'\n", False),
    (2, None, False),
    (1, "ACCELERATOR_TYPE: 'v5p-32'\n", True),
    (1, "MEGASCALE_NUM_SLICES: '2'\n", False),
])
def test_launch_refuses_a_node_whose_slice_count_differs(capsys, tmp_path, num_slices, tpu_env, ok):
    home = make_fake_worker(tmp_path, tpu_env=tpu_env, train_runs=False)
    plan = dry_run(capsys, "launch", "--name", "hx", "--zone", ZONE, "--run_name", "ms", "--gin_file", "a.gin",
                   "--num_slices", str(num_slices))
    result = run_remote(home, plan[0][-1])
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        assert f"not {num_slices}: pass --num_slices" in result.stderr
        assert not (home / "hephaestus_logs" / "ms").exists()


# ---------------------------------------------------------------------------------------------- other commands
def test_logs_commands(capsys):
    plan = dry_run(capsys, "logs", "--name", "hx", "--zone", ZONE, "--run_name", "cpt1", "--worker", "3")
    assert shlex.split(remote_command(plan[0], "hx", worker="3")) == [
        "tail", "-n", "100", "$HOME/hephaestus_logs/cpt1/worker-*.log"]
    plan = dry_run(capsys, "logs", "--name", "hx", "--zone", ZONE, "--run_name", "cpt1", "--worker", "all",
                   "--lines", "20", "--follow", "--num_slices", "2", "--slice", "1")
    assert shlex.split(remote_command(plan[0], "hx-1"))[:4] == ["tail", "-n", "20", "-F"]
    plan = dry_run(capsys, "logs", "--name", "hx", "--zone", ZONE, "--run_name", "cpt1", "--num_slices", "2",
                   "--slice", "all")
    assert [argv[5] for argv in plan] == ["hx-0", "hx-1"]


def test_status_describes_then_checks_processes(capsys):
    plan = dry_run(capsys, "status", "--name", "hx", "--zone", ZONE)
    assert plan[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "hx", "--zone", ZONE]
    assert plan[1][:-1] == ssh_prefix("hx")
    plan = dry_run(capsys, "status", "--name", "hx", "--zone", ZONE, "--num_slices", "2", "--node_prefix", "s")
    assert plan[0] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "hx", "--zone", ZONE]
    assert [argv[5] for argv in plan[1:]] == ["s-0", "s-1"]


def test_ssh_interactive_or_command(capsys):
    plan = dry_run(capsys, "ssh", "--name", "hx", "--zone", ZONE, "--worker", "2")
    assert plan == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "hx", "--zone", ZONE, "--worker=2"]]
    plan = dry_run(capsys, "ssh", "--name", "hx", "--zone", ZONE, "--worker", "all", "--command", "df -h '/tmp'")
    assert plan == [ssh_prefix("hx") + ["df -h '/tmp'"]]


def test_stop_runs_on_every_node(capsys):
    plan = dry_run(capsys, "stop", "--name", "hx", "--zone", ZONE, "--run_name", "cpt1", "--num_slices", "3")
    assert [argv[:-1] for argv in plan] == [ssh_prefix(f"hx-{i}") for i in range(3)]
    assert len({argv[-1] for argv in plan}) == 1  # The same script on every slice (run for real above).


def test_delete_slice_or_queued_resource(capsys):
    assert dry_run(capsys, "delete", "--name", "hx", "--zone", ZONE) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "hx", "--zone", ZONE]]
    assert dry_run(capsys, "delete", "--name", "hx", "--zone", ZONE, "--num_slices", "2", "--project", "p") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "hx", "--zone", ZONE, "--force", "--project", "p"]]


# ---------------------------------------------------------------------------------------------- execution
def test_without_dry_run_the_printed_commands_are_run_in_order(capsys, tmp_path, monkeypatch):
    calls = tmp_path / "gcloud_calls.jsonl"
    write_executable(tmp_path / "bin" / "gcloud", f"""#!{sys.executable}
import json, os, sys
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(int(os.environ.get("FAKE_GCLOUD_STATUS", "0")))
""")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    args = ["stop", "--name", "hx", "--zone", ZONE, "--run_name", "cpt1", "--num_slices", "2"]
    expected = dry_run(capsys, *args)
    assert TOOL.main(args) == 0
    assert [["gcloud"] + json.loads(line) for line in calls.read_text().splitlines()] == expected

    calls.unlink()
    monkeypatch.setenv("FAKE_GCLOUD_STATUS", "7")
    assert TOOL.main(args) == 7
    assert len(calls.read_text().splitlines()) == 1  # The first failure stops the plan.
    assert "exited with status 7" in capsys.readouterr().err


def test_missing_gcloud_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        TOOL.main(["delete", "--name", "hx", "--zone", ZONE])
    assert exit_info.value.code == 2 and "gcloud is not on PATH" in capsys.readouterr().err


def test_cli_runs_from_a_bare_checkout_with_only_the_standard_library():
    result = subprocess.run([sys.executable, "-I", "-S", str(REPO / "tools" / "tpu_vm.py"), "create", "--name", "hx",
                             "--zone", ZONE, "--accelerator_type", "v5p-32", "--dry_run"],
                            capture_output=True, text=True, cwd="/", check=False)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "hx", "--zone", ZONE,
                                          "--accelerator-type", "v5p-32", "--version", "v2-alpha-tpuv5"]


# ---------------------------------------------------------------------------------------------- fake worker
def write_executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def make_fake_home(tmp_path: Path, tpu_env: str | None = None, python_installed: bool = True,
                   train_runs: bool = True) -> Path:
    """A home directory and a bin/ of stand-ins for what a TPU VM worker has."""
    home = tmp_path / "home"
    bin_dir = tmp_path / "fakebin"
    home.mkdir()
    if tpu_env is not None:
        (tmp_path / "tpu-env").write_text(tpu_env)
    write_executable(bin_dir / "curl", f"""#!/bin/bash
case "${{@: -1}}" in
  */agent-worker-number) echo -n 3 ;;
  */tpu-env) cat {tmp_path / 'tpu-env'} 2>/dev/null || exit 22 ;;
  *) exit 22 ;;
esac
""")
    write_executable(bin_dir / "git", """#!/bin/bash
if [ "$1" = clone ]; then mkdir -p "$4" && echo "$3" > "$4/cloned_from"
elif [ "$1" = -C ] && [ "$3" = checkout ]; then echo "$5" > "$2/checked_out"
else exit 1; fi
""")
    write_executable(bin_dir / "sudo", f"""#!/bin/bash
echo "$*" >> "$HOME/sudo.log"
case "$*" in *" install "*) touch {tmp_path / 'python-installed'} ;; esac
""")
    if python_installed:
        (tmp_path / "python-installed").touch()
    # python3.11 -m venv [--clear] DIR: fails until "installed", then makes DIR/bin/pip and DIR/bin/python.
    write_executable(bin_dir / "python3.11", f"""#!/bin/bash
[ -e {tmp_path / 'python-installed'} ] || {{ echo 'ensurepip is not available' >&2; exit 1; }}
dir="${{@: -1}}"; mkdir -p "$dir/bin"
printf '#!/bin/bash\\necho "$PWD $*" >> "$HOME/pip.log"\\n' > "$dir/bin/pip"; chmod +x "$dir/bin/pip"
cp {bin_dir / 'train'} "$dir/bin/python"
""")
    # The training entry point: records how it was started, logs a step, then waits to be stopped.
    write_executable(bin_dir / "train", f"""#!{sys.executable}
import json, os, signal, sys, time
with open(os.path.expanduser("~/train_calls.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(),
                        "executable": sys.argv[0], "pid": os.getpid()}}) + "\\n")


def on_sigterm(signum, frame):  # What the trainer does on preemption: save, then exit.
    print("SIGTERM: checkpoint saved", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.path.exists("ignore_sigterm") else on_sigterm)
print("step 1", flush=True)
{"time.sleep(60)" if train_runs else ""}
""")
    return home


def make_fake_worker(tmp_path: Path, **fake_home_options) -> Path:
    """A fake home where `setup` has run: the project directory and the venv exist."""
    home = make_fake_home(tmp_path, **fake_home_options)
    (home / "hephaestus_jax").mkdir()
    assert run_remote(home, "python3.11 -m venv ~/hephaestus_venv").returncode == 0
    return home


def run_remote(home: Path, script: str) -> subprocess.CompletedProcess:
    """Run a --command script the way the worker's login shell does: bash, in the home directory."""
    env = {"HOME": str(home), "PATH": f"{home.parent / 'fakebin'}:/usr/bin:/bin"}
    return subprocess.run(["bash", "-c", script], cwd=home, env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the fake worker"
        time.sleep(0.05)


def wait_for_json(path: Path) -> dict:
    wait_for(lambda: path.exists() and path.read_text().endswith("\n"))
    return json.loads(path.read_text().splitlines()[-1])


def kill_run(pid: int) -> None:
    """Kill a fake run and its process group. Right after a launch the run may not have called setsid yet, so
    the group may not exist: then kill the process alone."""
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def process_alive(pid: int) -> bool:
    """True for a live process; a zombie (killed, not yet reaped by init) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
