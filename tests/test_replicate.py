"""tools/replicate.py end to end at a tiny budget: three arms, both evaluation sets, the report, and a rerun
that trains and evaluates nothing again."""

import json
import os
import shutil

import gin
import numpy as np
import pytest

from support.cli_helpers import load_tool
from support.forge_fixture import write_forge_fixture
from hephaestus_jax import gin_configs, recipe
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint
from support.smollm2_files import smollm2_hf_dir, smollm2_tokenizer_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

TINY = ("ModelConfig.vocab_size = 49152", "ModelConfig.bos_token_id = 1", "ModelConfig.eos_token_id = 2")


@pytest.fixture
def tiny_chatml_model(tmp_path, smollm2_tokenizer_dir):  # noqa: F811
    """A random-init tiny Llama with SmolLM2's ChatML tokenizer files."""
    directory = str(tmp_path / "hf")
    gin_configs.load_gin(["configs/model/tiny.gin"], list(TINY))
    try:
        write_random_hf_checkpoint(ModelConfig(), directory)
    finally:
        gin.clear_config()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):  # Not its weights or config.
        shutil.copy(os.path.join(smollm2_tokenizer_dir, name), directory)
    return directory


def test_three_arms_evaluated_on_the_same_questions_and_a_rerun_redoes_nothing(tmp_path, tiny_chatml_model):
    pytest.importorskip("bfcl_eval", reason="pip install --no-deps bfcl-eval (README's test command)")
    replicate = load_tool("replicate")
    write_forge_fixture(tmp_path / "forge", records_per_file=(20, 6))
    out, doc = tmp_path / "run", tmp_path / "replication.md"
    argv = ["--output_dir", str(out), "--hf_dir", tiny_chatml_model, "--model_gin", "configs/model/tiny.gin",
            *[arg for binding in TINY for arg in ("--model_param", binding)], "--data_dir", str(tmp_path / "forge"),
            "--stage1_steps", "2", "--stage2_steps", "1", "--sft_steps", "2", "--batch_size", "8", "--seq_len", "64",
            "--heldout_per_category", "2", "--bfcl_per_category", "1", "--max_new_tokens", "4",
            "--eval_batch_size", "8", "--loss_batches", "1", "--doc", str(doc)]
    assert replicate.main(argv) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["base", "sft_only", "recipe"]
    for arm, results in summary.items():
        assert set(results["accuracy"]["bfcl_v4"]) == {"simple", "multiple", "parallel", "parallel_multiple",
                                                       "irrelevance"}
        assert {c["total"] for c in results["accuracy"]["bfcl_v4"].values()} == {1}
        assert {c["total"] for c in results["accuracy"]["heldout"].values()} == {2}
        for cells in results["accuracy"].values():
            assert all(c["low"] <= c["accuracy"] <= c["high"] for c in cells.values()), (arm, cells)
        assert set(results["losses"]) == {"forge_tool_docs", "forge_trajectories", "forge_code", "forge_text",
                                          "forge_sft"}
        assert all(np.isfinite(list(results["losses"].values())))
    # The same questions for every arm; the trained arms moved away from the base model.
    ids = {arm: [i["id"] for s in ("heldout", "bfcl_v4")
                 for i in json.loads((out / "eval" / arm / f"{s}.json").read_text())["items"]] for arm in summary}
    assert ids["base"] == ids["sft_only"] == ids["recipe"] and len(ids["base"]) == 15
    assert summary["sft_only"]["losses"]["forge_sft"] != summary["base"]["losses"]["forge_sft"]
    assert summary["recipe"]["losses"]["forge_code"] != summary["sft_only"]["losses"]["forge_code"]
    for stage, steps in zip(recipe.STAGES, (2, 1, 2)):
        assert recipe.finished(str(out / "recipe" / stage), steps)
    assert recipe.finished(str(out / "sft_only"), 2)
    # Arm (b) is the recipe's SFT stage started from the base checkpoint instead of stage II.
    sft_config = (out / "sft_only" / "config.gin").read_text()
    assert "forge_sft" in sft_config and str(out / "base" / "checkpoints") in sft_config
    report = doc.read_text()
    assert "python tools/replicate.py --output_dir" in report and "(c) CPT I+II + SFT" in report
    assert "| parallel_multiple |" in report and "forge_trajectories" in report
    assert os.path.getsize(tmp_path / "replication.png") > 10_000

    # A rerun: every stage and evaluation is skipped, only the report is written again.
    written = {p: os.path.getmtime(p) for p in map(str, out.rglob("*")) if os.path.isfile(p)
               and not p.endswith("summary.json")}
    timings = (out / "timings.json").read_text()
    assert "(Not written yet." in report
    doc.write_text(report.replace(report.split("## Reading it\n", 1)[1], "\nWhat it shows.\n"))
    assert replicate.main(argv) == 0
    assert {p: os.path.getmtime(p) for p in written} == written
    assert (out / "timings.json").read_text() == timings
    assert doc.read_text() == report.split("## Reading it\n", 1)[0] + "## Reading it\n\nWhat it shows.\n"

    # A stopped run: --report_only reports the arms evaluated so far and names the rest.
    (out / "eval" / "recipe" / "losses.json").unlink()
    assert replicate.main(argv + ["--report_only"]) == 0
    partial = doc.read_text()
    assert "Not run yet: (c) CPT I+II + SFT" in partial and "| (a) base | (b) SFT only |\n" in partial
    assert "--report_only" not in partial and "What it shows." in partial
    assert list(json.loads((out / "summary.json").read_text())) == ["base", "sft_only"]

