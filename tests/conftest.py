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
