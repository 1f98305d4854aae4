"""Reading JSON-lines files (metrics.jsonl, BFCL data, evaluation results): one reader, errors naming path:line;
and writing a local JSON file atomically (reports and run state)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from etils import epath


def read_json_lines(path: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
    """Yield `("path:line", value)` for each non-blank line of a local or gs:// file; ValueError naming the line
    when it is not JSON."""
    for number, line in enumerate(epath.Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: invalid JSON: {error}") from None


def write_json(path: str, value: Any) -> None:
    """Write `value` as indented JSON, atomically: a stopped run never leaves a half-written file."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    os.replace(f"{path}.tmp", path)
