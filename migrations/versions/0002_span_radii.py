"""effective radius on each entry span; index for the head's span scan

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 05:40:00.000000

A span now records the radius its entry has in the versions it covers (GRACE's overlap rule, as
replayed by the editor), so materialising a version reads the radii instead of replaying the rule
over every pair of entries. Spans written before this revision have no radius (NULL): versions that
hold one are replayed as before.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('entry_spans', schema=None) as batch_op:
        batch_op.add_column(sa.Column('radius', sa.Float(), nullable=True))
        batch_op.create_index('ix_entry_spans_model_to_version', ['model_id', 'to_version'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('entry_spans', schema=None) as batch_op:
        batch_op.drop_index('ix_entry_spans_model_to_version')
        batch_op.drop_column('radius')
