"""Remote (gs://...) directories for the converters, staged through a local temporary directory.

Conversion reads safetensors with positioned reads and export writes them with O_DIRECT; both need local
files. Conversion also appends parameters with Orbax partial saving, which Orbax cannot do on GCS (its GCS
commit protocol has no snapshot of the checkpoint written so far). A remote Hugging Face directory (or
tokenizer) is therefore copied to a local temporary directory first, and a remote output (converted
checkpoint or export) is written locally and uploaded when complete. Local inputs pass through untouched; a
local output is written under a temporary sibling name and renamed when complete, so that either way a
conversion that fails (or fails `--verify`) leaves nothing at the output path. The temporary copy needs as
much local disk as the model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath

from hephaestus_jax.convert.safetensors_io import ConversionError


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as gs://bucket/dir."""
    return "://" in str(path)


@contextlib.contextmanager
def local_input(path: str | None) -> Iterator[str | None]:
    """`path` itself when local (or None); for a remote directory, a local copy of its files (not subdirectories);
    for a remote file, a local copy of that file."""
    if path is None or not is_remote(path):
        yield path
        return
    source = epath.Path(path)
    if not source.exists():
        raise ConversionError(f"{path}: no such file or directory")
    with tempfile.TemporaryDirectory(prefix="hephaestus-input-") as tmp:
        if source.is_dir():
            for file in source.iterdir():
                if not file.is_dir():
                    file.copy(epath.Path(tmp) / file.name)
            yield tmp
        else:
            local = epath.Path(tmp) / source.name
            source.copy(local)
            yield str(local)


@contextlib.contextmanager
def local_output(directory: str) -> Iterator[str]:
    """A new local directory to write into, which becomes `directory` only once the block completes: renamed into
    place when `directory` is local (`<directory>.partial-<pid>` until then), uploaded when it is remote. If the
    block raises, the directory is deleted and nothing appears at `directory`. `directory` must not exist or be
    empty."""
    target = epath.Path(directory)
    if target.exists() and any(target.iterdir()):
        raise ConversionError(f"{directory} exists and is not empty; refusing to overwrite it")
    if not is_remote(directory):
        staging = f"{directory.rstrip('/')}.partial-{os.getpid()}"
        os.makedirs(staging)
        try:
            yield staging
            if os.path.isdir(directory):
                os.rmdir(directory)  # Empty (checked above); replaced by the rename.
            os.rename(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return
    with tempfile.TemporaryDirectory(prefix="hephaestus-output-") as tmp:
        local = os.path.join(tmp, "out")
        os.makedirs(local)
        yield local
        for root, _, files in sorted(os.walk(local)):
            directory = target / os.path.relpath(root, local)
            directory.mkdir(parents=True, exist_ok=True)
            for name in sorted(files):
                epath.Path(root, name).copy(directory / name)
