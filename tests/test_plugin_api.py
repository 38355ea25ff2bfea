"""The public API for plugin authors: the README's example runs, and plugins and recipes import
nothing private from timm_qconv."""
import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

from timm_qconv import list_methods
from timm_qconv.plugins import unregister_plugin

ROOT = Path(__file__).resolve().parents[1]


def readme_plugin_example() -> str:
    section = (ROOT / "README.md").read_text().split("\n## Plugins\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Plugins section has no python example"
    return blocks[0]


def test_readme_plugin_example_runs():
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(readme_plugin_example(), "README.md#plugins", "exec"), {"__name__": "readme_example"})
        assert "uniform" in list_methods(), "the example's method was not registered"
    finally:
        unregister_plugin("uniform-example")
    assert out.getvalue().split() == ["8", "2"], f"the example printed {out.getvalue()!r}, its comment says 8 2"


def private_imports(path: Path) -> list[str]:
    """The timm_qconv modules and names ``path`` imports whose dotted path has a part starting with ``_``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [n for n in names if n.split(".")[0] == "timm_qconv" and any(p.startswith("_") for p in n.split("."))]
    return found


SOURCES = sorted(p for folder in ("plugins", "recipes") for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_plugins_and_recipes_import_no_private_module(path):
    assert not private_imports(path), f"{path.relative_to(ROOT)} imports private names: {private_imports(path)}"


def test_private_import_check_finds_one(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("from timm_qconv._errors import check_int\n"
                      "import timm_qconv.methods._x\n"
                      "from timm_qconv import _y\n")
    assert private_imports(source) == ["timm_qconv._errors.check_int", "timm_qconv.methods._x", "timm_qconv._y"]
