"""Shared fixtures. Tests run offline: nothing may reach a model hub."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Tests run a worker process beside the test process on 2 cores: one compute thread each avoids
# OpenMP threads spinning against each other (measured on a busy machine: test_editor_sequential.py
# took 47 s with two threads, 8 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield


@pytest.fixture(scope="session")
def postgres_url():
    """URL of a PostgreSQL server for this test session (see tests/pg_server.py)."""
    from pg_server import PostgresServer, require_bin_dir

    existing = os.environ.get("KB_TEST_POSTGRES_URL")
    if existing:
        yield existing
        return
    bin_dir = require_bin_dir()
    server = PostgresServer(bin_dir)
    try:
        url = server.start()
    except Exception as exc:  # noqa: BLE001
        server.stop()
        pytest.fail(f"could not start PostgreSQL from {bin_dir}: {exc}")
    yield url
    server.stop()


# name -> (colour, shape) of the images in `tiny_assets`
TINY_IMAGES = {"red": ((230, 20, 20), "square"), "green": ((20, 200, 20), "circle"),
               "blue": ((20, 20, 230), "square"), "black": ((0, 0, 0), "circle")}


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A tiny random LLaVA saved under tiny/ and four small images, red.png to black.png."""
    from tiny_models import image, save

    root = tmp_path_factory.mktemp("tiny-assets")
    save("llava-llama", root / "tiny")
    for name, (colour, shape) in TINY_IMAGES.items():
        image(colour, shape).save(root / f"{name}.png")
    return root


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request):
    """None (SQLite under the test's home), then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    from daemon_harness import fresh_postgres_database

    return fresh_postgres_database(request.getfixturevalue("postgres_url"))
