"""Run the mixing-ratio scaling-law study: train at several agent-data shares, fit held-out loss, print the optimum.

    python tools/mixture_study.py --gin_file configs/mixture_study/toy.gin [--gin_param ...] [--dry_run|--fit_only]

A study gin file is a training gin file that also binds `MixtureStudy` (hephaestus_jax/mixing_law/study.py): the
agent shares r to sweep, the code:text ratio of the rest, the model sizes and the weights of the benchmark loss.
Each (size, r) trains one model with the train CLI; finished runs are skipped, so the same command resumes a
study. --fit_only trains nothing and fits the measured runs; --dry_run prints each run's train command. Outputs
under the study directory: mixture_study.csv (every run), mixture_study.json (fits and optima),
mixture_study.png. Paths are relative to the repository root. See docs/mixture_study.md.
"""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()  # Before the study imports jax/TF (and for the training runs it starts).

import argparse
import logging
import shlex
from collections.abc import Sequence

from hephaestus_jax.mixing_law.report import STUDY_FILES, describe_optimum, report
from hephaestus_jax.mixing_law.study import StudyError, execute, measured_losses, plan_study


@command.entry_point
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
        print(f"optimal agent-data share ({fitted.headline_source}): {describe_optimum(fitted.headline)}; "
              f"predicted weighted loss {fitted.headline.weighted_loss:.4f}. Wrote {paths}")
    return 0


if __name__ == "__main__":
    os.chdir(REPO_ROOT)  # The configs' paths (data/, runs/, configs/) are relative to the repository.
    sys.exit(main())
