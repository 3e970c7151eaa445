"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 12:17:09.608600
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('blobs',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_blobs'))
    )
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('layer', sa.Text(), nullable=True),
    sa.Column('hparams', sa.JSON(), nullable=False),
    sa.Column('reference_pool', sa.Text(), nullable=True),
    sa.Column('canary_path', sa.Text(), nullable=True),
    sa.Column('canary_max_changed', sa.Float(), nullable=False),
    sa.Column('ingest_source', sa.Text(), nullable=True),
    sa.Column('spec', sa.JSON(), nullable=True),
    sa.Column('head_version', sa.Integer(), nullable=False),
    sa.Column('next_job_seq', sa.Integer(), nullable=False),
    sa.Column('last_worker', sa.String(length=200), nullable=True),
    sa.Column('last_worker_seen_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('name', name=op.f('uq_models_name'))
    )
    op.create_table('facts',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=True),
    sa.Column('image_sha256', sa.String(length=64), nullable=True),
    sa.Column('question', sa.Text(), nullable=False),
    sa.Column('answer', sa.Text(), nullable=False),
    sa.Column('rephrases', sa.JSON(), nullable=False),
    sa.Column('negatives', sa.JSON(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('entered_version', sa.Integer(), nullable=True),
    sa.Column('left_version', sa.Integer(), nullable=True),
    sa.Column('superseded_by', sa.String(length=40), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['image_sha256'], ['blobs.sha256'], name=op.f('fk_facts_image_sha256_blobs')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_facts_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_facts'))
    )
    with op.batch_alter_table('facts', schema=None) as batch_op:
        batch_op.create_index('ix_facts_model_key', ['model_id', 'key'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('progress_done', sa.Integer(), nullable=False),
    sa.Column('progress_total', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_jobs_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sa.UniqueConstraint('model_id', 'seq', name='uq_jobs_model_seq')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_model_status', ['model_id', 'status'], unique=False)

    op.create_table('versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('parent', sa.Integer(), nullable=True),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('summary', sa.JSON(), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('num_entries', sa.Integer(), nullable=False),
    sa.Column('held', sa.Boolean(), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_versions_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_versions')),
    sa.UniqueConstraint('model_id', 'number', name='uq_versions_model_number')
    )
    op.create_table('entries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('fact_id', sa.String(length=40), nullable=False),
    sa.Column('blob_sha256', sa.String(length=64), nullable=False),
    sa.Column('answer', sa.Text(), nullable=False),
    sa.Column('input_id', sa.String(length=64), nullable=False),
    sa.Column('base_radius', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['blob_sha256'], ['blobs.sha256'], name=op.f('fk_entries_blob_sha256_blobs')),
    sa.ForeignKeyConstraint(['fact_id'], ['facts.id'], name=op.f('fk_entries_fact_id_facts')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_entries_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_entries')),
    sa.UniqueConstraint('fact_id', name=op.f('uq_entries_fact_id'))
    )
    op.create_table('entry_spans',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('entry_id', sa.Integer(), nullable=False),
    sa.Column('from_version', sa.Integer(), nullable=False),
    sa.Column('to_version', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['entry_id'], ['entries.id'], name=op.f('fk_entry_spans_entry_id_entries')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_entry_spans_model_id_models')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_entry_spans'))
    )
    with op.batch_alter_table('entry_spans', schema=None) as batch_op:
        batch_op.create_index('ix_entry_spans_model_versions', ['model_id', 'from_version', 'to_version'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('entry_spans', schema=None) as batch_op:
        batch_op.drop_index('ix_entry_spans_model_versions')

    op.drop_table('entry_spans')
    op.drop_table('entries')
    op.drop_table('versions')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_model_status')

    op.drop_table('jobs')
    with op.batch_alter_table('facts', schema=None) as batch_op:
        batch_op.drop_index('ix_facts_model_key')

    op.drop_table('facts')
    op.drop_table('models')
    op.drop_table('blobs')
