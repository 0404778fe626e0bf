"""Initial schema: studies, instances, jobs, deliveries.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

STATE_CHECK = "state IN ('pending', 'running', 'done', 'failed')"


def _lease_columns(table: str) -> list:
    return [
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(128)),
        sa.Column("lease_until", sa.DateTime()),
        sa.Column("run_after", sa.DateTime(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(STATE_CHECK, name=f"ck_{table}_state"),
    ]


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("first_received_at", sa.DateTime(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(), nullable=False),
        sa.Column("last_enqueued_at", sa.DateTime()),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("enqueued_instance_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("study_uid", name="pk_studies"),
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax", sa.String(64), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("sop_instance_uid", name="uq_instances_sop_instance_uid"),
        sa.ForeignKeyConstraint(
            ["study_uid"], ["studies.study_uid"], name="fk_instances_study_uid_studies"
        ),
    )
    op.create_index("ix_instances_study_uid", "instances", ["study_uid"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        *_lease_columns("jobs"),
        sa.Column("result_path", sa.Text()),
        sa.Column("result_sop_instance_uid", sa.String(64)),
        sa.Column("detections", sa.Integer()),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("study_uid", "generation", name="uq_jobs_study_uid_generation"),
        sa.ForeignKeyConstraint(["study_uid"], ["studies.study_uid"], name="fk_jobs_study_uid_studies"),
    )
    op.create_index("ix_jobs_state_run_after", "jobs", ["state", "run_after"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(128), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        *_lease_columns("deliveries"),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.UniqueConstraint("job_id", "destination", name="uq_deliveries_job_id_destination"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_deliveries_job_id_jobs", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_deliveries_state_run_after", "deliveries", ["state", "run_after"])


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("jobs")
    op.drop_table("instances")
    op.drop_table("studies")
