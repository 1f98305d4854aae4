"""Run the mixing-ratio scaling-law study: train at several agent-data shares, fit held-out loss, print the optimum.

    python tools/mixture_study.py --gin_file configs/mixture_study/toy.gin [--gin_param ...] [--dry_run|--fit_only]

Finished runs are skipped, so the same command resumes a study. Paths are relative to the repository root.
See docs/mixture_study.md.
"""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    from hephaestus_jax import command

    command.start()  # Before the study imports jax/TF (and for the training runs it starts).
    os.chdir(REPO_ROOT)  # The configs' paths (data/, runs/, configs/) are relative to the repository.
    from hephaestus_jax.mixture_study import main

    sys.exit(main())
