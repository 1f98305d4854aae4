"""README's real-model block, run as printed: SmolLM2-135M-Instruct GGUF -> HF -> Orbax (verified) -> a chat ->
an SFT step in its own template -> a bfloat16 HF export (verified). The test reads the block from README.md, so it
follows the README; it substitutes only the step count and the output directories, and skips the install line."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from support.cli_helpers import verify_figures
from hephaestus_jax.metrics import read_metrics

pytestmark = pytest.mark.slow

HEADING = "### A real model on a CPU"
OUTPUT_DIRS = ("hf/", "ckpt/", "runs/")


def readme_block() -> str:
    """The first ```bash block after HEADING in README.md."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert HEADING in text, f"README.md has no section {HEADING!r}"
    match = re.search(r"```bash\n(.*?)\n```", text.split(HEADING, 1)[1], flags=re.DOTALL)
    assert match, f"README.md's section {HEADING!r} has no bash block"
    return match.group(1)


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined."""
    return [command.strip() for command in re.sub(r"\\\n\s*", "", block).split("\n") if command.strip()]


def substituted(command: str, out: str) -> str:
    """The command with its output directories under `out` and 1 training step instead of the README's."""
    for directory in OUTPUT_DIRS:
        command = re.sub(rf"(?<=[\s'=]){re.escape(directory)}", f"{out}/{directory}", command)
    return re.sub(r"TrainConfig\.num_steps=\d+", "TrainConfig.num_steps=1", command)


def test_the_readme_block_is_what_this_test_runs():
    """The parsing above finds every step of the block (a README edit that hides a step from the test fails here)."""
    lines = commands(readme_block())
    assert lines[0].startswith("pip install")
    assert [line.split()[1] if line.startswith("python") else line.split("=")[0] for line in lines[1:]] == [
        "GGUF", "tools/gguf_to_hf.py", "tools/convert_hf_to_orbax.py", "-m", "-m", "tools/convert_orbax_to_hf.py"]
    assert "TrainConfig.num_steps=1" in substituted(lines[5], "/o") and "/o/runs/smollm2-sft" in substituted(
        lines[5], "/o")


def test_the_readme_real_model_block_runs_as_printed(tmp_path):
    lines = commands(readme_block())
    script = "\n".join(["set -euo pipefail", *(substituted(line, str(tmp_path)) for line in lines[1:])])
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               XLA_FLAGS="")  # One CPU device, as a user has (the suite's conftest simulates 8).
    result = subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=1500)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Paris" in result.stdout, result.stdout  # the chat, in SmolLM2's own template
    verified = [verify_figures(line) for line in result.stdout.splitlines() if line.startswith("max_abs_logit_diff=")]
    assert len(verified) == 2, result.stdout  # Float32 import and bfloat16 export, both against transformers.
    assert all(0 < diff <= bound and verdict == "passed" for diff, bound, verdict in verified), verified
    assert os.path.isfile(tmp_path / "hf" / "smollm2-sft" / "config.json")
    losses = [entry["loss"] for entry in read_metrics(str(tmp_path / "runs" / "smollm2-sft" / "metrics.jsonl"))
              if "loss" in entry]
    assert losses and 0 < losses[-1] < 5.0, losses  # SmolLM2 already predicts SFT targets in its own template
    assert "verification FAILED" not in output
