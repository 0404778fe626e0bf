"""The job table's schema and the frozen records the queue hands out.

Tables are SQLAlchemy Core (no ORM sessions): `ops.Queue` runs named statements
against them and returns the frozen dataclasses below, so no caller ever holds a
live database object. Only UIDs, paths, AE titles and error messages are stored:
never patient name, ID, birth date or accession number.

The Alembic migrations in `migrations/versions/` create exactly this schema
(`tests/queue/test_queue_migrations.py` checks that they agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)

# Named constraints, so that later (batch) migrations on SQLite can refer to them.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

UID = String(64)  # PS3.5 9.1: a UID is at most 64 characters


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes, stored as naive UTC text (SQLite has no time zones).

    A naive datetime is refused rather than guessed at: the stored text is compared
    as a string (lease deadlines, run_after), so every value must be in UTC.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pass a timezone-aware one")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class State(StrEnum):
    """Life cycle shared by jobs and deliveries."""

    PENDING = "pending"  # waiting for a worker (maybe until run_after, after a retryable failure)
    RUNNING = "running"  # held by `worker` until `lease_until`; reclaimable once that passes
    DONE = "done"
    FAILED = "failed"  # permanent failure or attempts exhausted; `dicom-node jobs retry` revives


_STATE_CHECK = "state IN ({})".format(", ".join(f"'{s.value}'" for s in State))


def _lease_columns() -> list:
    """Columns that let a worker hold a row for a while (jobs and deliveries alike)."""
    return [
        Column("state", String(16), nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("worker", String(128)),
        Column("lease_until", UTCDateTime),
        Column("run_after", UTCDateTime, nullable=False),
        Column("error", Text),
        Column("created_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        CheckConstraint(_STATE_CHECK, name="state"),
    ]


studies = Table(
    "studies",
    metadata,
    Column("study_uid", UID, primary_key=True),
    Column("first_received_at", UTCDateTime, nullable=False),
    Column("last_received_at", UTCDateTime, nullable=False),
    Column("last_enqueued_at", UTCDateTime),
    # Counters rather than timestamps decide readiness, so clock steps and equal
    # timestamps cannot hide an instance: ready when instance_count > enqueued_instance_count.
    Column("instance_count", Integer, nullable=False, default=0),
    Column("enqueued_instance_count", Integer, nullable=False, default=0),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", UID, nullable=False, unique=True),
    Column("study_uid", UID, ForeignKey("studies.study_uid"), nullable=False, index=True),
    Column("series_uid", UID, nullable=False),
    Column("sop_class_uid", UID, nullable=False),
    Column("transfer_syntax", UID, nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("path", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    # Set at startup when the file is gone (deleted, lost disk); cleared if it comes back.
    Column("missing_since", UTCDateTime),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid", UID, ForeignKey("studies.study_uid"), nullable=False),
    Column("generation", Integer, nullable=False),
    *_lease_columns(),
    Column("result_path", Text),
    Column("result_sop_instance_uid", UID),
    Column("detections", Integer),
    # Random per job (queue.ops.new_analysis_key); the result UIDs derive from it, so
    # every attempt of the job makes the same objects and no other job (another
    # installation, a rebuilt database, a reused row id) does. Revision 0003; NULL only
    # for rows that predate it and were never filled (the migration fills them).
    Column("analysis_key", String(32)),
    # The backstop against two processes enqueueing the same analysis twice.
    UniqueConstraint("study_uid", "generation"),
    Index("ix_jobs_state_run_after", "state", "run_after"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("destination", String(128), nullable=False),
    # Which result goes there: "gsps", "sr", "sc" (destinations[].outputs). Revision 0004;
    # "sc" (a folder of captures, one delivery) came later and needs no revision.
    Column("output", String(8), nullable=False, server_default="gsps"),
    Column("path", Text, nullable=False),
    Column("sop_instance_uid", UID, nullable=False),
    *_lease_columns(),
    # Each result of a job reaches each destination once.
    UniqueConstraint("job_id", "destination", "output"),
    Index("ix_deliveries_state_run_after", "state", "run_after"),
)


@dataclass(frozen=True)
class Instance:
    """One stored DICOM instance (a received C-STORE)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    path: str
    transfer_syntax: str
    calling_ae: str
    size_bytes: int
    received_at: datetime
    missing_since: datetime | None = None  # the file was not found at the last startup


@dataclass(frozen=True)
class Delivery:
    """Sending one result file (one of the job's outputs) to one configured destination."""

    id: int
    job_id: int
    destination: str
    path: str
    sop_instance_uid: str
    state: State
    attempts: int
    error: str | None
    worker: str | None
    lease_until: datetime | None
    run_after: datetime
    created_at: datetime
    updated_at: datetime
    output: str = "gsps"  # which of the job's results: "gsps", "sr" or "sc" (its path: a folder)

    def log_context(self) -> dict:
        return {"delivery_id": self.id, "job_id": self.job_id, "destination": self.destination,
                "output": self.output}


@dataclass(frozen=True)
class Job:
    """One analysis of a whole study; generation 1 is its first, 2 after more instances came."""

    id: int
    study_uid: str
    generation: int
    state: State
    attempts: int
    error: str | None
    worker: str | None
    lease_until: datetime | None
    run_after: datetime
    created_at: datetime
    updated_at: datetime
    result_path: str | None
    result_sop_instance_uid: str | None
    detections: int | None
    deliveries: tuple[Delivery, ...] = ()
    analysis_key: str | None = None  # see the column; result UIDs derive from it

    def log_context(self) -> dict:
        return {"job_id": self.id, "study_uid": self.study_uid, "generation": self.generation}


@dataclass(frozen=True)
class DeliveredStudy:
    """A study that retention may remove: analysed, every result delivered, nothing newer."""

    study_uid: str
    delivered_at: datetime  # when it became fully delivered: its jobs' and deliveries' last update
