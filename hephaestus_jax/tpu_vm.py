"""Drive Cloud TPU VM slices with gcloud: create, set up, launch, watch, stop and delete training runs.

Every subcommand turns its options into a *plan*: the list of argv lists it would run (gcloud, and for
`setup --source_dir` one local `tar`). `--dry_run` prints the plan shell-quoted, one command per line;
otherwise the commands run in order and the first failure stops the plan.

Work on the workers is a one-line bash script passed to `gcloud compute tpus tpu-vm ssh --worker=all
--command SCRIPT`; free-form values (gin files and bindings, environment, URLs) are quoted with `shlex.quote`
on their way in, so gin bindings with spaces and quotes arrive intact, and names are validated to plain
characters. On each worker (paths relative to its home directory):

    hephaestus_jax/                              the project (copied or cloned by `setup`)
    hephaestus_venv/                             its virtualenv (`pip install -e '.[tpu]'`)
    hephaestus_logs/<run_name>/worker-<N>.log    stdout+stderr of the run on worker N (appended to)
    hephaestus_logs/<run_name>/worker-<N>.pid    pid (= process group) of the run, read by `stop`/`status`

N is the worker's index within its slice, read from the TPU VM metadata (`agent-worker-number`), the same
value `jax.distributed.initialize()` reads. A multi-slice run is a queued resource whose nodes are named
`<node_prefix>-0` ... `<node_prefix>-<num_slices - 1>`; each command runs on every node in turn.

This module imports only the standard library: it runs on a workstation that has gcloud, not jax.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence, TextIO

from hephaestus_jax.errors import InputError
from hephaestus_jax.tpu_catalog import GENERATIONS, generation_name, split_cloud_name

Argv = list[str]
Plan = list[Argv]

REMOTE_PROJECT_DIR = "hephaestus_jax"
REMOTE_VENV_DIR = "hephaestus_venv"
REMOTE_LOG_ROOT = "hephaestus_logs"
REMOTE_ARCHIVE = "hephaestus_jax-src.tar.gz"
TRAIN_MODULE = "hephaestus_jax.train"
METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"
# Gin bindings `launch` adds for --run_name and --output_dir (TrainConfig lives in hephaestus_jax/config.py).
RUN_NAME_BINDING = "TrainConfig.run_name"
OUTPUT_DIR_BINDING = "TrainConfig.output_dir"
# Left out of the archive that `setup --source_dir` copies to the workers.
# Patterns starting with ./ match only at the top of the checkout.
SOURCE_EXCLUDES = (".git", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info",
                   "./.venv", "./venv", "./build", "./dist", "./runs", "./out")
DEFAULT_PYTHON = "python3.11"  # The runtime images are Ubuntu 22.04 (python3.10); jax needs >= 3.11.


class TpuVmError(InputError, ValueError):
    """Invalid options; the message names the option and the value."""


# ---------------------------------------------------------------------------------------------- accelerators


@dataclasses.dataclass(frozen=True)
class AcceleratorType:
    generation: str
    size: int

    @property
    def api_name(self) -> str:
        """The name gcloud takes for --accelerator-type (v5e is spelled v5litepod-N)."""
        return f"{GENERATIONS[self.generation].api_prefix}-{self.size}"

    @property
    def default_runtime_version(self) -> str:
        return GENERATIONS[self.generation].runtime_version


def parse_accelerator_type(text: str) -> AcceleratorType:
    """Parse `v5p-32`, `v5e-256` (or `v5litepod-256`), `v4-128`, `v6e-64`; raise TpuVmError naming the rule."""
    parts = split_cloud_name(text)
    if not parts:
        raise TpuVmError(f"--accelerator_type {text!r} is not of the form GENERATION-SIZE, e.g. v5p-32")
    written, size = parts
    generation = generation_name(written)
    if generation is None:
        raise TpuVmError(f"--accelerator_type {text!r}: unsupported TPU generation {written!r}; "
                         f"expected one of {sorted(GENERATIONS)}")
    if size not in GENERATIONS[generation].sizes:
        raise TpuVmError(f"--accelerator_type {text!r}: {generation} slices are sized by "
                         f"{GENERATIONS[generation].size_rule}")
    return AcceleratorType(generation, size)


# ---------------------------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    """A single slice (a TPU VM node) or a multi-slice queued resource, and where it lives."""

    name: str
    zone: str
    project: str | None = None
    num_slices: int = 1
    node_prefix: str | None = None

    def __post_init__(self):
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
            raise TpuVmError(f"--name {self.name!r}: use lowercase letters, digits and hyphens, "
                             "starting with a letter")
        if not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z]", self.zone):
            raise TpuVmError(f"--zone {self.zone!r} is not a zone name such as us-east5-a")
        if self.num_slices < 1:
            raise TpuVmError(f"--num_slices must be at least 1, got {self.num_slices}")
        if self.node_prefix is not None:
            if self.num_slices == 1:
                raise TpuVmError("--node_prefix names the nodes of a multi-slice run: it needs --num_slices > 1")
            if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.node_prefix):
                raise TpuVmError(f"--node_prefix {self.node_prefix!r}: use lowercase letters, digits and hyphens")

    @property
    def multislice(self) -> bool:
        return self.num_slices > 1

    @property
    def nodes(self) -> list[str]:
        """TPU VM node names: the slice itself, or `<prefix>-<i>` as queued resources name them."""
        if not self.multislice:
            return [self.name]
        prefix = self.node_prefix or self.name
        return [f"{prefix}-{i}" for i in range(self.num_slices)]

    def gcloud(self, words: Sequence[str], *flags: str) -> Argv:
        """`gcloud compute tpus WORDS... --zone Z FLAGS... [--project P]` (WORDS: group, verb, positionals)."""
        project = ["--project", self.project] if self.project else []
        return ["gcloud", "compute", "tpus", *words, "--zone", self.zone, *flags, *project]

    def ssh(self, node: str, worker: str, command: str | None = None) -> Argv:
        flags = [f"--worker={worker}"] + (["--command", command] if command is not None else [])
        return self.gcloud(["tpu-vm", "ssh", node], *flags)


def select_nodes(target: Target, slice_index: str) -> list[str]:
    """The nodes named by --slice: an index below --num_slices, or `all`."""
    if slice_index == "all":
        return target.nodes
    if not slice_index.isdigit() or int(slice_index) >= target.num_slices:
        raise TpuVmError(f"--slice {slice_index!r}: expected `all` or an index below --num_slices={target.num_slices}")
    return [target.nodes[int(slice_index)]]


def check_worker(worker: str) -> str:
    if worker != "all" and not worker.isdigit():
        raise TpuVmError(f"--worker {worker!r}: expected `all` or a worker index (0, 1, ...)")
    return worker


def check_run_name(run_name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_name):
        raise TpuVmError(f"--run_name {run_name!r}: use letters, digits, '.', '_' and '-' (it names a directory)")
    return run_name


# ---------------------------------------------------------------------------------------------- remote shell
def _metadata(key: str) -> str:
    """Shell command printing one TPU VM metadata attribute."""
    return f'curl -sf -H "Metadata-Flavor: Google" {METADATA_URL}/{key}'


def _run_dir(run_name: str) -> str:
    return f'"$HOME"/{REMOTE_LOG_ROOT}/{run_name}'


# True when $pid is a live training process (a pid file can outlive its process; pids get reused).
_PID_IS_TRAINING = f'ps -o args= -p "$pid" 2>/dev/null | grep -qF {TRAIN_MODULE}'
_READ_WORKER_ID = (f"WORKER_ID=$({_metadata('agent-worker-number')}) || "
                   '{ echo "cannot read agent-worker-number from the metadata server: is this a TPU VM?" >&2; '
                   'exit 1; }')


@dataclasses.dataclass(frozen=True)
class CodeSource:
    """Where `setup` gets the project: a local checkout (copied) or a git repository (cloned)."""

    source_dir: str | None = None
    git_url: str | None = None
    git_ref: str | None = None

    def __post_init__(self):
        if (self.source_dir is None) == (self.git_url is None):
            raise TpuVmError("setup needs exactly one of --source_dir (copy a local checkout) or --git_url (clone)")
        if self.git_ref is not None and self.git_url is None:
            raise TpuVmError("--git_ref needs --git_url")
        if self.source_dir is not None and not os.path.isfile(os.path.join(self.source_dir, "setup.py")):
            raise TpuVmError(f"--source_dir {self.source_dir!r} has no setup.py: point it at the project checkout")


def fetch_source_script(source: CodeSource) -> str:
    """Replace ~/hephaestus_jax with the archive `setup` copied over, or with a fresh clone."""
    replace = f"rm -rf {REMOTE_PROJECT_DIR}"
    if source.git_url is None:
        steps = [replace, f"mkdir -p {REMOTE_PROJECT_DIR}", f"tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_PROJECT_DIR}",
                 f"rm -f {REMOTE_ARCHIVE}"]
    else:
        steps = [replace, shlex.join(["git", "clone", "--quiet", source.git_url, REMOTE_PROJECT_DIR])]
        if source.git_ref is not None:
            steps.append(shlex.join(["git", "-C", REMOTE_PROJECT_DIR, "checkout", "--quiet", source.git_ref]))
    return " && ".join(steps)


def install_script(python: str) -> str:
    """Create the venv (installing `python3.X` from apt when it is missing) and `pip install -e '.[tpu]'`."""
    py = shlex.quote(python)
    make_venv = f"{py} -m venv ~/{REMOTE_VENV_DIR}"
    if re.fullmatch(r"python3\.[0-9]+", python):
        apt = "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
        make_venv = (f"{{ {make_venv} || {{ {apt} update -qq && {apt} install -y -qq {python} {python}-venv "
                     f"&& {py} -m venv --clear ~/{REMOTE_VENV_DIR}; }}; }}")
    pip = f"~/{REMOTE_VENV_DIR}/bin/pip"
    return " && ".join([make_venv, f"{pip} install --quiet --upgrade pip", f"cd ~/{REMOTE_PROJECT_DIR}",
                        f'{pip} install --quiet -e ".[tpu]"'])


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """What `launch` runs on every worker."""

    run_name: str
    gin_files: tuple[str, ...]
    gin_params: tuple[str, ...] = ()
    output_dir: str | None = None
    libtpu_init_args: str | None = None
    tpu_stderr_log_level: int = 2
    env: tuple[str, ...] = ()

    def __post_init__(self):
        check_run_name(self.run_name)
        if not self.gin_files:
            raise TpuVmError("launch needs at least one --gin_file")
        for flag, values in (("--gin_file", self.gin_files), ("--gin_param", self.gin_params)):
            for value in values:
                if not value.strip():
                    raise TpuVmError(f"{flag} must not be empty")
        if self.output_dir is not None and not re.fullmatch(r"gs://[^\s/'\"\\]+(/[^\s'\"\\]*)?", self.output_dir):
            raise TpuVmError(f"--output_dir {self.output_dir!r}: expected a GCS path gs://BUCKET/... "
                             "(every worker writes checkpoints to it)")
        if self.tpu_stderr_log_level not in range(4):
            raise TpuVmError(f"--tpu_stderr_log_level must be 0..3, got {self.tpu_stderr_log_level}")
        for item in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item, flags=re.DOTALL):
                raise TpuVmError(f"--env {item!r}: expected NAME=VALUE")

    def environment(self) -> list[str]:
        """NAME=VALUE settings for the training process, in the order they are applied."""
        # HEPHAESTUS_DISTRIBUTED=auto: the trainer calls jax.distributed.initialize() (TPU VM auto-detection).
        settings = ["HEPHAESTUS_DISTRIBUTED=auto", f"TPU_STDERR_LOG_LEVEL={self.tpu_stderr_log_level}"]
        if self.libtpu_init_args is not None:
            settings.append(f"LIBTPU_INIT_ARGS={self.libtpu_init_args}")
        return settings + list(self.env)

    def train_argv(self) -> Argv:
        """`python -m hephaestus_jax.train ...`; the tool's bindings go first so an explicit --gin_param wins."""
        # Gin string literals in double quotes: the values hold no quotes, and the shell layers stay readable.
        bindings = [f'{RUN_NAME_BINDING} = "{self.run_name}"']
        if self.output_dir is not None:
            bindings.append(f'{OUTPUT_DIR_BINDING} = "{self.output_dir}"')
        argv = ["python", "-m", TRAIN_MODULE]
        for gin_file in self.gin_files:
            argv += ["--gin_file", gin_file]
        for binding in bindings + list(self.gin_params):
            argv += ["--gin_param", binding]
        return argv


