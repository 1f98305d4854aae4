"""Running the command-line tools in the test process (a subprocess costs ~6 s of imports per call)."""

import importlib.util
import os

from conftest import REPO_ROOT


def load_tool(name: str):
    """The module of tools/<name>.py, to call its main(argv) in process."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
