"""Build the bundled Forge sample in data/ from real material on this machine (the Python standard library).

    python tools/build_sample_forge.py [--output_dir data] [--seed 0]

Writes {output_dir}/forge/{tool_docs,trajectories,code,text,sft}/{train,validation}-*.jsonl, the stage-II seed
subset {output_dir}/forge/seed/{tool_docs,trajectories}/..., the BFCL-format function-calling set on held-out APIs
{output_dir}/eval/BFCL_v3_*.json (+ possible_answer/), and {output_dir}/manifest.json (counts, held-out APIs).
Deterministic: the same seed and Python version give the same bytes. data/README.md describes the sources and
their licenses.
"""

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import json
import sys

from hephaestus_jax.sample.build import build_sample


@command.entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data", help="where forge/, eval/ and manifest.json go")
    parser.add_argument("--seed", type=int, default=0, help="the sample is a function of it")
    args = parser.parse_args(argv)
    manifest = build_sample(args.output_dir, seed=args.seed)
    print(json.dumps({"apis": {k: len(v) for k, v in manifest["apis"].items()},
                      "records": {k: v["records"] for k, v in manifest["files"].items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
