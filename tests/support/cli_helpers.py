"""Running the command-line tools in the test process (a subprocess costs ~6 s of imports per call)."""

import importlib.util
import os
import re

from conftest import REPO_ROOT


def load_tool(name: str):
    """The module of tools/<name>.py, to call its main(argv) in process."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def verify_figures(stdout: str) -> tuple[float, float, str]:
    """(max_abs_logit_diff, bound, 'passed' or 'FAILED') from the last stdout line of a converter's --verify
    (`verify.LogitComparison`'s line)."""
    line = stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"max_abs_logit_diff=(\S+) bound=(\S+) \(\S+ x max\|logit\| \S+\): (passed|FAILED)", line)
    assert match, f"not a --verify line: {line!r}"
    return float(match[1]), float(match[2]), match[3]
