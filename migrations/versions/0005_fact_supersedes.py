"""the fact a new fact supersedes

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 19:45:00.000000

`kbctl submit-fact --supersedes FACT_ID` (and a `supersedes` field in ingestion sources) names an
applied fact that the new one replaces over its scope: the worker removes the old entry in the
same version that adds the new one, and the old fact becomes `superseded` by the new.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('facts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('supersedes', sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('facts', schema=None) as batch_op:
        batch_op.drop_column('supersedes')
