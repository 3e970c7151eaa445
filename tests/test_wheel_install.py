"""The built wheel installs and runs: `kbctl init`, `up`, `submit-fact --wait` and `ask` from outside
the repository, in a fresh virtual environment that sees the wheel and the dependencies, not the
source tree."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the wheel takes about 5 s to build; the daemon test loads the model twice

REPO = Path(__file__).resolve().parent.parent
QUESTION = "what shape is in the image?"
# What a clean checkout does not hold: build outputs, caches, environments, data directories.
NOT_SOURCE = {".git", ".venv", "build", "dist", "out", "__pycache__", ".kb-home", ".pytest_cache", ".ruff_cache",
              ".mypy_cache"}


def _not_source(_directory: str, names: list[str]) -> set[str]:
    return {name for name in names if name in NOT_SOURCE or name.endswith((".egg-info", ".pyc"))}


def run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} -> {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def build_isolation() -> list[str]:
    """Build offline with this environment's setuptools when it meets pyproject.toml's build
    requirement; otherwise let pip fetch the requirement into an isolated build environment."""
    if sys.version_info < (3, 11):
        return []  # no tomllib to read the requirement with
    import tomllib
    from packaging.requirements import Requirement

    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    for requirement in map(Requirement, requires):
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return []
        if not requirement.specifier.contains(installed):
            return []
    return ["--no-build-isolation", "--no-index"]


def build_wheel(out_dir: Path) -> Path:
    """Build from a copy of the source: an in-tree build keeps build/ between builds (a deleted
    module would still ship) and writes into the working tree."""
    source = out_dir / "source"
    shutil.copytree(REPO, source, ignore=_not_source)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", *build_isolation(), "-q", "-w", out_dir / "dist", source)
    (wheel,) = (out_dir / "dist").glob("kb_daemon-*.whl")
    return wheel


def make_venv(root: Path, wheel: Path) -> Path:
    """A fresh venv holding the wheel, with this environment's dependencies on its path.

    The dependencies come in through a .pth file naming this environment's site-packages: Python
    adds that directory to sys.path but does not run the .pth files inside it, so the editable
    install of the working tree (a .pth hook there) stays out. The .pth is written after pip has
    installed the wheel, so pip sees an empty environment."""
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    dependencies = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "kb_test_dependencies.pth").write_text("".join(f"{path}\n" for path in dependencies))
    return venv


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_every_module_and_the_files_read_at_run_time(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    # Where each source file lands in the wheel: the repository's migrations/ becomes kb_daemon/migrations/.
    expected = {str(path.relative_to(REPO)) for package in ("editor", "kb_daemon", "workers")
                for path in (REPO / package).rglob("*.py") if "__pycache__" not in path.parts}
    expected |= {f"editor/demo/model/{path.name}" for path in (REPO / "editor" / "demo" / "model").iterdir()}
    expected |= {f"kb_daemon/{path.relative_to(REPO)}" for path in (REPO / "migrations").rglob("*.py")}
    expected.add("kb_daemon/migrations/script.py.mako")  # the template of `alembic revision`
    expected |= {str(path.relative_to(REPO)) for folder in ("templates", "static")  # the console's pages and assets
                 for path in (REPO / "kb_daemon" / "server" / folder).iterdir()}
    assert "kb_daemon/migrations/versions/0001_initial_schema.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"missing from the wheel: {missing}"
    source_files = sorted(n for n in names if not n.startswith(("editor/", "kb_daemon/", "workers/", "kb_daemon-")))
    assert not source_files, f"not part of the installed packages: {source_files}"


def test_wheel_runs_the_daemon_outside_the_repository(wheel, tmp_path):
    venv = make_venv(tmp_path, wheel)
    python, kbctl = venv / "bin" / "python", venv / "bin" / "kbctl"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("KB_") and key != "PYTHONPATH"}
    env.update(KB_HOME=str(tmp_path / "home"), KB_POLLING_SECONDS="0.2", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")

    def kbctl_json(*args: str) -> dict:
        return json.loads(run(kbctl, *args, "--json", cwd=outside, env=env).stdout)

    where = run(python, "-c", "import editor, kb_daemon, workers; print(editor.__file__, kb_daemon.__file__, "
                "workers.__file__)", cwd=outside, env=env).stdout.split()
    assert all(Path(path).is_relative_to(venv) for path in where), where

    assert kbctl_json("init")["demo_registered"] is True
    image = run(python, "-m", "kb_daemon.demo", cwd=outside, env=env).stdout.strip()
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([kbctl, "up", "--loglevel", "WARNING"], cwd=outside, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        fact = kbctl_json("submit-fact", "--image", image, "--question", QUESTION, "--answer", "oblong box",
                          "--wait", "--timeout", "120")
        assert fact["version"] == 1
        answer = kbctl_json("ask", "--image", image, "--question", QUESTION)
        assert answer == {"answer": "oblong box", "version": 1, "fact_id": fact["fact_id"]}
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nkbctl up's log:\n{log_path.read_text()[-3000:]}") from None
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
            pytest.fail(f"kbctl up did not stop within 30 s of SIGTERM\n{log_path.read_text()[-3000:]}")
    assert daemon.returncode == 0, log_path.read_text()[-3000:]