def launch_script(spec: LaunchSpec, num_slices: int) -> str:
    """Start the run detached (setsid + nohup) with the venv's python; refuse if it is already running here."""
    run_dir = _run_dir(spec.run_name)
    # setsid, nohup and env each exec the next program, so the pid recorded is python's, leading its own group.
    detached = (f'setsid nohup env PATH="$HOME/{REMOTE_VENV_DIR}/bin:$PATH" '
                + shlex.join([*spec.environment(), *spec.train_argv()]))
    steps = [
        f"cd ~/{REMOTE_PROJECT_DIR} || exit 1",
        _READ_WORKER_ID,
        # A multi-slice queued resource publishes MEGASCALE_* in the `tpu-env` metadata, where jax reads them;
        # a run started on fewer nodes than jax expects would wait for the missing slices forever.
        f"SLICES=${{MEGASCALE_NUM_SLICES:-$({_metadata('tpu-env')} | grep ^MEGASCALE_NUM_SLICES: | tr -dc 0-9)}}",
        f'[ "${{SLICES:-1}}" = {num_slices} ] || {{ echo "$(hostname) belongs to ${{SLICES:-1}} slice(s), not '
        f'{num_slices}: pass --num_slices ${{SLICES:-1}}" >&2; exit 1; }}',
        f"mkdir -p {run_dir}",
        f'LOG={run_dir}/worker-"$WORKER_ID".log',
        f'PID_FILE={run_dir}/worker-"$WORKER_ID".pid',
        f'if [ -f "$PID_FILE" ] && pid=$(cat "$PID_FILE") && {_PID_IS_TRAINING}; then echo "$(hostname) worker '
        f'$WORKER_ID: run {spec.run_name} is already running (pid $pid); stop it first" >&2; exit 1; fi',
        f'echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) launch {spec.run_name} on $(hostname) worker $WORKER_ID ===" '
        '>> "$LOG"',
        f'{detached} >> "$LOG" 2>&1 < /dev/null & echo $! > "$PID_FILE"',
        'echo "$(hostname) worker $WORKER_ID: started pid $!, log $LOG"',
    ]
    return "; ".join(steps)


