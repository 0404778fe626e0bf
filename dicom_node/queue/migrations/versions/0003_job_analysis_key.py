"""Jobs: analysis_key, the random key that a job's result UIDs derive from.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-15
"""

import uuid
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Nullable, added in place. NOT NULL would need a batch rebuild of `jobs`, whose DROP
    # TABLE deletes every delivery through ON DELETE CASCADE while foreign keys are on
    # (they are, and cannot be turned off inside the migration's transaction).
    op.add_column("jobs", sa.Column("analysis_key", sa.String(length=32), nullable=True))
    # Existing jobs get a key too. Done jobs keep the result UIDs they recorded; a job
    # not yet done produced nothing delivered, so new UIDs for it break nothing.
    # In Python, as new_analysis_key does (uuid4().hex): the same on SQLite and PostgreSQL.
    jobs = sa.table("jobs", sa.column("id", sa.Integer), sa.column("analysis_key", sa.String))
    bind = op.get_bind()
    for (job_id,) in bind.execute(sa.select(jobs.c.id).where(jobs.c.analysis_key.is_(None))).all():
        bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(analysis_key=uuid.uuid4().hex))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not batch mode: see upgrade().
    op.drop_column("jobs", "analysis_key")
