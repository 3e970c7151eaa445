"""A 1,000-fact nightly batch through the real queue on the demo model, with a real worker process.

Runs the code path of bench/nightly_batch.py: the worker is warmed up with one fact and one
50-fact batch, then one `kbctl ingest` of 1,000 new facts becomes one batch job and one version.
Over that batch the worker's resident memory may grow by no more than the tensors the batch added
to the codebook it holds.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

FACTS = 1000
WARM_UP = 50
BENCH = Path(__file__).resolve().parents[1] / "bench" / "nightly_batch.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("nightly_batch", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One 1,000-fact batch, shared by the tests below (about 4-8 minutes on 2 busy cores)."""
    home = tmp_path_factory.mktemp("nightly") / "home"
    m = load_bench().run(home, FACTS, warm_up_facts=WARM_UP, timeout_seconds=3600)
    print(json.dumps({k: v for k, v in vars(m).items() if not k.startswith(("fact_ids", "rss_samples"))}))
    return home, m


@pytest.mark.slow
def test_a_thousand_fact_nightly_batch_applies_every_fact_once_in_order(batch):
    home, m = batch
    assert m.job_status == "done" and m.version == 3  # 1: the warm-up fact, 2: the warm-up batch
    # Every fact of the source, once, in source order, after the warm-up facts.
    assert len(m.fact_ids_submitted) == FACTS
    assert m.fact_ids_in_version[1 + WARM_UP:] == m.fact_ids_submitted
    assert m.codebook_entries == FACTS + WARM_UP + 1
    engine = sa.create_engine(f"sqlite:///{home / 'kb.sqlite3'}")
    with engine.connect() as connection:
        job = connection.execute(sa.text(
            "SELECT status, attempts, progress_done, result FROM jobs WHERE id = :id"), {"id": m.batch_job_id}).one()
        statuses = connection.execute(sa.text(
            "SELECT status, entered_version, count(*) FROM facts WHERE key LIKE 'nightly-%' "
            "GROUP BY status, entered_version")).all()
        entries = connection.execute(sa.text("SELECT count(*), count(DISTINCT fact_id) FROM entries")).one()
        versions = connection.execute(sa.text("SELECT number FROM versions ORDER BY number")).scalars().all()
    engine.dispose()
    result = json.loads(job.result)
    assert (job.status, job.attempts, job.progress_done) == ("done", 1, FACTS)
    assert result["applied_in_this_attempt"] == FACTS and len(result["reports"]) == FACTS
    assert statuses == [("applied", 3, FACTS)]
    assert tuple(entries) == (FACTS + WARM_UP + 1, FACTS + WARM_UP + 1)
    assert versions == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "open: over the batch the worker's RSS grows ~1.3x the codebook's tensors (1,000 facts: +9.8 to "
    "+10.5 MiB for +7.7 MiB; +11.0 before the reports were kept as JSON text, +13.1 to +14.8 before the "
    "tokenizer's word cache was turned off). In process at 600 facts: glibc's bytes in use +4.76 MiB "
    "(tensors 4.64), Python's allocator +1 arena (pools pinned by the objects that outlive each fact); "
    "see bench/README section 3"))
def test_worker_memory_grows_no_more_than_the_codebook(batch):
    _home, m = batch
    # The bar: over the batch, the worker's RSS grows by no more than the codebook it holds
    # grew (the batch's 1,000 entries; the warm-up's 51 are in both measurements).
    assert m.rss_growth_bytes <= m.codebook_growth_bytes, (
        f"RSS grew {m.rss_growth_bytes / 2**20:.1f} MiB over the batch while the codebook grew "
        f"{m.codebook_growth_bytes / 2**20:.1f} MiB")
