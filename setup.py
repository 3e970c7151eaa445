"""Which files the wheel holds; everything else about the project is in pyproject.toml.

The repository keeps the Alembic scripts in a top-level migrations/ (where the `alembic` command
line and the layout expect them), and the installed package needs them at run time (`kbctl init`,
`kbctl db upgrade`). The wheel ships them as kb_daemon/migrations through `package_dir`.
pyproject.toml cannot say this: its package list is either found (and a directory outside
kb_daemon/ is never found as part of kb_daemon) or written out by hand (and a new subpackage is
easily forgotten).
"""

from setuptools import find_namespace_packages, setup

setup(
    packages=[
        *find_namespace_packages(include=["editor*", "kb_daemon*", "workers*"]),
        "kb_daemon.migrations",
        "kb_daemon.migrations.versions",
    ],
    package_dir={"kb_daemon.migrations": "migrations"},
    package_data={"editor.demo": ["model/*"], "kb_daemon.migrations": ["script.py.mako"],
                  "kb_daemon.server": ["templates/*.html", "static/*"]},
)
