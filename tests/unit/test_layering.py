"""Import layering: the editing core depends on nothing above it (benchmark, CLI,
evaluation) nor on matplotlib, so a library user gets an edit without loading them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sphere_edit

PACKAGE_ROOT = Path(sphere_edit.__file__).parent
CORE = ("common", "model", "editing", "methods", "sphere")
FORBIDDEN = ("sphere_edit.bench", "sphere_edit.cli", "sphere_edit.evaluation", "matplotlib")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[str]:
    """Every module an ``import`` anywhere in the file (function bodies included) names,
    relative imports resolved against the file's package. ``from X import y`` yields both
    ``X`` and ``X.y``, since ``y`` may be a submodule."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append(module)
            found.extend(f"{module}.{alias.name}" for alias in node.names)
    return found


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def _core_files() -> list[Path]:
    files = [p for sub in CORE for p in sorted((PACKAGE_ROOT / sub).rglob("*.py"))]
    assert len(files) > 20, "the core packages were not found"
    return files


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(PACKAGE_ROOT)))
def test_core_file_imports_nothing_above_the_core(path):
    bad = sorted({m for m in imported_modules(path) if _forbidden(m)})
    assert not bad, f"{path.relative_to(PACKAGE_ROOT)} imports {bad}"


def test_the_checker_sees_relative_and_function_local_imports(tmp_path, monkeypatch):
    # A fake package laid out like sphere_edit, so the checker itself can be shown to fail.
    root = tmp_path / "sphere_edit"
    (root / "editing").mkdir(parents=True)
    source = (
        "from ..bench import runner\n"
        "from . import text\n"
        "def f():\n"
        "    import matplotlib.pyplot\n"
        "    from ..cli.app import app\n"
    )
    (root / "editing" / "x.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_ROOT", root)
    found = imported_modules(root / "editing" / "x.py")
    assert "sphere_edit.bench.runner" in found
    assert "sphere_edit.editing.text" in found
    assert "matplotlib.pyplot" in found
    assert "sphere_edit.cli.app" in found
    assert sorted({m for m in found if _forbidden(m)}) == [
        "matplotlib.pyplot",
        "sphere_edit.bench",
        "sphere_edit.bench.runner",
        "sphere_edit.cli.app",
        "sphere_edit.cli.app.app",
    ]


def test_importing_the_session_loads_no_bench_cli_or_matplotlib():
    code = (
        "import sys\n"
        "import sphere_edit.editing.build, sphere_edit.editing.session\n"
        "bad = ('sphere_edit.bench', 'sphere_edit.cli', 'matplotlib')\n"
        "print('\\n'.join(sorted(m for m in sys.modules"
        " if any(m == b or m.startswith(b + '.') for b in bad))))\n"
    )
    # The same source tree as this process, whatever the installed copy.
    path = os.pathsep.join([str(PACKAGE_ROOT.parent), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert done.stdout.split() == []
