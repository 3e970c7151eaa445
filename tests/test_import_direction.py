"""Imports flow one way: `editor` <- `workers` -> `kb_daemon`.

`editor` imports nothing of kb_daemon or workers; `kb_daemon` never imports `workers`; `workers`
may import both. Two checks, because each misses what the other sees:

* the source: every import statement anywhere in a module (function bodies included: a lazy
  import is still a dependency), and `importlib.import_module` / `__import__` of a literal name;
* a fresh interpreter per package that imports every module of the package (pkgutil walk) and
  then lists `sys.modules`: what the package pulls in at import time, transitively.

`import kb_daemon.cli` loads no torch, transformers, editor or workers, so `kbctl --help` stays fast.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("editor", "kb_daemon", "workers")
# What each package may not depend on, by top-level name.
FORBIDDEN: dict[str, set[str]] = {
    "editor": {"kb_daemon", "workers"},
    "kb_daemon": {"workers"},
    "workers": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name a (possibly relative) `from ... import` refers to."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it is written."""
    module = module_name(path)
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, module, is_package)
            # `from .. import workers` names the package only in its alias.
            found += [(node.lineno, base)] if base else [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def source_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_package_has_source_to_check():
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), package
    assert ROOT / "editor" / "eval" / "runner.py" in source_files("editor")
    assert ROOT / "editor" / "demo" / "train.py" in source_files("editor")


def offending_imports(package: str) -> list[str]:
    """`file:line imports name` for every import of `package` that crosses the direction."""
    offences = []
    for path in source_files(package):
        for line, name in imported_names(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                offences.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return sorted(set(offences))


@pytest.mark.parametrize("package", PACKAGES)
def test_source_imports_flow_one_way(package):
    offences = offending_imports(package)
    assert not offences, (f"{package} may not import {', '.join(sorted(FORBIDDEN[package]))} (lazy imports "
                          "count):\n  " + "\n  ".join(offences))


def test_the_source_check_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself: an import inside a function, a relative import and import_module count."""
    package = tmp_path / "kb_daemon"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sub.py").write_text(
        "import json\n"
        "def later():\n"
        "    from workers.tasks import reap\n"
        "    import importlib\n"
        "    return importlib.import_module('workers.app')\n"
        "from . import config\n"
        "from .. import workers\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    names = imported_names(package / "sub.py")
    assert (3, "workers.tasks") in names and (5, "workers.app") in names
    assert (6, "kb_daemon") in names and (7, "workers") in names
    assert offending_imports("kb_daemon") == ["kb_daemon/sub.py:3 imports workers.tasks",
                                              "kb_daemon/sub.py:5 imports workers.app",
                                              "kb_daemon/sub.py:7 imports workers"]


WALK = """
import importlib, json, pkgutil, sys
package = importlib.import_module({package!r})
names = [{package!r}]
for info in pkgutil.walk_packages(package.__path__, {package!r} + "."):
    if info.name.rsplit(".", 1)[-1] != "__main__":  # runs its program when imported
        importlib.import_module(info.name)
        names.append(info.name)
print(json.dumps({{"imported": names, "loaded": sorted(sys.modules)}}))
"""


def import_everything(package: str) -> tuple[list[str], set[str]]:
    """In a fresh interpreter: import every module of `package`; (modules imported, sys.modules)."""
    result = subprocess.run([sys.executable, "-c", WALK.format(package=package)], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, f"importing every module of {package} failed:\n{result.stderr}"
    data = json.loads(result.stdout.splitlines()[-1])
    return data["imported"], set(data["loaded"])


@pytest.mark.parametrize("package", PACKAGES)
def test_importing_every_module_loads_nothing_upstream(package):
    imported, loaded = import_everything(package)
    expected = {module_name(p) for p in source_files(package) if p.stem != "__main__"}
    assert set(imported) == expected  # the walk reached every module, editor.eval and editor.demo too
    crossed = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN[package])
    assert not crossed, f"importing {package} loaded {crossed}"
    if package == "editor":
        assert not {"celery", "sqlalchemy", "alembic", "click"} & {m.split(".")[0] for m in loaded}


def modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT,
                         timeout=120).stdout
    return set(out.split())


def test_editor_public_api_loads_no_service_code():
    loaded = modules_after("import editor; editor.Editor; editor.load_backbone")
    assert "torch" in loaded
    for forbidden in ("kb_daemon", "workers", "celery", "sqlalchemy", "alembic", "click", "easy_vqa"):
        assert forbidden not in loaded, forbidden


def test_kb_daemon_cli_loads_no_model_or_worker_code():
    loaded = modules_after("import kb_daemon.cli")
    assert "kb_daemon.cli" in loaded and "click" in loaded
    tops = {m.split(".")[0] for m in loaded}
    for forbidden in ("torch", "transformers", "editor", "workers"):
        assert forbidden not in tops, forbidden
