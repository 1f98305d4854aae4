"""Start-up noise (TensorFlow/CUDA/libtpu probing for hardware) is silenced by default for every command
(`python -m hephaestus_jax.<cli>`, tools/*.py), HEPHAESTUS_VERBOSE_STARTUP=1 brings it back, real errors always
come through, and importing the package as a library leaves stderr alone."""

import ast
import glob
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from hephaestus_jax import startup

BFCL_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "bfcl")
CUINIT = "E0000 00:00:1796217953.813006    5358 cuda_executor.cc:1] failed call to cuInit: UNKNOWN ERROR (303)"
STDLIB_ONLY_TOOLS = ("tpu_vm.py",)  # A workstation launcher: imports no jax, TensorFlow or libtpu.
COMMANDS = sorted(set(glob.glob(os.path.join(REPO_ROOT, "tools", "*.py")))
                  - {os.path.join(REPO_ROOT, "tools", name) for name in STDLIB_ONLY_TOOLS}) + [
    os.path.join(REPO_ROOT, "hephaestus_jax", f"{name}.py") for name in ("train", "evaluate", "generate")]
EVALUATE_ARGS = ["function_calling", "--predictions", os.path.join(BFCL_DIR, "predictions.jsonl"),
                 "--dataset", BFCL_DIR]


def _run(args, verbose: bool) -> subprocess.CompletedProcess:
    """A command as a user starts it: no test-session settings that quieten or pin the libraries."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS", startup.VERBOSE_ENV)}
    if verbose:
        env[startup.VERBOSE_ENV] = "1"
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in startup.NOISE)]


def _command_then_noise(run: str, target: str, argv: list[str]) -> list[str]:
    """Python that runs a command as `python -m`/`python tools/x.py` would (`runpy`, as __main__), then writes
    the cuInit line to fd 2 as the libraries do: whether it shows says whether the command filters its stderr.
    (The libraries' own noise depends on the machine: libtpu stays silent while another process holds its lock.)"""
    return ["-c", f"import os, runpy, sys\nsys.argv = {[target, *argv]!r}\n"
                  f"try:\n    runpy.{run}({target!r}, run_name='__main__')\n"
                  f"except SystemExit as exit_:\n    os.write(2, {CUINIT + chr(10)!r}.encode())\n    raise\n"]


def test_commands_start_quietly_and_verbose_startup_shows_the_noise():
    cli = _command_then_noise("run_module", "hephaestus_jax.evaluate", EVALUATE_ARGS)
    tool = _command_then_noise("run_path", os.path.join(REPO_ROOT, "tools", "build_sample_forge.py"), ["--help"])
    quiet, verbose, quiet_tool = _run(cli, verbose=False), _run(cli, verbose=True), _run(tool, verbose=False)
    assert quiet.returncode == verbose.returncode == quiet_tool.returncode == 0, quiet.stderr[-3000:]
    assert CUINIT in verbose.stderr.splitlines()
    assert _noise(quiet.stderr) == [] and _noise(quiet_tool.stderr) == [], quiet.stderr[-3000:]
    assert "micro average" in quiet.stdout and "--output_dir" in quiet_tool.stdout


def test_importing_the_package_leaves_stderr_alone():
    code = ("import os, sys\nbefore = os.fstat(2)\n"
            "import hephaestus_jax.train\n"  # A command's module, imported as a library.

            "after = os.fstat(2)\nassert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)\n"
            f"os.write(2, {CUINIT + chr(10)!r}.encode())\n")
    result = _run(["-c", code], verbose=False)
    assert result.returncode == 0 and result.stderr == CUINIT + "\n", result.stderr[-3000:]


def test_the_filter_drops_only_the_noise_and_passes_errors_and_child_output():
    code = ("import os, subprocess, sys\nfrom hephaestus_jax import startup\nstartup.command_startup()\n"
            f"os.write(2, {CUINIT + chr(10)!r}.encode())\n"
            "print('error: a real problem', file=sys.stderr, flush=True)\n"
            "subprocess.run([sys.executable, '-c', 'import sys; sys.stderr.write(\"child: partial line\")'])\n")
    quiet, verbose = _run(["-c", code], verbose=False), _run(["-c", code], verbose=True)
    assert quiet.stderr == "error: a real problem\nchild: partial line"
    assert verbose.stderr == CUINIT + "\nerror: a real problem\nchild: partial line"


def test_a_failing_command_still_prints_its_error():
    result = _run(["-m", "hephaestus_jax.evaluate", "function_calling", "--predictions", "missing.jsonl",
                   "--dataset", "/nonexistent"], verbose=False)
    assert result.returncode == 2 and "error: /nonexistent: no such BFCL file or directory" in result.stderr


def _installs_the_filter_first(tree: ast.Module) -> bool:
    """Whether the `if __name__ == "__main__":` block that calls `command.start()` comes before the module's first
    import of anything outside the standard library (the command shell itself imports only the standard library:
    tests/test_command_errors.py)."""
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if ast.unparse(node) == "from hephaestus_jax import command":
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if all(name.split(".")[0] in sys.stdlib_module_names | {"__future__"} for name in names):
                continue
            return False
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return "command.start()" in ast.unparse(node)
    return False


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: os.path.relpath(path, REPO_ROOT))
def test_every_command_installs_the_filter_before_its_imports(path):
    """The run-time test above starts two commands; this one holds every command to the same opening."""
    with open(path, encoding="utf-8") as f:
        assert _installs_the_filter_first(ast.parse(f.read())), f"{path}: no command.start() block before imports"


def test_stdlib_only_tools_import_no_noisy_library():
    for name in STDLIB_ONLY_TOOLS:
        with open(os.path.join(REPO_ROOT, "tools", name), encoding="utf-8") as f:
            source = f.read()
        assert not any(lib in source for lib in ("import jax", "import tensorflow", "from jax")), name


_REFAULT_PROGRAM = """
import ctypes, resource, threading
from hephaestus_jax import startup
startup.command_startup()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
faults = []
def step():  # What an XLA:CPU step does on a worker thread: malloc one large block, write it, free it.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(256 << 20)  # 65,536 pages of 4 KiB.
    ctypes.memset(block, 1, 256 << 20)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(3):
    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
print(faults[-1])
"""


@pytest.mark.parametrize("keep", [True, False])
def test_commands_keep_host_memory_so_a_repeated_large_block_is_not_faulted_in_again(keep):
    env = {k: v for k, v in os.environ.items() if k != startup.KEEP_MEMORY_ENV}
    if not keep:
        env[startup.KEEP_MEMORY_ENV] = "0"
    result = subprocess.run([sys.executable, "-c", _REFAULT_PROGRAM], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    faults = int(result.stdout.split()[-1])
    if keep:  # The third block reuses the memory of the first two.
        assert faults < 1000, faults
    else:  # glibc maps each block afresh: every page faults again.
        assert faults >= 60000, faults
