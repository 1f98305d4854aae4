"""Reading JSON-lines files (metrics.jsonl, BFCL data, evaluation results): one reader, errors naming path:line."""

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
