"""Every command's one error path (hephaestus_jax/command.py): bad input gives one line on stderr naming the file
or binding, exit status 2, no traceback (unless HEPHAESTUS_TRACEBACK=1) and nothing at the output path; a missing
optional dependency names the extra that installs it; a bug keeps its traceback.

The commands run as a user starts them (subprocesses, all at once: each start-up costs seconds); the training
command's start-up cases run in process (`train.main`), which is the same code path without the start-up cost."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

import gin
import pytest

from support.cli_helpers import load_tool
from conftest import REPO_ROOT
from support.forge_fixture import write_forge_fixture
from support.train_helpers import tiny_gin
from hephaestus_jax import command, gin_configs, recipe, startup, train
from hephaestus_jax.config import ModelConfig
from hephaestus_jax.convert.hf_to_orbax import convert_hf_to_orbax
from hephaestus_jax.convert.random_hf import write_random_hf_checkpoint
from hephaestus_jax.errors import InputError

SMALL = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, max_position_embeddings=512)
HF_EXTRA = "pip install -e '.[hf]'"


def _truncate(hf_dir, target) -> None:
    """`target`: a copy of `hf_dir` whose model.safetensors is cut short (its header intact)."""
    os.makedirs(target)
    with open(os.path.join(hf_dir, "config.json"), "rb") as f:
        open(os.path.join(target, "config.json"), "wb").write(f.read())
    with open(os.path.join(hf_dir, "model.safetensors"), "rb") as f:
        open(os.path.join(target, "model.safetensors"), "wb").write(f.read(5000))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Bad and good inputs: an empty directory, a small HF model, its Orbax checkpoint, a truncated copy, a text
    file named .gguf, a Forge tree."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {name: str(root / name) for name in ("empty", "hf", "checkpoint", "truncated", "forge")}
    os.makedirs(paths["empty"])
    write_random_hf_checkpoint(SMALL, paths["hf"])
    convert_hf_to_orbax(paths["hf"], paths["checkpoint"])
    _truncate(paths["hf"], paths["truncated"])
    paths["not_gguf"] = str(root / "model.gguf")
    open(paths["not_gguf"], "w").write("not a GGUF file\n")
    write_forge_fixture(root / "forge", records_per_file=(20, 6))
    return paths


def _blocking(modules: list[str], script: str) -> list[str]:
    """Python that runs tools/`script` as `python tools/<script>` would, with `modules` not installed."""
    return ["-c", f"import runpy, sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n"
                  f"sys.argv[0] = {script!r}\nrunpy.run_path({script!r}, run_name='__main__')"]


def _cases(inputs: dict[str, str], out) -> dict[str, tuple[list[str], dict[str, str], str, str]]:
    """id -> (python arguments, extra environment, output path, what stderr's last line says after 'error: ')."""
    empty, gin_file = inputs["empty"], tiny_gin(out, inputs["forge"])
    return {
        "orbax_to_hf-empty-checkpoint-dir": (
            ["tools/convert_orbax_to_hf.py", "--checkpoint_dir", empty, "--output_dir", str(out / "a")], {},
            str(out / "a"), f"tools/convert_orbax_to_hf.py: error: {empty}: contains no complete checkpoint step"),
        "orbax_to_hf-tokenizer-dir-without-tokenizer": (
            ["tools/convert_orbax_to_hf.py", "--checkpoint_dir", inputs["checkpoint"], "--tokenizer_dir", empty,
             "--output_dir", str(out / "b")], {},
            str(out / "b"), f"tools/convert_orbax_to_hf.py: error: --tokenizer_dir {empty}: none of"),
        "hf_to_orbax-truncated-safetensors": (
            ["tools/convert_hf_to_orbax.py", "--hf_dir", inputs["truncated"], "--output_dir", str(out / "c")], {},
            str(out / "c"),
            f"tools/convert_hf_to_orbax.py: error: {inputs['truncated']}/model.safetensors: truncated"),
        "gguf_to_hf-not-a-gguf-file": (
            ["tools/gguf_to_hf.py", "--gguf", inputs["not_gguf"], "--output_dir", str(out / "d")], {},
            str(out / "d"), f"tools/gguf_to_hf.py: error: {inputs['not_gguf']}: not a readable GGUF file"),
        "train-init_from-without-checkpoint": (
            ["-m", "hephaestus_jax.train", "--gin_file", gin_file, "--gin_param", f"TrainConfig.init_from={empty!r}"],
            {}, str(out / "run"),
            f"python -m hephaestus_jax.train: error: TrainConfig.init_from: {empty}: contains no complete checkpoint"),
        "gguf_to_hf-without-torch": (
            _blocking(["torch"], "tools/gguf_to_hf.py") + ["--gguf", inputs["not_gguf"], "--output_dir",
                                                           str(out / "e")], {},
            str(out / "e"), f"tools/gguf_to_hf.py: error: torch is not installed: {HF_EXTRA}"),
        "hf_to_orbax-verify-without-transformers": (  # Refused before converting, not after.
            _blocking(["transformers"], "tools/convert_hf_to_orbax.py") + [
                "--hf_dir", inputs["hf"], "--output_dir", str(out / "f"), "--verify"], {},
            str(out / "f"), f"tools/convert_hf_to_orbax.py: error: transformers is not installed: {HF_EXTRA}"),
        "traceback-on-request": (
            ["tools/convert_orbax_to_hf.py", "--checkpoint_dir", empty, "--output_dir", str(out / "g")],
            {command.TRACEBACK_ENV: "1"},
            str(out / "g"), f"tools/convert_orbax_to_hf.py: error: {empty}: contains no complete checkpoint step"),
    }


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str, str]]:
    """id -> (the finished command, its output path, the expected last line), all started at once."""
    out = tmp_path_factory.mktemp("out")
    env = {k: v for k, v in os.environ.items()  # As a user starts them: start-up noise filtered.
           if k not in ("TF_CPP_MIN_LOG_LEVEL", startup.VERBOSE_ENV, command.TRACEBACK_ENV)}
    started = {}
    for name, (args, extra_env, output, expected) in _cases(inputs, out).items():
        process = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env={**env, **extra_env}, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started[name] = (process, [sys.executable, *args], output, expected)
    results = {}
    for name, (process, args, output, expected) in started.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = (subprocess.CompletedProcess(args, process.returncode, stdout, stderr), output, expected)
    return results


