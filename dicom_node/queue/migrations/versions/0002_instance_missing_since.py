"""Instances: missing_since, set at startup when a recorded instance's file is gone.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # A nullable column: SQLite adds it in place (no table rebuild), existing rows get NULL.
    op.add_column("instances", sa.Column("missing_since", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("missing_since")
