"""The repository agrees with itself: CI runs README's test command, docs/design.md lists every module."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _layout_modules() -> set[str]:
    """Module paths (relative to hephaestus_jax/) named at the start of a line of design.md's Layout block."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    return set(re.findall(r"^\s+([a-z_/]+\.py)\s", block, flags=re.MULTILINE))


def test_design_layout_lists_exactly_the_package_modules():
    package = ROOT / "hephaestus_jax"
    modules = {str(path.relative_to(package)) for path in package.rglob("*.py") if path.name != "__init__.py"}
    listed = _layout_modules()
    assert sorted(modules - listed) == [], "modules missing from docs/design.md's Layout"
    assert sorted(listed - modules) == [], "docs/design.md's Layout names modules that do not exist"


def test_ci_runs_the_test_command_of_the_readme():
    ci = (ROOT / ".ci" / "run").read_text()
    (command,) = re.findall(r"^TEST_COMMAND='(.*)'$", ci, flags=re.MULTILINE)
    readme = (ROOT / "README.md").read_text()
    assert f"```bash\n{command}\n```" in readme
