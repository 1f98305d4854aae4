"""The three-stage recipe runner: stage wiring, skipping finished stages, resuming, the final export."""

import json
import os

import gin
import numpy as np
import pytest

from support.forge_fixture import write_forge_fixture
from hephaestus_jax import gin_configs, recipe
from hephaestus_jax.metrics import read_metrics


def _tiny_recipe(tmp_path, data_dir, steps=(4, 2, 2)) -> recipe.Recipe:
    gin.clear_config()
    gin_configs.load_gin(["configs/recipe/tiny.gin"], [
        f"Recipe.output_dir = {str(tmp_path / 'recipe')!r}",
        f"Recipe.init_from_hf = {str(tmp_path / 'hf_init')!r}",
    ])
    base = recipe.Recipe()
    gin.clear_config()
    common = base.common_gin_params + (f"ForgeFiles.data_dir = {str(data_dir)!r}", "DataConfig.seq_len = 32",
                                       "TrainConfig.batch_size = 8",  # 8 simulated devices in tests.
                                       "TrainConfig.log_every = 1", "TrainConfig.checkpoint_every = 2")
    return base.__class__(**{**base.__dict__, "common_gin_params": common,
                             "stage1_gin_params": (f"TrainConfig.num_steps = {steps[0]}",),
                             "stage2_gin_params": (f"TrainConfig.num_steps = {steps[1]}",),
                             "sft_gin_params": (f"TrainConfig.num_steps = {steps[2]}",)})


def test_stages_are_wired_one_after_another(tmp_path):
    stages = _tiny_recipe(tmp_path, tmp_path / "forge")
    first, second, third = (stages.stage_arguments(s) for s in recipe.STAGES)
    assert f"TrainConfig.init_from_hf = {str(tmp_path / 'hf_init')!r}" in first
    assert f"TrainConfig.init_from = {str(tmp_path / 'recipe' / 'stage1' / 'checkpoints')!r}" in second
    assert f"TrainConfig.init_from = {str(tmp_path / 'recipe' / 'stage2' / 'checkpoints')!r}" in third
    assert f"TrainConfig.export_hf_dir = {str(tmp_path / 'recipe' / 'hf_export')!r}" == third[-1]
    assert "configs/sft.gin" in third and "configs/stage2_cpt.gin" in second
    assert recipe.stage_steps(third) == 2


@pytest.mark.slow
def test_tiny_recipe_runs_all_stages_then_skips_them(tmp_path):
    import transformers

    from hephaestus_jax.config import ModelConfig
    from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint

    write_forge_fixture(tmp_path / "forge", records_per_file=(20, 6))
    stages = _tiny_recipe(tmp_path, tmp_path / "forge")
    gin_configs.load_gin(["configs/model/tiny.gin"], [])
    write_random_hf_checkpoint(ModelConfig(), stages.init_from_hf)
    gin.clear_config()

    recipe.run_recipe(stages)
    for stage, steps in zip(recipe.STAGES, (4, 2, 2)):
        assert recipe.finished(stages.stage_dir(stage), steps)
        losses = [e["loss"] for e in read_metrics(os.path.join(stages.stage_dir(stage), "metrics.jsonl"))]
        assert len(losses) == steps and all(np.isfinite(losses))
    sft_config = open(os.path.join(stages.stage_dir("sft"), "config.gin")).read()
    assert "forge_sft" in sft_config
    model = transformers.AutoModelForCausalLM.from_pretrained(stages.export_dir)
    assert model.config.vocab_size == 128256
    assert json.load(open(os.path.join(stages.export_dir, "config.json")))["tie_word_embeddings"] is True

    # Everything finished: a rerun trains nothing.
    mtimes = {s: os.path.getmtime(os.path.join(stages.stage_dir(s), "metrics.jsonl")) for s in recipe.STAGES}
    recipe.run_recipe(stages)
    assert mtimes == {s: os.path.getmtime(os.path.join(stages.stage_dir(s), "metrics.jsonl")) for s in recipe.STAGES}
