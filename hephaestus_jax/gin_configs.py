"""What every command line shares: the repository root, gin parsing into the configuration dataclasses, and
logging to stderr. Library code for the `python -m` modules and tools/; it imports only the configuration."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tokenize

import gin

from hephaestus_jax.config import ConfigError, DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Configs:
    """One run's configuration, as gin binds it."""

    model: ModelConfig
    mesh: MeshConfig
    optimizer: OptimizerConfig
    data: DataConfig
    train: TrainConfig


def load_gin(files: list[str], bindings: list[str]) -> None:
    """Parse gin files and bindings; ConfigError naming a missing file, or with gin's message naming the unknown
    or malformed binding and where it is."""
    for path in files:
        if not os.path.exists(path) and not os.path.exists(os.path.join(REPO_ROOT, path)):
            raise ConfigError(f"--gin_file {path}: file not found")
    gin.clear_config()
    for search_path in (os.getcwd(), REPO_ROOT):
        gin.add_config_file_search_path(search_path)
    try:
        gin.parse_config_files_and_bindings(files, bindings)
    except (ValueError, SyntaxError, tokenize.TokenError) as e:  # Gin's: unknown configurables, malformed bindings.
        raise ConfigError(str(e)) from None


def build_configs() -> Configs:
    """Instantiate every configuration dataclass from the parsed gin bindings (validated on construction)."""
    try:
        return Configs(ModelConfig(), MeshConfig(), OptimizerConfig(), DataConfig(), TrainConfig())
    except ConfigError:
        raise
    except ValueError as e:  # Gin's error for a binding of a parameter the dataclass does not have.
        raise ConfigError(str(e)) from None


def bound_train_batch_size() -> int:
    """TrainConfig.batch_size as bound in gin, else its default (for commands that build no TrainConfig, which
    needs an output_dir)."""
    try:
        return int(gin.query_parameter("TrainConfig.batch_size"))
    except ValueError:  # Not bound.
        return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "batch_size")


def log_to_stderr() -> None:
    """Show this package's INFO messages (absl, imported by TensorFlow/Orbax, keeps the root logger at WARNING)."""
    package = logging.getLogger("hephaestus_jax")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False
