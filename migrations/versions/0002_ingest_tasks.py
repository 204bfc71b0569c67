"""ingest_tasks: the exactly-once ledger of asynchronous ingestion

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ingest_tasks',
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('row', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('item_id', sa.String(length=36), nullable=True),
    sa.Column('reason', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.Column('sends', sa.Integer(), nullable=False),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['ingest_jobs.id'], name=op.f('fk_ingest_tasks_job_id_ingest_jobs'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'seq', name=op.f('pk_ingest_tasks'))
    )
    with op.batch_alter_table('ingest_tasks', schema=None) as batch_op:
        batch_op.create_index('ix_ingest_tasks_state_enqueued', ['state', 'enqueued_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_ingest_tasks_item_id'), ['item_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('ingest_tasks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ingest_tasks_item_id'))
        batch_op.drop_index('ix_ingest_tasks_state_enqueued')
    op.drop_table('ingest_tasks')
