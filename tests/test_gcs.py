"""Every path option the README lists, against gs:// on a real local GCS emulator (fake-gcs-server).

One emulator serves the whole module (tests/support/gcs_emulator.py starts it on 127.0.0.1 on a free port and stops
it; no other network). Each client library needs the endpoint set its own way, all through environment
variables that the `gcs` fixture exports for this process and the CLI subprocesses it starts:
- Orbax array data goes through TensorStore's GCS kvstore: `TENSORSTORE_GCS_HTTP_URL` (endpoint) and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a bearer token, so no Google credentials are looked up).
- etils.epath (Orbax's directories and commit markers, metrics.jsonl, config.gin, evaluation outputs, the
  converters' staging) uses TensorFlow's GCS filesystem for gs:// when TensorFlow is installed, as does
  tf.io.gfile (Forge data). Its endpoints are compiled in, so its libcurl is sent through the test proxy
  (tests/support/gcs_proxy.py) with `https_proxy`/`http_proxy`, trusts the proxy's self-signed certificate through
  `CURL_CA_BUNDLE`, and skips the metadata server with `NO_GCE_CHECK=true` (+ the same test token).
- google-cloud-storage / gcsfs would use `STORAGE_EMULATOR_HOST` (set too; the project does not use them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from etils import epath
import numpy as np
import pytest
from safetensors.numpy import load_file

from support.cli_helpers import verify_figures
from conftest import REPO_ROOT
from support.forge_fixture import write_forge_fixture
from support.gcs_emulator import GcsEmulator
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint
from hephaestus_jax.metrics import read_metrics
from support.train_helpers import run_train, tiny_gin

BUCKET = "gs://hephaestus-test"
SMALL = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator, with this process's environment pointing every client at it while the module runs."""
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs"))
    emulator.create_bucket(BUCKET.removeprefix("gs://"))
    saved = {key: os.environ.get(key) for key in emulator.environ()}
    os.environ.update(emulator.environ())
    yield emulator
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    emulator.stop()


def _upload(local, remote: str) -> None:
    """Copy a local tree to gs:// (through epath, i.e. TensorFlow's GCS client)."""
    for root, _, files in os.walk(local):
        for name in files:
            target = epath.Path(remote) / os.path.relpath(os.path.join(root, name), local)
            target.parent.mkdir(parents=True, exist_ok=True)
            epath.Path(root, name).copy(target)


def _tool(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", script), *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow  # Two CLI runs (TensorFlow, torch imports): about 40 s on 2 busy cores.
def test_conversion_in_and_out_with_every_path_on_gs(gcs, tmp_path):
    write_random_hf_checkpoint(SMALL, str(tmp_path / "hf"), max_shard_bytes=100_000)  # Sharded, with an index.
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    _upload(tmp_path / "hf", f"{BUCKET}/hf")
    _upload(tmp_path / "tokenizer", f"{BUCKET}/tokenizer")

    # No --verify here: the export below verifies against the gs:// export, and the round trip is exact.
    _tool("convert_hf_to_orbax.py", "--hf_dir", f"{BUCKET}/hf", "--output_dir", f"{BUCKET}/ckpt")
    assert not os.path.exists(os.path.join(REPO_ROOT, "gs:"))  # Nothing went to a local path named gs:/...
    assert (epath.Path(BUCKET) / "ckpt" / "0").is_dir()

    exported = _tool("convert_orbax_to_hf.py", "--checkpoint_dir", f"{BUCKET}/ckpt", "--output_dir",
                     f"{BUCKET}/export", "--tokenizer_dir", f"{BUCKET}/tokenizer", "--verify")
    diff, bound, verdict = verify_figures(exported.stdout)
    assert diff <= bound and verdict == "passed"
    names = sorted(p.name for p in (epath.Path(BUCKET) / "export").iterdir())
    assert "tokenizer_config.json" in names and "config.json" in names, names
    (tmp_path / "back").mkdir()
    for name in names:
        (epath.Path(BUCKET) / "export" / name).copy(tmp_path / "back" / name)
    assert (tmp_path / "back" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}\n'

    def tensors(directory):
        return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}

    original, back = tensors(tmp_path / "hf"), tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name, value in original.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_export_refuses_a_non_empty_gs_output(gcs, tmp_path):
    marker = epath.Path(BUCKET) / "occupied" / "keep.txt"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("x")
    from hephaestus_jax.convert.orbax_to_hf import convert_orbax_to_hf
    from hephaestus_jax.convert.safetensors_io import ConversionError

    with pytest.raises(ConversionError, match="occupied exists and is not empty"):
        convert_orbax_to_hf(f"{BUCKET}/no-checkpoint-needed", f"{BUCKET}/occupied")