def _wait_while_training(polls: int, interval: str) -> str:
    """Shell: poll `$pid` every `interval` seconds, at most `polls` times, while it is still our training run."""
    return f'i=0; while [ "$i" -lt {polls} ] && {_PID_IS_TRAINING}; do sleep {interval}; i=$((i + 1)); done'


def stop_script(run_name: str, grace_seconds: int) -> str:
    """SIGTERM the run's process group, wait up to `grace_seconds` for it to exit, then SIGKILL what is left."""
    return "; ".join([
        "found=0",
        f'for f in {_run_dir(run_name)}/worker-*.pid; do [ -e "$f" ] || continue; found=1; pid=$(cat "$f"); '
        f'if {_PID_IS_TRAINING}; then kill -TERM -- "-$pid"; {_wait_while_training(grace_seconds, "1")}; '
        # SIGKILL is delivered asynchronously: report "stopped" only once the process is gone (up to 10 s).
        f'kill -KILL -- "-$pid" 2>/dev/null; {_wait_while_training(100, "0.1")}; '
        f'if {_PID_IS_TRAINING}; then echo "$(hostname): {run_name} (pid $pid) survived SIGKILL" >&2; '
        f'else echo "$(hostname): stopped {run_name} (pid $pid)"; fi; '
        f'else echo "$(hostname): {run_name} was not running (pid $pid)"; fi; done',
        f'[ "$found" = 1 ] || echo "$(hostname): no run named {run_name} was launched here"',
    ])


