"""The quickstart: random-init tiny Llama-3-architecture HF checkpoint -> Orbax -> CPT on data/ -> HF export.

    python tools/quickstart.py [--gin_param 'TrainConfig.num_steps=50' ...]

Creates the Hugging Face checkpoint that configs/quickstart.gin starts from (TrainConfig.init_from_hf), then runs
`python -m hephaestus_jax.train --gin_file configs/quickstart.gin`, which converts it, trains and exports.
"""

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO_ROOT, "configs", "quickstart.gin")


@command.entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_param", action="append", default=[], help="extra gin binding (repeatable)")
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)  # The quickstart's paths (data/, runs/) are relative to the repository.

    from hephaestus_jax import gin_configs, train
    from hephaestus_jax.config import ModelConfig, TrainConfig
    from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint

    gin_configs.load_gin([QUICKSTART], args.gin_param)
    hf_dir = TrainConfig().init_from_hf
    if not os.path.exists(hf_dir):
        write_random_hf_checkpoint(ModelConfig(), hf_dir)
        print(f"wrote a random-init Hugging Face checkpoint to {hf_dir}")
    return train.main(["--gin_file", QUICKSTART] + [f"--gin_param={p}" for p in args.gin_param])


if __name__ == "__main__":
    sys.exit(main())
