"""The dependency direction: the core never imports a plugin, and only the command line reaches the benchmarks.

Every module under ``metaopt/`` except the benchmarks (``metaopt/bench``) is core. Its imports,
at module level or inside functions, are read from the source (``ast``), so a lazy import cannot
hide one. Plugins (``algorithms/``, ``datasets/``, installed as ``metaopt.algorithms`` and
``metaopt.datasets``) import the core, never the reverse: the core finds them through
:func:`metaopt.registry.load_plugins`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ("metaopt.algorithms", "metaopt.datasets")
CORE = sorted(p for p in (ROOT / "metaopt").rglob("*.py") if "bench" not in p.relative_to(ROOT / "metaopt").parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_walk_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from metaopt.algorithms.maml import MAML\n    import metaopt.datasets\n")
    assert {"metaopt.algorithms.maml", "metaopt.datasets"} <= imported_modules(source)


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_modules_never_import_a_plugin(path):
    plugins = sorted(name for name in imported_modules(path) if any(_under(name, p) for p in PLUGINS))
    assert not plugins, f"{path.relative_to(ROOT)} imports {plugins}; register the plugin instead"


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_command_line_reaches_the_benchmarks(path):
    bench = sorted(name for name in imported_modules(path) if _under(name, "metaopt.bench"))
    assert not bench or path.name == "cli.py", f"{path.relative_to(ROOT)} imports {bench}"


def test_the_core_is_every_module_but_the_benchmarks():
    names = {str(p.relative_to(ROOT / "metaopt")) for p in CORE}
    assert {"engine/inner.py", "estimators/base.py", "training/trainer.py", "evaluation/evaluate.py",
            "problems/episode.py", "registry.py", "cli.py"} <= names
    assert not any(name.startswith("bench/") for name in names)
