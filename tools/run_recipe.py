"""Run the three-stage Hephaestus recipe (stage I CPT -> stage II CPT -> SFT -> Hugging Face export).

    python tools/run_recipe.py --recipe configs/recipe/tiny.gin [--gin_param 'Recipe.output_dir="..."'] [--random_init]

Finished stages are skipped and an interrupted stage resumes, so the same command continues a recipe.
`--random_init` first writes a random-init Hugging Face checkpoint at Recipe.init_from_hf if it is missing
(toy runs; real runs start from a downloaded Llama-3 checkpoint).
"""

from hephaestus_jax import command

if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
    command.start()

import argparse
import logging
import os
import sys

import gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@command.entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="a recipe gin file (configs/recipe/*.gin)")
    parser.add_argument("--gin_param", action="append", default=[], help="a Recipe binding (repeatable)")
    parser.add_argument("--random_init", action="store_true", help="create Recipe.init_from_hf if missing")
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from hephaestus_jax import gin_configs
    from hephaestus_jax import recipe as recipe_lib
    from hephaestus_jax.config import ConfigError, ModelConfig

    gin_configs.load_gin([args.recipe], args.gin_param)
    recipe = recipe_lib.Recipe()
    gin.clear_config()
    if args.random_init and "://" in str(recipe.init_from_hf):
        raise ConfigError(f"--random_init writes a local directory; Recipe.init_from_hf={recipe.init_from_hf!r} is "
                          "remote (write the random checkpoint locally and upload it, or give a local path)")
    if args.random_init and recipe.init_from_hf and not os.path.exists(recipe.init_from_hf):
        from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint

        files = recipe.stage_arguments("stage1")
        gin_configs.load_gin([files[i + 1] for i in range(0, len(files), 2) if files[i] == "--gin_file"], [])
        write_random_hf_checkpoint(ModelConfig(), recipe.init_from_hf)
        gin.clear_config()
    recipe_lib.run_recipe(recipe)
    print(f"recipe done: {recipe.output_dir} (Hugging Face model: {recipe.export_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
