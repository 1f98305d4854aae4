"""README's first command, scaled down: random-init HF checkpoint -> Orbax -> CPT on the bundled data/ -> HF."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_quickstart_trains_on_the_bundled_sample_and_exports_to_hugging_face(tmp_path):
    import torch
    import transformers

    out = tmp_path / "quickstart"
    bindings = [f"TrainConfig.output_dir = '{out}/train'", f"TrainConfig.init_from_hf = '{out}/hf_random_init'",
                f"TrainConfig.export_hf_dir = '{out}/hf_export'", "TrainConfig.num_steps = 30",
                "TrainConfig.log_every = 5", "TrainConfig.checkpoint_every = 30", "TrainConfig.eval_every = 30",
                "TrainConfig.eval_max_batches = 1", "DataConfig.seq_len = 128", "OptimizerConfig.warmup_steps = 5"]
    command = [sys.executable, os.path.join(REPO_ROOT, "tools", "quickstart.py")] + [f"--gin_param={b}" for b in bindings]
    # As a user runs it: one CPU device (not the 8 simulated ones the other tests use), from another directory.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote a random-init Hugging Face checkpoint to {out}/hf_random_init" in result.stdout
    last_line = result.stdout.strip().splitlines()[-1]
    for where in ("checkpoints:", "tensorboard:", f"hugging face export: {out}/hf_export"):
        assert where in last_line, last_line

    config = open(out / "train" / "config.gin").read()
    assert "ForgeFiles.data_dir = 'data/forge'" in config  # the bundled sample, not a test fixture
    metrics = [json.loads(line) for line in open(out / "train" / "metrics.jsonl")]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 1.5, losses  # from ~ln(128256) = 11.8 (measured: 11.75 -> 9.42)
    assert any(key.startswith("eval/loss/forge_") for m in metrics for key in m)

    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf_export")
    ids = torch.tensor([[128000, 9906, 1917]])  # <|begin_of_text|>Hello world
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 3, 128256) and torch.isfinite(logits).all()
