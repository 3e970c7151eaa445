"""versions' content hash as a sum of entry hashes

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 23:30:00.000000

A version's `content_sha256` becomes the sum modulo 2**256 of its entries' SHA-256 (of the fact
id, blob digest and base radius; `kb_daemon.snapshots.content_hash`), so that a commit computes
it from its parent's in O(changes). Every stored version's hash is recomputed from the spans in
one pass per model: a version's sum is the previous number's, plus the entries whose spans open
at it, minus those whose spans close at it. Downgrading recomputes the previous definition (the
SHA-256 of the JSON list of [fact id, blob digest, base radius] in entry order).
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

MODULUS = 1 << 256


def _entry_hash(fact_id: str, blob: str, base_radius: float) -> int:
    return int(hashlib.sha256(json.dumps([fact_id, blob, base_radius]).encode()).hexdigest(), 16)


def upgrade() -> None:
    bind = op.get_bind()
    models = [row[0] for row in bind.execute(sa.text("SELECT id FROM models"))]
    for model_id in models:
        hashes = {row[0]: _entry_hash(row[1], row[2], row[3]) for row in bind.execute(sa.text(
            "SELECT id, fact_id, blob_sha256, base_radius FROM entries WHERE model_id = :m"), {"m": model_id})}
        change: defaultdict[int, int] = defaultdict(int)
        for entry_id, begin, end in bind.execute(sa.text(
                "SELECT entry_id, from_version, to_version FROM entry_spans WHERE model_id = :m"), {"m": model_id}):
            change[begin] += hashes[entry_id]
            if end is not None:
                change[end] -= hashes[entry_id]
        versions = sorted(bind.execute(sa.text("SELECT id, number FROM versions WHERE model_id = :m"),
                                       {"m": model_id}), key=lambda row: row[1])
        total, number = 0, -1
        for version_id, version_number in versions:
            for n in range(number + 1, version_number + 1):
                total += change.get(n, 0)
            number = version_number
            bind.execute(sa.text("UPDATE versions SET content_sha256 = :h WHERE id = :i"),
                         {"h": f"{total % MODULUS:064x}", "i": version_id})


def downgrade() -> None:
    bind = op.get_bind()
    versions = list(bind.execute(sa.text("SELECT id, model_id, number FROM versions")))
    for version_id, model_id, number in versions:
        rows = bind.execute(sa.text(
            "SELECT e.fact_id, e.blob_sha256, e.base_radius FROM entries e JOIN entry_spans s ON s.entry_id = e.id "
            "WHERE s.model_id = :m AND s.from_version <= :n AND (s.to_version IS NULL OR s.to_version > :n) "
            "ORDER BY e.id"), {"m": model_id, "n": number})
        record = [[fact_id, blob, base_radius] for fact_id, blob, base_radius in rows]
        digest = hashlib.sha256(json.dumps(record).encode()).hexdigest()
        bind.execute(sa.text("UPDATE versions SET content_sha256 = :h WHERE id = :i"), {"h": digest, "i": version_id})