CASES = ["orbax_to_hf-empty-checkpoint-dir", "orbax_to_hf-tokenizer-dir-without-tokenizer",
         "hf_to_orbax-truncated-safetensors", "gguf_to_hf-not-a-gguf-file", "train-init_from-without-checkpoint",
         "gguf_to_hf-without-torch", "hf_to_orbax-verify-without-transformers"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(finished, name):
    result, output, expected = finished[name]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1].startswith(expected), lines[-1]
    assert not os.path.exists(output)


def test_hephaestus_traceback_shows_the_traceback_too(finished):
    result, output, expected = finished["traceback-on-request"]
    assert result.returncode == 2 and "Traceback (most recent call last)" in result.stderr, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.strip()][-1].startswith(expected)
    assert not os.path.exists(output)


# ------------------------------------------------------------------------------------------ training start-up
def _train(capsys, gin_file: str, *bindings: str) -> tuple[int, str]:
    try:
        returncode = train.main(["--gin_file", gin_file, *[f"--gin_param={b}" for b in bindings]])
    finally:
        gin.clear_config()
    return returncode, capsys.readouterr().err


def _last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def _tiny_hf(tmp_path, gin_file: str) -> str:
    """A random HF model of the architecture `gin_file` configures."""
    gin_configs.load_gin([gin_file], [])
    try:
        write_random_hf_checkpoint(ModelConfig(), str(tmp_path / "tiny_hf"))
    finally:
        gin.clear_config()
    return str(tmp_path / "tiny_hf")