@pytest.fixture(scope="module")
def trained_run(gcs, tmp_path_factory):
    """A 4-step tiny training run whose Forge data, checkpoints and metrics are all on gs://."""
    local = tmp_path_factory.mktemp("train")
    write_forge_fixture(local / "forge", records_per_file=(20, 6))
    _upload(local / "forge", f"{BUCKET}/forge")
    gin_file = tiny_gin(local, f"{BUCKET}/forge", **{
        "TrainConfig.output_dir": repr(f"{BUCKET}/run"), "TrainConfig.num_steps": 4,
        "TrainConfig.log_every": 2, "TrainConfig.checkpoint_every": 2})
    result = run_train("--gin_file", gin_file)
    assert result.returncode == 0, result.stderr[-3000:]
    return gin_file


@pytest.mark.slow  # Its fixture uploads a Forge tree and trains 4 steps in a subprocess: about 70 s.
def test_training_reads_forge_data_and_writes_checkpoints_and_metrics_on_gs(trained_run):
    run = epath.Path(BUCKET) / "run"
    assert [e["step"] for e in read_metrics(run / "metrics.jsonl") if "loss" in e] == [2, 4]
    assert {"2", "4"} <= {p.name for p in (run / "checkpoints").iterdir()}
    assert "ForgeFiles.data_dir = 'gs://" in (run / "config.gin").read_text()
    assert list((run / "tensorboard").iterdir())


def test_evaluation_reads_and_writes_gs(trained_run):
    import gin

    from hephaestus_jax import evaluate

    output = f"{BUCKET}/eval/losses.jsonl"
    try:
        assert evaluate.main(["loss", "--gin_file", trained_run, "--checkpoint_dir", f"{BUCKET}/run/checkpoints",
                              "--max_batches", "1", "--output", output]) == 0
    finally:
        gin.clear_config()
    (written,) = [json.loads(line) for line in epath.Path(output).read_text().splitlines()]
    assert written["step"] == 4 and 0 < written["eval/loss/forge_text"] < 15


def test_recipe_sees_finished_stages_on_gs(trained_run):
    from hephaestus_jax import recipe

    assert recipe.finished(f"{BUCKET}/run", 4)  # Skipped on a rerun; was always False (os.path) on gs://.
    assert not recipe.finished(f"{BUCKET}/run", 5)
    assert not recipe.finished(f"{BUCKET}/no-such-stage", 1)


def test_run_recipe_refuses_random_init_on_gs(gcs, capsys):
    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    try:
        import run_recipe
    finally:
        sys.path.pop(0)
    cwd = os.getcwd()
    try:
        assert run_recipe.main(["--recipe", "configs/recipe/tiny.gin", "--random_init", "--gin_param",
                                f"Recipe.init_from_hf = '{BUCKET}/hf-init'"]) == 2
    finally:
        os.chdir(cwd)
    assert "--random_init writes a local directory" in capsys.readouterr().err


def test_init_from_hf_config_is_read_from_gs(gcs, tmp_path):
    from hephaestus_jax.convert.hf_to_orbax import read_hf_config

    write_random_hf_checkpoint(SMALL, str(tmp_path / "hf"))
    (epath.Path(BUCKET) / "hf-config").mkdir(parents=True, exist_ok=True)
    epath.Path(tmp_path / "hf" / "config.json").copy(epath.Path(BUCKET) / "hf-config" / "config.json")
    config, raw = read_hf_config(f"{BUCKET}/hf-config")
    assert (config.hidden_size, config.num_layers, raw["vocab_size"]) == (64, 2, 256)


def test_function_calling_reads_its_inputs_and_writes_its_outputs_on_gs(trained_run):
    """BFCL questions and answers, the tokenizer and the checkpoint from gs://; results and records to gs://; the
    records, re-scored from gs:// without a model, give the same report."""
    from hephaestus_jax import evaluate

    _upload(os.path.join(REPO_ROOT, "data", "eval"), f"{BUCKET}/bfcl")
    tokenizer = epath.Path(trained_run).parent / "byte_tokenizer" / "tokenizer.model"  # The run's (tiny_gin).
    tokenizer.copy(epath.Path(f"{BUCKET}/tokenizer/tokenizer.model"))
    common = ["--dataset", f"{BUCKET}/bfcl", "--category", "simple", "--limit", "2"]
    results, predictions = f"{BUCKET}/fc/results.json", f"{BUCKET}/fc/results.records.jsonl"
    assert evaluate.main(["function_calling", "--checkpoint_dir", f"{BUCKET}/run/checkpoints", "--tokenizer",
                          f"{BUCKET}/tokenizer", "--max_new_tokens", "4", "--output", results, *common]) == 0
    written = json.loads(epath.Path(results).read_text())
    assert written["run"]["step"] == 4 and written["report"]["total"] == 2
    assert len(epath.Path(predictions).read_text().splitlines()) == 2
    rescored = f"{BUCKET}/fc/rescored.json"
    assert evaluate.main(["function_calling", "--predictions", predictions, "--output", rescored, *common]) == 0
    assert json.loads(epath.Path(rescored).read_text())["report"] == written["report"]
