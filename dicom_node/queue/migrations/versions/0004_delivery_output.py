"""Deliveries: output, which of a job's results a delivery sends (a GSPS, a structured report).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Every delivery made so far sent the GSPS. The unique constraint widens from (job,
    # destination) to (job, destination, output). On SQLite a batch rebuild of `deliveries`:
    # safe, no table refers to it (unlike `jobs`, see 0003).
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("output", sa.String(length=8), nullable=False, server_default="gsps"))
        batch.drop_constraint("uq_deliveries_job_id_destination", type_="unique")
        batch.create_unique_constraint("uq_deliveries_job_id_destination_output", ["job_id", "destination", "output"])


def downgrade() -> None:
    op.execute("DELETE FROM deliveries WHERE output != 'gsps'")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint("uq_deliveries_job_id_destination_output", type_="unique")
        batch.create_unique_constraint("uq_deliveries_job_id_destination", ["job_id", "destination"])
        batch.drop_column("output")