def test_train_checks_init_from_hf_before_it_creates_the_output_dir(tmp_path, inputs, capsys):
    """config.json of another architecture: refused before output_dir/config.gin or checkpoints/ exist."""
    returncode, stderr = _train(capsys, tiny_gin(tmp_path, inputs["forge"]),
                                f"TrainConfig.init_from_hf={inputs['hf']!r}")
    assert returncode == 2 and "Traceback" not in stderr
    assert _last_line(stderr).startswith(f"python -m hephaestus_jax.train: error: TrainConfig.init_from_hf="
                                         f"{inputs['hf']}: config.json differs from the gin ModelConfig: "
                                         "vocab_size: 256 vs 512"), stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_no_new_output_dir(tmp_path, inputs, capsys):
    """The weights turn out truncated while init_from_hf is converted into output_dir/init, after config.gin was
    written: the run's new output_dir goes with the failure."""
    gin_file = tiny_gin(tmp_path, inputs["forge"])
    truncated = str(tmp_path / "truncated_hf")
    _truncate(_tiny_hf(tmp_path, gin_file), truncated)
    returncode, stderr = _train(capsys, gin_file, f"TrainConfig.init_from_hf={truncated!r}")
    assert returncode == 2 and "Traceback" not in stderr
    assert _last_line(stderr).startswith(f"python -m hephaestus_jax.train: error: {truncated}/model.safetensors: "
                                         "truncated"), stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_failed_start_in_an_existing_output_dir_keeps_it(tmp_path, inputs, capsys):
    """A directory the run did not create (a resumed run's, or one the user made) is not removed."""
    gin_file = tiny_gin(tmp_path, inputs["forge"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    truncated = str(tmp_path / "truncated_hf")
    _truncate(_tiny_hf(tmp_path, gin_file), truncated)
    returncode, _ = _train(capsys, gin_file, f"TrainConfig.init_from_hf={truncated!r}")
    assert returncode == 2 and (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_a_recipe_stage_that_rejects_its_input_is_bad_input_of_the_recipe(tmp_path, inputs):
    """tools/run_recipe.py then says which stage failed in one line, after the stage's own line."""
    arguments = ["--gin_file", tiny_gin(tmp_path, inputs["forge"]),
                 "--gin_param", f"TrainConfig.init_from={inputs['empty']!r}"]
    with pytest.raises(InputError, match=r"^stage1 failed \(exit status 2\); rerun to resume it$"):
        recipe.run_stage("stage1", str(tmp_path / "run"), arguments)
    assert not (tmp_path / "run").exists()


def _gguf_with_a_sentencepiece_tokenizer(path: str) -> None:
    """A Llama-architecture GGUF whose tokenizer (`tokenizer.ggml.model` 'llama') the converter refuses; its one
    tensor is float32, so it passes the model checks, and transformers would load it (initialising the rest)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_block_count(1)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([b"a", b"b", b"c"])
    writer.add_token_types([1, 1, 1])
    writer.add_tensor("token_embd.weight", np.zeros((3, 16), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_to_hf_checks_the_tokenizer_before_it_writes_the_model(tmp_path, capsys):
    gguf_path = str(tmp_path / "model.gguf")
    _gguf_with_a_sentencepiece_tokenizer(gguf_path)
    assert load_tool("gguf_to_hf").main(["--gguf", gguf_path, "--output_dir", str(tmp_path / "hf")]) == 2
    assert _last_line(capsys.readouterr().err) == (f"tools/gguf_to_hf.py: error: {gguf_path}: tokenizer.ggml.model "
                                                   "is 'llama'; only byte-level BPE ('gpt2') is supported")
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------------ the shell
def test_a_bug_keeps_its_traceback_and_input_errors_do_not(capsys, monkeypatch):
    def buggy(argv):
        raise KeyError("internal")

    def bad_input(argv):
        raise InputError("x.json:3: expected an object\n(line 2 of the message)")

    with pytest.raises(KeyError):
        command.entry_point(buggy, prog="tools/x.py")([])
    monkeypatch.delenv(command.TRACEBACK_ENV, raising=False)
    assert command.entry_point(bad_input, prog="tools/x.py")([]) == 2
    assert capsys.readouterr().err == "tools/x.py: error: x.json:3: expected an object; (line 2 of the message)\n"
    assert command.entry_point(lambda argv: open(os.devnull + "/nope"), prog="tools/x.py")([]) == 2
    assert capsys.readouterr().err == f"tools/x.py: error: {os.devnull}/nope: Not a directory\n"


def _command_files() -> list[str]:
    tools = sorted(glob.glob(os.path.join(REPO_ROOT, "tools", "*.py")))
    return tools + [os.path.join(REPO_ROOT, "hephaestus_jax", f"{name}.py") for name in ("train", "evaluate",
                                                                                       "generate")]


def _decorated_mains(path: str) -> bool:
    """Whether the module's `main` is defined here under `@command.entry_point`, or imported from a module of the
    package whose `main` is."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            return any(ast.unparse(d).startswith("command.entry_point") for d in node.decorator_list)
        if isinstance(node, ast.ImportFrom) and any(alias.name == "main" for alias in node.names):
            source = os.path.join(REPO_ROOT, *node.module.split(".")) + ".py"
            return _decorated_mains(source)
    return False


@pytest.mark.parametrize("path", _command_files(), ids=lambda path: os.path.relpath(path, REPO_ROOT))
def test_every_command_runs_its_main_through_the_shell(path):
    assert _decorated_mains(path), f"{path}: main is not wrapped in @command.entry_point"


def test_the_shell_imports_only_the_standard_library():
    """So that commands import it before start-up, and tools/tpu_vm.py runs from a bare checkout."""
    for name in ("command", "errors", "startup"):
        tree = ast.parse(open(os.path.join(REPO_ROOT, "hephaestus_jax", f"{name}.py"), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert all(n.split(".")[0] in sys.stdlib_module_names | {"__future__"}
                           or n in ("hephaestus_jax", "hephaestus_jax.errors") for n in names), (name, names)
