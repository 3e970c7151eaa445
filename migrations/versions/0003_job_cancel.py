"""who asked to cancel a running job

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 14:20:00.000000

`kbctl cancel` of a running job records the actor here; the job's worker stops at the next fact
boundary and stores nothing. A queued job is cancelled at once and never needs the column.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cancel_requested_by', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('cancel_requested_by')
