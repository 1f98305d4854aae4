#!/usr/bin/env python3
"""Create, set up, launch, watch, stop and delete hephaestus_jax runs on Cloud TPU VM slices.

    python tools/tpu_vm.py create --name hx --zone us-east5-a --accelerator_type v5p-32
    python tools/tpu_vm.py setup  --name hx --zone us-east5-a --source_dir .
    python tools/tpu_vm.py launch --name hx --zone us-east5-a --run_name cpt1 --gin_file configs/stage1_cpt.gin ...

Every subcommand takes --dry_run (print the gcloud commands instead of running them). See docs/tpu_pod.md.
"""

import os
import sys

# This tool runs on a workstation that has gcloud but need not have the package installed; the module it
# calls uses only the standard library, so importing it from the checkout is enough.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hephaestus_jax.tpu_vm import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
