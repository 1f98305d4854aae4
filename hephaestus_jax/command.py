"""The shell every command runs in (`python -m hephaestus_jax.<cli>`, tools/*.py): quiet start-up, then the
command's `main(argv)` (its argparse lives there) with one-line errors.

    from hephaestus_jax import command

    if __name__ == "__main__":  # A command, not a library import: quiet start-up before jax/TF load.
        command.start()

    import jax  # ... the command's imports

    @command.entry_point
    def main(argv=None) -> int:
        ...

    if __name__ == "__main__":
        sys.exit(main())

Bad input, i.e. an `errors.InputError` (ConfigError, CheckpointError, ConversionError, ForgeFormatError,
MissingExtra, ...) or a file the user named that is missing or unreadable (FileNotFoundError, NotADirectoryError,
IsADirectoryError, PermissionError), is printed as `<prog>: error: <one line>` and main returns 2, without a
traceback unless HEPHAESTUS_TRACEBACK=1. Any other exception is a bug: it keeps its traceback (exit status 1).
A command checks its inputs before it creates anything under its output directory.

Standard library only, so importing it before `start()` loads nothing that prints start-up noise.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Optional, Sequence

from hephaestus_jax import startup
from hephaestus_jax.errors import InputError, MissingExtra

TRACEBACK_ENV = "HEPHAESTUS_TRACEBACK"
FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# setup.py's optional extras: the modules a command checks for before it starts (`require`).
EXTRAS = {
    "hf": ("torch", "transformers", "gguf", "accelerate"),
    "data": ("apache_beam", "fasttext", "datasketch"),
    "bfcl": ("bfcl_eval", "mpmath"),
}
# How to install an extra's module that pip cannot install with its dependencies.
INSTALL_APART = {"bfcl_eval": "pip install --no-deps bfcl-eval==2026.3.23"}

Main = Callable[[Optional[Sequence[str]]], int]


def start() -> None:
    """What a command does first, before it imports jax or TensorFlow (startup.py: host memory, quiet stderr)."""
    startup.command_startup()


def entry_point(main: Main | None = None, *, prog: str | None = None):
    """Decorate a command's `main(argv) -> int` so that bad input gives one line and exit status 2.

    `prog` names the command in the message (default: `tools/<name>.py`, or `python -m <module>`).
    """
    def decorate(main: Main) -> Main:
        name = prog or _prog(main)

        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> int:
            try:
                return main(argv)
            except (InputError, *FILE_ERRORS) as e:
                if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                    traceback.print_exc()
                print(f"{name}: error: {one_line(e)}", file=sys.stderr, flush=True)
                return 2

        return run

    return decorate if main is None else decorate(main)


@contextlib.contextmanager
def input_errors(*types: type[BaseException]) -> Iterator[None]:
    """Within the block, exceptions of `types` (e.g. ValueError from reading a file the user named) are bad input."""
    try:
        yield
    except InputError:
        raise
    except types as e:
        raise InputError(one_line(e)) from e


def require(extra: str, *modules: str) -> None:
    """MissingExtra naming the first of `modules` (default: all of setup.py's `extra`) that is not installed
    (nothing is imported)."""
    for module in modules or EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            how = INSTALL_APART.get(module, f"pip install -e '.[{extra}]'")
            raise MissingExtra(f"{module} is not installed: {how}")


def one_line(error: BaseException) -> str:
    """The error's message on one line (a file error as `<file>: <reason>`)."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _prog(main: Main) -> str:
    path = os.path.relpath(os.path.abspath(main.__code__.co_filename), REPO_ROOT)
    if path.startswith("tools" + os.sep):
        return path
    return "python -m " + os.path.splitext(path)[0].replace(os.sep, ".")
