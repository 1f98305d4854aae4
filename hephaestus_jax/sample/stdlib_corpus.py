"""Code and text documents from the Python standard library (PSF License 2.0), read from files, never imported.

Code: the standard library's own `.py` source files. Text: the Python Language Reference topics that `pydoc`
ships (`pydoc_data/topics.py`, read as data) and the module docstrings of the standard library (read with `ast`).
Which document lands in which split is decided by a hash of its name, so the split is stable as the budget grows.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

SKIPPED_DIRECTORIES = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "encodings",
                                 "ensurepip", "__pycache__", "pydoc_data", "tkinter"})
MIN_CODE_BYTES = 2_000
MAX_CODE_BYTES = 40_000
MIN_DOCSTRING_CHARS = 600
LICENSE = "PSF-2.0"


@dataclass(frozen=True)
class Document:
    """One code or text document and where it came from."""

    name: str  # stable identity, e.g. "Lib/json/decoder.py" or "topics/assert"
    text: str

    @property
    def held_out(self) -> bool:
        return is_held_out(self.name)


def is_held_out(name: str, one_in: int = 10) -> bool:
    """Whether a named item belongs to the held-out split (about one in `one_in`, fixed by the name)."""
    return zlib.crc32(name.encode()) % one_in == 0


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _source_files(root: str) -> Iterator[str]:
    """Relative paths of the standard library's .py files, sorted."""
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories
                                   if d not in SKIPPED_DIRECTORIES and not d.startswith("config-"))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(directory, name), root)


def _read_source(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def code_documents(root: str | None = None) -> list[Document]:
    """The standard library's source files between MIN_CODE_BYTES and MAX_CODE_BYTES, ordered by a hash of
    their path (a budget then takes a spread-out selection, not one package)."""
    root = root or stdlib_dir()
    documents = []
    for relative in _source_files(root):
        path = os.path.join(root, relative)
        if not MIN_CODE_BYTES <= os.path.getsize(path) <= MAX_CODE_BYTES:
            continue
        text = _read_source(path)
        if text and text.strip():
            documents.append(Document(f"Lib/{relative}", text))
    return sorted(documents, key=lambda d: (zlib.crc32(d.name.encode()), d.name))


def text_documents(root: str | None = None) -> list[Document]:
    """Language Reference topics and long module docstrings, ordered by a hash of their names."""
    root = root or stdlib_dir()
    documents = [Document(f"topics/{name}", text) for name, text in _reference_topics(root).items()
                 if len(text.strip()) >= MIN_DOCSTRING_CHARS]
    for relative in _source_files(root):
        text = _read_source(os.path.join(root, relative))
        try:
            docstring = ast.get_docstring(ast.parse(text or "")) if text else None
        except SyntaxError:
            docstring = None
        if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
            documents.append(Document(f"docstrings/{relative}", docstring))
    return sorted(documents, key=lambda d: (zlib.crc32(d.name.encode()), d.name))


def _reference_topics(root: str) -> dict[str, str]:
    """pydoc's topics dictionary, parsed as a literal (the file is data; it is not executed)."""
    with open(os.path.join(root, "pydoc_data", "topics.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{root}/pydoc_data/topics.py has no `topics = {{...}}` assignment")


def take(documents: list[Document], held_out: bool, budget_bytes: int) -> list[Document]:
    """Documents of one split, in order, until their UTF-8 size reaches the budget."""
    chosen, used = [], 0
    for document in documents:
        if document.held_out != held_out:
            continue
        if used >= budget_bytes:
            break
        chosen.append(document)
        used += len(document.text.encode())
    return chosen