def status_script() -> str:
    """One line per run launched on this worker: run, worker, pid, running/exited and the last log line."""
    return "; ".join([
        "found=0",
        f'for f in "$HOME"/{REMOTE_LOG_ROOT}/*/worker-*.pid; do [ -e "$f" ] || continue; found=1; '
        f'pid=$(cat "$f"); if {_PID_IS_TRAINING}; then state=running; else state=exited; fi; '
        'echo "$(hostname) $(basename "$(dirname "$f")") $(basename "$f" .pid) pid=$pid $state: '
        '$(tail -n 1 "${f%.pid}.log" 2>/dev/null)"; done',
        '[ "$found" = 1 ] || echo "$(hostname): no runs launched"',
    ])


def logs_script(run_name: str, lines: int, follow: bool) -> str:
    return shlex.join(["tail", "-n", str(lines)] + (["-F"] if follow else [])) + f" {_run_dir(run_name)}/worker-*.log"


# ---------------------------------------------------------------------------------------------- plans
def create_plan(target: Target, accelerator: AcceleratorType, runtime_version: str | None = None,
                spot: bool = False, reserved: bool = False) -> Plan:
    """One slice: `tpu-vm create`. Several: a queued resource with --node-count slices."""
    if spot and reserved:
        raise TpuVmError("--spot and --reserved are different capacity types: pass at most one")
    version = runtime_version or accelerator.default_runtime_version
    capacity = ["--spot"] * spot + ["--reserved"] * reserved
    if not target.multislice:
        return [target.gcloud(["tpu-vm", "create", target.name], "--accelerator-type", accelerator.api_name,
                              "--version", version, *capacity)]
    return [target.gcloud(["queued-resources", "create", target.name], "--accelerator-type", accelerator.api_name,
                          "--runtime-version", version, "--node-count", str(target.num_slices),
                          "--node-prefix", target.node_prefix or target.name, *capacity)]


