"""The paper's three-stage recipe as one resumable run: stage I CPT -> stage II CPT -> SFT -> Hugging Face export.

A recipe gin file binds `Recipe`: the gin files every stage shares (model, mesh, data location) and each
stage's own files and bindings. Stage k starts from stage k-1's final params (`TrainConfig.init_from`, fresh
optimizer); stage I from `Recipe.init_from` or `Recipe.init_from_hf`. Each stage is an ordinary training run
(`python -m hephaestus_jax.train`) in `<output_dir>/<stage>`: a finished stage is skipped, an interrupted one
resumes from its latest checkpoint. The last stage exports the model to `<output_dir>/hf_export`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys

from etils import epath
import gin

from hephaestus_jax import stored_checkpoint as ckpt
from hephaestus_jax import gin_configs
from hephaestus_jax.config import ConfigError, TrainConfig
from hephaestus_jax.errors import InputError

log = logging.getLogger(__name__)
STAGES = ("stage1", "stage2", "sft")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Recipe:
    output_dir: str = ""
    common_gin_files: tuple[str, ...] = ()
    common_gin_params: tuple[str, ...] = ()
    stage1_gin_files: tuple[str, ...] = ("configs/stage1_cpt.gin",)
    stage2_gin_files: tuple[str, ...] = ("configs/stage2_cpt.gin",)
    sft_gin_files: tuple[str, ...] = ("configs/sft.gin",)
    stage1_gin_params: tuple[str, ...] = ()
    stage2_gin_params: tuple[str, ...] = ()
    sft_gin_params: tuple[str, ...] = ()
    init_from: str | None = None
    init_from_hf: str | None = None

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("Recipe.output_dir must be set")
        if bool(self.init_from) == bool(self.init_from_hf):
            raise ConfigError("set exactly one of Recipe.init_from and Recipe.init_from_hf")

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.output_dir, stage)

    def stage_arguments(self, stage: str) -> list[str]:
        """The train CLI arguments of `stage`: shared files, the stage's files, then the wiring bindings."""
        files = list(self.common_gin_files) + list(getattr(self, f"{stage}_gin_files"))
        previous = STAGES[STAGES.index(stage) - 1] if stage != STAGES[0] else None
        wiring = [f"TrainConfig.output_dir = {self.stage_dir(stage)!r}", "TrainConfig.init_from = None",
                  "TrainConfig.init_from_hf = None", "TrainConfig.export_hf_dir = None"]
        if previous:
            wiring.append(f"TrainConfig.init_from = {os.path.join(self.stage_dir(previous), 'checkpoints')!r}")
        elif self.init_from:
            wiring.append(f"TrainConfig.init_from = {self.init_from!r}")
        else:
            wiring.append(f"TrainConfig.init_from_hf = {self.init_from_hf!r}")
        if stage == STAGES[-1]:
            wiring.append(f"TrainConfig.export_hf_dir = {self.export_dir!r}")
        params = list(self.common_gin_params) + list(getattr(self, f"{stage}_gin_params")) + wiring
        return [arg for path in files for arg in ("--gin_file", path)] + \
               [arg for param in params for arg in ("--gin_param", param)]

    @property
    def export_dir(self) -> str:
        return os.path.join(self.output_dir, "hf_export")


def stage_steps(arguments: list[str]) -> int:
    """TrainConfig.num_steps as the train CLI would see it with `arguments`."""
    files = [arguments[i + 1] for i in range(0, len(arguments), 2) if arguments[i] == "--gin_file"]
    params = [arguments[i + 1] for i in range(0, len(arguments), 2) if arguments[i] == "--gin_param"]
    try:
        gin_configs.load_gin(files, params)
        return TrainConfig().num_steps
    finally:
        gin.clear_config()


def finished(stage_dir: str, num_steps: int) -> bool:
    """Whether the stage's checkpoints reached `num_steps`."""
    directory = os.path.join(stage_dir, "checkpoints")
    if not epath.Path(directory).is_dir():  # Local or gs://.
        return False
    steps = ckpt.manager(directory).all_steps()
    return bool(steps) and max(steps) >= num_steps


def run_stage(name: str, stage_dir: str, arguments: list[str], extra_env: dict[str, str] | None = None,
              output: str | None = None) -> bool:
    """Train one stage (`python -m hephaestus_jax.train ARGUMENTS`) in `stage_dir` unless its checkpoints already
    reached the configured steps (and `output`, a file or directory the stage writes at its end, exists).

    Returns whether it trained; an interrupted stage resumes from its latest checkpoint. Raises if it fails or
    stops early (preemption), saying that a rerun resumes it."""
    steps = stage_steps(arguments)
    if finished(stage_dir, steps) and (output is None or epath.Path(output).exists()):
        log.info("%s already finished in %s; skipping", name, stage_dir)
        return False
    log.info("running %s in %s", name, stage_dir)
    result = subprocess.run([sys.executable, "-m", "hephaestus_jax.train", *arguments],
                            env={**os.environ, **(extra_env or {})})
    if result.returncode:  # Exit status 2: the stage rejected its input and said why (one line).
        failure = InputError if result.returncode == 2 else RuntimeError
        raise failure(f"{name} failed (exit status {result.returncode}); rerun to resume it")
    if not finished(stage_dir, steps):  # Preempted: saved, exited cleanly.
        raise RuntimeError(f"{name} stopped early (preemption); rerun to resume it")
    return True


def run_recipe(recipe: Recipe, extra_env: dict[str, str] | None = None) -> None:
    """Run the stages in order, skipping finished ones; raises if a stage fails."""
    for stage in STAGES:
        run_stage(stage, recipe.stage_dir(stage), recipe.stage_arguments(stage), extra_env,
                  output=recipe.export_dir if stage == STAGES[-1] else None)
