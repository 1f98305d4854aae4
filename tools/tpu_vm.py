#!/usr/bin/env python3
"""Create, set up, launch, watch, stop and delete hephaestus_jax runs on Cloud TPU VM slices.

    python tools/tpu_vm.py create --name hx --zone us-east5-a --accelerator_type v5p-32
    python tools/tpu_vm.py setup  --name hx --zone us-east5-a --source_dir .
    python tools/tpu_vm.py launch --name hx --zone us-east5-a --run_name cpt1 --gin_file configs/stage1_cpt.gin ...

Every subcommand takes --dry_run (print the gcloud commands instead of running them). The plans themselves are
hephaestus_jax/tpu_vm.py's. See docs/tpu_pod.md.
"""

import argparse
import os
import sys
from typing import Sequence

# This tool runs on a workstation that has gcloud but need not have the package installed; the module it
# calls uses only the standard library, so importing it from the checkout is enough.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hephaestus_jax import command  # noqa: E402
from hephaestus_jax.tpu_vm import (  # noqa: E402
    DEFAULT_PYTHON, OUTPUT_DIR_BINDING, RUN_NAME_BINDING, CodeSource, LaunchSpec, Plan, Target, TpuVmError,
    create_plan, delete_plan, execute, launch_plan, logs_plan, parse_accelerator_type, setup_plan, ssh_plan,
    status_plan, stop_plan)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM name, or the queued resource's name when multi-slice")
    common.add_argument("--zone", required=True, help="e.g. us-east5-a")
    common.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    common.add_argument("--num_slices", type=int, default=1,
                        help="slices of a multi-slice run (a queued resource); pass the same value to every command")
    common.add_argument("--node_prefix", help="multi-slice node names are NODE_PREFIX-0, NODE_PREFIX-1, ... "
                                              "(default: --name)")
    common.add_argument("--dry_run", action="store_true", help="print the commands, one per line, instead of running")

    parser = argparse.ArgumentParser(prog="tpu_vm.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", parents=[common], help="create a slice, or a multi-slice queued resource")
    create.add_argument("--accelerator_type", required=True, help="v4-N, v5p-N, v5e-N (= v5litepod-N) or v6e-N")
    create.add_argument("--runtime_version", help="TPU software version (default: the generation's JAX runtime)")
    capacity = create.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="Spot capacity (preemptible)")
    capacity.add_argument("--reserved", action="store_true", help="capacity from your reservation")

    setup = commands.add_parser("setup", parents=[common], help="install the project and its venv on every worker")
    source = setup.add_mutually_exclusive_group(required=True)
    source.add_argument("--source_dir", help="copy this local checkout (tar + scp)")
    source.add_argument("--git_url", help="clone this repository on the workers")
    setup.add_argument("--git_ref", help="branch, tag or commit to check out after cloning")
    setup.add_argument("--python", default=DEFAULT_PYTHON,
                       help="interpreter for the venv; python3.X is installed with apt when missing")

    launch = commands.add_parser("launch", parents=[common], help="start a training run, detached, on every worker")
    launch.add_argument("--run_name", required=True, help="names the log directory; also bound to "
                                                          f"{RUN_NAME_BINDING}")
    launch.add_argument("--gin_file", action="append", required=True, help="repeatable; relative to the project")
    launch.add_argument("--gin_param", action="append", default=[], help="repeatable gin binding")
    launch.add_argument("--output_dir", help=f"gs://... bound to {OUTPUT_DIR_BINDING}")
    launch.add_argument("--libtpu_init_args", help="exported as LIBTPU_INIT_ARGS")
    launch.add_argument("--tpu_stderr_log_level", type=int, default=2,
                        help="TPU_STDERR_LOG_LEVEL: 0 info .. 3 fatal (default 2; full logs stay in /tmp/tpu_logs)")
    launch.add_argument("--env", action="append", default=[], help="repeatable NAME=VALUE for the training process")

    logs = commands.add_parser("logs", parents=[common], help="tail a run's log on one worker or all")
    logs.add_argument("--run_name", required=True)
    logs.add_argument("--slice", default="0", help="slice index or `all` (multi-slice)")
    logs.add_argument("--worker", default="0", help="worker index or `all`")
    logs.add_argument("--lines", type=int, default=100)
    logs.add_argument("--follow", action="store_true", help="keep following (tail -F)")

    commands.add_parser("status", parents=[common], help="describe the TPU and list the runs on every worker")

    ssh = commands.add_parser("ssh", parents=[common], help="a shell on one worker, or --command on workers")
    ssh.add_argument("--slice", default="0", help="slice index, or `all` with --command")
    ssh.add_argument("--worker", default="0", help="worker index, or `all` with --command")
    ssh.add_argument("--command", dest="remote_command", help="shell command to run (in the home directory)")

    stop = commands.add_parser("stop", parents=[common], help="stop a run on every worker (SIGTERM, then SIGKILL)")
    stop.add_argument("--run_name", required=True)
    stop.add_argument("--grace_seconds", type=int, default=60, help="wait this long after SIGTERM before SIGKILL")

    commands.add_parser("delete", parents=[common], help="delete the slice or the queued resource with its nodes")
    return parser


def plan_from_args(args: argparse.Namespace) -> Plan:
    target = Target(args.name, args.zone, args.project, args.num_slices, args.node_prefix)
    if args.command == "create":
        return create_plan(target, parse_accelerator_type(args.accelerator_type), args.runtime_version,
                           args.spot, args.reserved)
    if args.command == "setup":
        return setup_plan(target, CodeSource(args.source_dir, args.git_url, args.git_ref), args.python)
    if args.command == "launch":
        spec = LaunchSpec(args.run_name, tuple(args.gin_file), tuple(args.gin_param), args.output_dir,
                          args.libtpu_init_args, args.tpu_stderr_log_level, tuple(args.env))
        return launch_plan(target, spec)
    if args.command == "logs":
        return logs_plan(target, args.run_name, args.slice, args.worker, args.lines, args.follow)
    if args.command == "status":
        return status_plan(target)
    if args.command == "ssh":
        return ssh_plan(target, args.slice, args.worker, args.remote_command)
    if args.command == "stop":
        return stop_plan(target, args.run_name, args.grace_seconds)
    return delete_plan(target)


@command.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of tools/tpu_vm.py; returns the exit status (2 for invalid options, before any output)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return execute(plan_from_args(args), args.dry_run, sys.stdout)
    except TpuVmError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