def local_archive_path(target: Target) -> str:
    return os.path.join(tempfile.gettempdir(), f"hephaestus_jax-{target.name}.tar.gz")


def setup_plan(target: Target, source: CodeSource, python: str = DEFAULT_PYTHON) -> Plan:
    """Copy (tar + scp) or clone the project on every worker of every slice, then build the venv."""
    remote = fetch_source_script(source) + " && " + install_script(python)
    plan: Plan = []
    archive = local_archive_path(target)
    if source.source_dir is not None:
        excludes = [f"--exclude={pattern}" for pattern in SOURCE_EXCLUDES]
        plan.append(["tar", "-czf", archive, *excludes, "-C", os.path.abspath(source.source_dir), "."])
    for node in target.nodes:
        if source.source_dir is not None:
            plan.append(target.gcloud(["tpu-vm", "scp", archive, f"{node}:{REMOTE_ARCHIVE}"], "--worker=all"))
        plan.append(target.ssh(node, "all", remote))
    return plan


def launch_plan(target: Target, spec: LaunchSpec) -> Plan:
    script = launch_script(spec, target.num_slices)
    return [target.ssh(node, "all", script) for node in target.nodes]


def logs_plan(target: Target, run_name: str, slice_index: str = "0", worker: str = "0", lines: int = 100,
              follow: bool = False) -> Plan:
    if lines < 1:
        raise TpuVmError(f"--lines must be at least 1, got {lines}")
    script = logs_script(check_run_name(run_name), lines, follow)
    return [target.ssh(node, check_worker(worker), script) for node in select_nodes(target, slice_index)]


def status_plan(target: Target) -> Plan:
    group = "queued-resources" if target.multislice else "tpu-vm"
    script = status_script()
    describe = target.gcloud([group, "describe", target.name])
    return [describe] + [target.ssh(node, "all", script) for node in target.nodes]


def ssh_plan(target: Target, slice_index: str = "0", worker: str = "0", command: str | None = None) -> Plan:
    """An interactive shell on one worker, or `command` (raw shell text) on the chosen workers."""
    nodes = select_nodes(target, slice_index)
    check_worker(worker)
    if command is None and (len(nodes) > 1 or worker == "all"):
        raise TpuVmError("an interactive ssh goes to one worker: pass --slice N --worker N, or a --command")
    return [target.ssh(node, worker, command) for node in nodes]


def stop_plan(target: Target, run_name: str, grace_seconds: int = 60) -> Plan:
    if grace_seconds < 0:
        raise TpuVmError(f"--grace_seconds must be >= 0, got {grace_seconds}")
    script = stop_script(check_run_name(run_name), grace_seconds)
    return [target.ssh(node, "all", script) for node in target.nodes]


def delete_plan(target: Target) -> Plan:
    """gcloud asks for confirmation; a queued resource is deleted with its nodes (--force)."""
    if target.multislice:
        return [target.gcloud(["queued-resources", "delete", target.name], "--force")]
    return [target.gcloud(["tpu-vm", "delete", target.name])]


# ---------------------------------------------------------------------------------------------- running
def execute(plan: Plan, dry_run: bool, out: TextIO) -> int:
    """Print the plan (dry run) or run it command by command, stopping at the first failure."""
    if dry_run:
        for argv in plan:
            print(shlex.join(argv), file=out)
        return 0
    if shutil.which("gcloud") is None:
        raise TpuVmError("gcloud is not on PATH: install the Google Cloud CLI, or pass --dry_run to print the commands")
    for argv in plan:
        print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
        returncode = subprocess.run(argv, check=False).returncode
        if returncode:
            print(f"error: `{' '.join(argv[:6])} ...` exited with status {returncode}", file=sys.stderr)
            return returncode
    return 0
