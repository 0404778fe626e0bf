"""The queue: every SQL statement the node issues, as small named operations.

One `Queue` (one engine) per process; the SCP process and each worker process open
their own on the same database: a SQLite file (the default) or a PostgreSQL database
shared by processes on many hosts. On SQLite (WAL mode) readers never block the
writer, and every write transaction starts with ``BEGIN IMMEDIATE``: it takes the
database's single write lock up front, which makes read-then-write operations (claim a
job, enqueue ready studies) atomic across processes, and a second writer waits
(busy_timeout) instead of failing on a lock upgrade. On PostgreSQL the same statements
lock rows instead (``FOR UPDATE [SKIP LOCKED]``, ``ON CONFLICT``): see backends.py,
the one home of what differs between the two.

Each public method is one short transaction, committed before it returns.

Database trouble (the write lock held past the busy timeout, disk full at commit, an
I/O error, a corrupt file, a PostgreSQL server that does not answer) is raised as one
exception, `QueueUnavailable`, naming the database and the kind of trouble, never the
SQL: callers answer "later" and carry on. How long a write waits for a lock is the
caller's choice (`busy_timeout_seconds`): the SCP must answer its sender well within
the network timeout, a worker may wait.
"""
from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

from sqlalchemy import (
    Connection,
    Row,
    Table,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    insert,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.engine import make_url

from dicom_node.errors import NodeError, QueueUnavailable
from dicom_node.log import get_logger
from dicom_node.queue.backends import UNUSABLE_KINDS, Backend, backend_for, greatest
from dicom_node.queue.models import (
    DeliveredStudy,
    Delivery,
    Instance,
    Job,
    State,
    UTCDateTime,
    deliveries,
    instances,
    jobs,
    studies,
)

MIGRATIONS = Path(__file__).parent / "migrations"
# How long a write waits for the write lock by default (workers, CLI, the scheduler).
BUSY_TIMEOUT_SECONDS = 30
# The SCP answers a sender that waits on it: its lock wait is a fraction of the network
# timeout, at most this (see busy_timeout_for_peer).
PEER_BUSY_TIMEOUT_MAX_SECONDS = 5.0
MAX_ERROR_CHARS = 2000
_NOUN = {"jobs": "job", "deliveries": "delivery"}
_IN_CHUNK = 500  # values per IN (...) list, well under SQLite's bound-parameter limit

log = get_logger(__name__)
T = TypeVar("T")


class _Duplicate(Exception):
    """Rolls back a transaction that found its instance already recorded."""


class LeaseLost(NodeError):
    """The job or delivery is no longer held by this worker (its lease expired; it was reclaimed)."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def busy_timeout_for_peer(network_timeout_seconds: float) -> float:
    """The lock wait for a process that answers network peers (the SCP).

    A quarter of the network timeout, at most PEER_BUSY_TIMEOUT_MAX_SECONDS: the sender
    must get its answer (0xA700, retry later) before it gives up on us, which it may do
    sooner than our own node.network_timeout_seconds says.
    """
    return min(network_timeout_seconds / 4, PEER_BUSY_TIMEOUT_MAX_SECONDS)


def _record(cls, row: Row, **extra):
    """A frozen record (Job, Delivery, Instance) from a result row."""
    mapping = row._mapping
    values = {f.name: mapping[f.name] for f in fields(cls) if f.name in mapping}
    if "state" in values:
        values["state"] = State(values["state"])
    return cls(**values, **extra)


def _clip(error: str) -> str:
    return error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 1] + "…"


# --- Operations shared by jobs and deliveries (both carry the lease columns) ---------


def _held(table: Table, row_id: int, worker: str | None):
    """WHERE clause: this row is running under `worker` (any worker when None)."""
    clause = and_(table.c.id == row_id, table.c.state == State.RUNNING)
    return clause if worker is None else and_(clause, table.c.worker == worker)


def _held_by_any(table: Table, owners: Collection[str] | None):
    """Rows whose worker id belongs to one of `owners` (``<owner>/...``); all rows for None."""
    if owners is None:
        return true()
    return or_(false(), *(table.c.worker.startswith(f"{owner}/", autoescape=True) for owner in owners))


def _lease_lost(table: Table, row_id: int, worker: str | None) -> LeaseLost:
    return LeaseLost(
        f"{_NOUN[table.name]} {row_id} is not running under worker {worker!r} "
        "(its lease expired and it was reclaimed, or it is already finished)"
    )


def _fail_exhausted_leases(conn: Connection, table: Table, *, max_attempts: int, now: datetime):
    """Fail rows whose lease expired on their last allowed attempt (a worker keeps dying on them)."""
    exhausted = (
        select(table.c.id)
        .where(table.c.state == State.RUNNING, table.c.lease_until < now)
        .where(table.c.attempts >= max_attempts)
        .with_for_update(skip_locked=True, key_share=True)  # another claimer's rows are its own
    )
    conn.execute(
        update(table)
        .where(table.c.id.in_(exhausted.scalar_subquery()))
        .values(
            state=State.FAILED,
            lease_until=None,
            error="lease expired on the last attempt: the worker died or hung",
            updated_at=now,
        )
    )


def _claim(conn: Connection, table: Table, *, worker: str, lease_seconds: float, now: datetime):
    """Take the oldest due pending row, or a running row whose lease expired, in one statement."""
    due = or_(
        and_(table.c.state == State.PENDING, table.c.run_after <= now),
        and_(table.c.state == State.RUNNING, table.c.lease_until < now),
    )
    # SKIP LOCKED: a row another claimer holds is passed over, not waited for; once locked,
    # PostgreSQL checks again that it is still due. (SQLite renders no lock clause: its
    # BEGIN IMMEDIATE holds the only write lock.) NO KEY: deliveries' foreign keys may
    # still reference the job meanwhile.
    oldest = (
        select(table.c.id).where(due).order_by(table.c.id).limit(1)
        .with_for_update(skip_locked=True, key_share=True)
        .scalar_subquery()
    )
    return conn.execute(
        update(table)
        .where(table.c.id == oldest)
        .values(
            state=State.RUNNING,
            worker=worker,
            lease_until=now + timedelta(seconds=lease_seconds),
            attempts=table.c.attempts + 1,
            updated_at=now,
        )
        .returning(*table.c)
    ).one_or_none()


def _extend_lease(
    conn: Connection, table: Table, row_id: int, *, worker: str, lease_seconds: float, now: datetime
) -> bool:
    """Push the lease deadline forward, only while `worker` still holds the row."""
    result = conn.execute(
        update(table)
        .where(_held(table, row_id, worker))
        .values(lease_until=now + timedelta(seconds=lease_seconds), updated_at=now)
    )
    return result.rowcount == 1


def _finish(
    conn: Connection, table: Table, row_id: int, *, worker: str | None, now: datetime, **values
) -> None:
    """Mark a held row done (with `values`); LeaseLost if the worker no longer holds it."""
    result = conn.execute(
        update(table)
        .where(_held(table, row_id, worker))
        .values(state=State.DONE, lease_until=None, error=None, updated_at=now, **values)
    )
    if result.rowcount != 1:
        raise _lease_lost(table, row_id, worker)


def _fail(
    conn: Connection,
    table: Table,
    row_id: int,
    *,
    worker: str | None,
    error: str,
    retryable: bool,
    backoff_seconds: float,
    max_backoff_seconds: float,
    max_attempts: int,
    now: datetime,
) -> State:
    """Back to pending after an exponential backoff, or failed for good; returns the new state."""
    # FOR UPDATE: no other worker may reclaim the row between this read and the update.
    attempts = conn.scalar(
        select(table.c.attempts).where(_held(table, row_id, worker)).with_for_update(key_share=True)
    )
    if attempts is None:
        raise _lease_lost(table, row_id, worker)
    if retryable and attempts < max_attempts:
        # attempts >= 1 here (a claim counts one): waits backoff, 2*backoff, 4*backoff...
        delay = min(backoff_seconds * 2 ** min(attempts - 1, 20), max_backoff_seconds)
        state, run_after = State.PENDING, now + timedelta(seconds=delay)
    else:
        state, run_after = State.FAILED, now
    conn.execute(
        update(table)
        .where(table.c.id == row_id)
        .values(state=state, run_after=run_after, lease_until=None, error=_clip(error), updated_at=now)
    )
    return state


def _requeue(table: Table, *, now: datetime):
    """UPDATE that puts failed rows back to pending with a fresh attempt budget (add a WHERE)."""
    return (
        update(table)
        .where(table.c.state == State.FAILED)
        .values(state=State.PENDING, attempts=0, run_after=now, lease_until=None, updated_at=now)
    )


# --- Study and job operations ---------------------------------------------------------


def _recording_statements(backend_insert):
    """The two statements of Queue.record_instance, built once with bound parameters
    (study_uid, now, and the instances columns): SQLAlchemy then finds them compiled in its
    cache, where a statement built per call cost a cache key each time (0.24 ms per
    execute, in front of every C-STORE answer).

    The first creates the study row, or counts one more instance and moves its
    last_received_at: one INSERT ... ON CONFLICT DO UPDATE (`backend_insert`: the
    dialect's insert), so two receivers counting instances of one new study at once both
    count. The second inserts the instance, or nothing for a known one.
    """
    now = bindparam("now")
    touch = backend_insert(studies).values(
        study_uid=bindparam("study_uid"),
        first_received_at=now,
        last_received_at=now,
        instance_count=1,
        enqueued_instance_count=0,
    )
    touch = touch.on_conflict_do_update(
        index_elements=[studies.c.study_uid],
        set_={"last_received_at": now, "instance_count": studies.c.instance_count + 1},
    )
    columns = ("sop_instance_uid", "sop_class_uid", "study_uid", "series_uid", "path", "transfer_syntax",
               "calling_ae", "size_bytes", "received_at")
    insert = (
        backend_insert(instances)
        .values({name: bindparam(name) for name in columns})
        .on_conflict_do_nothing(index_elements=[instances.c.sop_instance_uid])
        .returning(instances.c.id)
    )
    return touch, insert


class _DriverStatement:
    """A statement compiled once for SQLite, run on the driver's connection with its values
    bound as SQLAlchemy binds them (defaults and literals filled in, each value through its
    type's processor: UTCDateTime's text, for one)."""

    def __init__(self, statement, dialect) -> None:
        self._compiled = statement.compile(dialect=dialect)
        self.sql = str(self._compiled)
        # qmark: the parameters in the order of their placeholders. The type as the dialect
        # has it (dialect_impl): SQLite's DATETIME writes the text SQLAlchemy reads back.
        self._binds = [(name, self._compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
                       for name in self._compiled.positiontup]

    def parameters(self, values: Mapping[str, object]) -> list:
        every = self._compiled.construct_params(values)
        return [every[name] if process is None else process(every[name]) for name, process in self._binds]


class _SqliteRecording:
    """Queue.record_instance's transaction on SQLite, run on the sqlite3 connection itself.

    In the SCP, right after a 17 MB data set (caches cold), SQLAlchemy's execution of the
    BEGIN, the two statements and the commit took 0.31 ms, SQLite 0.07 ms; the whole call
    took 0.84-0.95 ms, and 0.54-0.56 ms here: in front of every C-STORE answer. The same
    statements (_recording_statements), compiled once, and the same transaction: BEGIN
    IMMEDIATE, the study counted, the instance inserted, a duplicate rolled back.
    PostgreSQL keeps SQLAlchemy's execution, whose errors its backend classifies.
    """

    def __init__(self, dialect, touch_study, insert_instance) -> None:
        self._touch_study = _DriverStatement(touch_study, dialect)
        self._insert_instance = _DriverStatement(insert_instance, dialect)

    def record(self, driver, *, study: Mapping[str, object], instance: Mapping[str, object]) -> bool:
        """Run the transaction on `driver` (a sqlite3 connection outside any transaction,
        as the node's engine makes them: isolation_level None); True if the instance is new."""
        driver.execute("BEGIN IMMEDIATE")
        try:
            driver.execute(self._touch_study.sql, self._touch_study.parameters(study))
            added = driver.execute(self._insert_instance.sql, self._insert_instance.parameters(instance)).fetchone()
            if added is None:  # known already: the study's count goes too
                driver.rollback()
                return False
            driver.commit()
        except BaseException:
            if driver.in_transaction:  # a failed commit (disk full) may leave it open
                driver.rollback()
            raise
        return True


def _has_pending_job(conn: Connection, study_uid: str) -> bool:
    stmt = select(jobs.c.id).where(jobs.c.study_uid == study_uid, jobs.c.state == State.PENDING)
    return conn.scalar(stmt.limit(1)) is not None


def new_analysis_key() -> str:
    """A random key for one analysis: its result UIDs derive from it (see analyse.worker.result_uid).

    Random, so that another installation, a rebuilt database or a reused row id never
    gives the same UIDs; stored in the job row, so that every attempt of the job does.
    """
    return uuid.uuid4().hex


def _insert_job(conn: Connection, study_uid: str, now: datetime, **values) -> int:
    """A job (pending unless `values` say otherwise) for the study's next generation."""
    had = conn.scalar(select(func.count()).select_from(jobs).where(jobs.c.study_uid == study_uid))
    row = {
        "study_uid": study_uid,
        "generation": had + 1,
        "analysis_key": new_analysis_key(),
        "state": State.PENDING,
        "attempts": 0,
        "run_after": now,
        "created_at": now,
        "updated_at": now,
        **values,
    }
    return conn.scalar(insert(jobs).values(**row).returning(jobs.c.id))


def _count_in(conn: Connection, column, values: list[str], *where) -> int:
    """How many rows have `column` in `values` (and match `where`), in IN-list chunks."""
    return sum(
        conn.scalar(
            select(func.count()).where(column.in_(values[start : start + _IN_CHUNK]), *where)
        )
        for start in range(0, len(values), _IN_CHUNK)
    )


def _outputs_by_destination(destinations: Mapping[str, Sequence[str]] | Collection[str]) -> dict[str, tuple[str, ...]]:
    """Destination name -> the outputs it takes, each once; a plain collection of names
    takes the GSPS."""
    if isinstance(destinations, Mapping):
        return {name: tuple(dict.fromkeys(outputs)) for name, outputs in destinations.items()}
    return {name: ("gsps",) for name in dict.fromkeys(destinations)}


def _jobs_with_deliveries(conn: Connection, rows) -> list[Job]:
    ids = [row.id for row in rows]
    by_job: dict[int, list[Delivery]] = {job_id: [] for job_id in ids}
    if ids:
        stmt = select(deliveries).where(deliveries.c.job_id.in_(ids)).order_by(deliveries.c.id)
        for row in conn.execute(stmt):
            by_job[row.job_id].append(_record(Delivery, row))
    return [_record(Job, row, deliveries=tuple(by_job[row.id])) for row in rows]


def _count_by_state(conn: Connection, table: Table) -> dict[str, int]:
    found = dict(conn.execute(select(table.c.state, func.count()).group_by(table.c.state)).all())
    return {state.value: found.get(state.value, 0) for state in State}


def _depth(conn: Connection, now: datetime) -> dict:
    """Jobs and deliveries per state, and the age of the oldest pending job (Queue.depth)."""
    oldest = conn.scalar(select(func.min(jobs.c.created_at)).where(jobs.c.state == State.PENDING))
    return {
        **{table.name: _count_by_state(conn, table) for table in (jobs, deliveries)},
        "oldest_pending_job_age_seconds": None if oldest is None else (now - oldest).total_seconds(),
    }


def _latest_errors(limit: int):
    """SELECT the newest errors still carried by a job or a delivery."""
    job_errors = select(
        jobs.c.id.label("job_id"),
        jobs.c.study_uid,
        null().label("destination"),
        jobs.c.error,
        jobs.c.updated_at.label("at"),
    ).where(jobs.c.error.is_not(None))
    delivery_errors = (
        select(
            deliveries.c.job_id,
            jobs.c.study_uid,
            deliveries.c.destination,
            deliveries.c.error,
            deliveries.c.updated_at,
        )
        .join(jobs, jobs.c.id == deliveries.c.job_id)
        .where(deliveries.c.error.is_not(None))
    )
    both = union_all(job_errors, delivery_errors).subquery()
    return select(both).order_by(both.c.at.desc()).limit(limit)


# --- Retention ----------------------------------------------------------------------


def _delivered_studies(delivered_before: datetime | None):
    """SELECT study_uid, delivered_at of every study retention may remove (oldest first).

    A study qualifies when it has at least one job, every job is done, every job has at
    least one delivery and every delivery is done (a result without a delivery is the
    only copy there is), and no instance arrived after its last enqueue. delivered_at is
    the latest update of its jobs and deliveries: when the last of them became done.
    """
    not_delivered = case(
        (jobs.c.state != State.DONE, 1),
        (deliveries.c.id.is_(None), 1),
        (deliveries.c.state != State.DONE, 1),
        else_=0,
    )
    delivered_at = greatest(
        func.max(jobs.c.updated_at), func.max(deliveries.c.updated_at), type_=UTCDateTime
    ).label("delivered_at")
    stmt = (
        select(studies.c.study_uid, delivered_at)
        .join(jobs, jobs.c.study_uid == studies.c.study_uid)
        .outerjoin(deliveries, deliveries.c.job_id == jobs.c.id)
        .where(studies.c.instance_count == studies.c.enqueued_instance_count)
        .group_by(studies.c.study_uid)
        .having(func.sum(not_delivered) == 0)
        .order_by(delivered_at, studies.c.study_uid)
    )
    if delivered_before is not None:
        stmt = stmt.having(delivered_at <= delivered_before)
    return stmt


class Queue:
    """The node's durable queue: instances, studies, analysis jobs and deliveries."""

    def __init__(self, database_url: str, *, busy_timeout_seconds: float = BUSY_TIMEOUT_SECONDS):
        """A queue on `database_url`: a SQLite file, or a PostgreSQL database (see backends.py).

        ValueError for any other URL. `busy_timeout_seconds` bounds how long a write
        waits for a lock (and, on PostgreSQL, for a connection).
        """
        self._backend: Backend = backend_for(make_url(database_url), busy_timeout_seconds)
        self.dialect = self._backend.name
        self.path = self._backend.target  # what messages name: the file, or the URL without its password
        self._engine = self._backend.create_engine()
        self._reader = self._engine.execution_options(**self._backend.reader_options)
        self._touch_study, self._insert_instance = _recording_statements(self._backend.insert)
        self._sqlite_recording = (
            _SqliteRecording(self._engine.dialect, self._touch_study, self._insert_instance)
            if self._backend.name == "sqlite" else None
        )

    def close(self) -> None:
        """Close pooled connections (call before the process exits or forks)."""
        self._engine.dispose()

    @contextlib.contextmanager
    def _unavailable_as_queue_error(self):
        """Raise database trouble as QueueUnavailable (database and kind; no SQL, no values)."""
        try:
            yield
        except Exception as error:
            kind = self._backend.unavailable_kind(error)
            if kind is None:
                raise
            # `from None`: the chained driver error quotes the statement and its values.
            raise QueueUnavailable(self.path, kind) from None

    @contextlib.contextmanager
    def _write(self):
        # BEGIN IMMEDIATE (SQLite) or BEGIN ... COMMIT; a failed commit (disk full) is raised here too.
        with self._unavailable_as_queue_error(), self._engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self):
        # BEGIN (a consistent snapshot) ... COMMIT
        with self._unavailable_as_queue_error(), self._reader.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _unusable_as_config_error(self):
        """Database trouble that waiting will not cure, raised as the backend's ConfigError."""
        try:
            yield
        except QueueUnavailable as error:
            if error.kind in UNUSABLE_KINDS:
                raise self._backend.unusable(error.kind) from None
            raise

    def check_database(self) -> None:
        """Raise ConfigError naming the database and the way out if it is not usable.

        Called by `migrate`, so every process that opens the queue (serve, the CLI)
        stops on a corrupt, truncated or unreadable file, a wrong password or a missing
        database with one line instead of a traceback or a restart loop. A database that
        is only away (locked, a PostgreSQL server down) raises QueueUnavailable.
        SQLite: `PRAGMA quick_check`; PostgreSQL: connect and read the schema revision.
        """
        from alembic.script import ScriptDirectory

        self._backend.check_before_connecting()
        known = frozenset(script.revision for script in ScriptDirectory(str(MIGRATIONS)).walk_revisions())
        with self._unusable_as_config_error(), self._read() as conn:
            self._backend.check(conn, known_revisions=known)

    def migrate(self) -> None:
        """Check the database, then bring the schema to the newest Alembic revision.

        Idempotent and safe from many processes (SQLite: BEGIN IMMEDIATE; PostgreSQL:
        an advisory lock; both in the migration's transaction). ConfigError if the
        database is not usable (see check_database).
        """
        self.check_database()
        # Alembic narrates its imports and every run at INFO; one event of ours says what changed.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from alembic import command
        from alembic.config import Config as AlembicConfig
        from alembic.runtime.migration import MigrationContext

        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self._unusable_as_config_error(), self._write() as conn:
            self._backend.lock_for_migration(conn)
            before = MigrationContext.configure(conn).get_current_revision()
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            after = MigrationContext.configure(conn).get_current_revision()
        if after != before:
            log.info("schema_migrated", from_revision=before, to_revision=after)

    # --- receiving ---------------------------------------------------------------

    def record_instance(
        self,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_uid: str,
        series_uid: str,
        path: str,
        transfer_syntax: str,
        calling_ae: str,
        size_bytes: int,
        now: datetime | None = None,
    ) -> bool:
        """Record a stored instance, committed on return; False if the UID was already recorded.

        A duplicate (a re-sent instance) changes nothing, not even the study's
        timestamps: one stored instance, one analysis.
        """
        now = now or utcnow()
        study = {"study_uid": study_uid, "now": now}
        instance = {
            "sop_instance_uid": sop_instance_uid,
            "sop_class_uid": sop_class_uid,
            "study_uid": study_uid,
            "series_uid": series_uid,
            "path": str(path),
            "transfer_syntax": transfer_syntax,
            "calling_ae": calling_ae,
            "size_bytes": size_bytes,
            "received_at": now,
        }
        if self._sqlite_recording is not None:
            with self._unavailable_as_queue_error(), self._engine.connect() as conn:
                return self._sqlite_recording.record(conn.connection.driver_connection, study=study,
                                                     instance=instance)
        try:
            with self._write() as conn:
                conn.execute(self._touch_study, study)
                # A duplicate (known already, or recorded by another receiver meanwhile)
                # inserts nothing: then this transaction, with its study count, is rolled
                # back. Two statements, no lookup first: this runs before every answer.
                if conn.execute(self._insert_instance, instance).scalar() is None:
                    raise _Duplicate
        except _Duplicate:
            return False
        return True

    def instance_paths(self) -> list[tuple[str, str]]:
        """(SOP Instance UID, path) of every recorded instance, for the startup reconciliation."""
        stmt = select(instances.c.sop_instance_uid, instances.c.path).order_by(instances.c.id)
        with self._read() as conn:
            return [(row.sop_instance_uid, row.path) for row in conn.execute(stmt)]

    def set_missing_instances(
        self, sop_instance_uids: Collection[str], *, now: datetime | None = None
    ) -> tuple[int, int]:
        """Mark exactly these instances as missing their file; clear the mark on all others.

        Returns (newly marked, cleared). An instance still missing keeps its first
        `missing_since`.
        """
        now = now or utcnow()
        wanted = sorted(set(sop_instance_uids))
        with self._write() as conn:
            marked = select(instances.c.sop_instance_uid).where(instances.c.missing_since.is_not(None))
            marked_before = set(conn.scalars(marked))
            newly = [uid for uid in wanted if uid not in marked_before]
            cleared = sorted(marked_before - set(wanted))
            for column_value, uids in ((now, newly), (None, cleared)):
                for start in range(0, len(uids), _IN_CHUNK):
                    conn.execute(
                        update(instances)
                        .where(instances.c.sop_instance_uid.in_(uids[start : start + _IN_CHUNK]))
                        .values(missing_since=column_value)
                    )
        return len(newly), len(cleared)

    def study_instances(self, study_uid: str) -> list[Instance]:
        """The study's instances, by series then arrival."""
        stmt = (
            select(instances)
            .where(instances.c.study_uid == study_uid)
            .order_by(instances.c.series_uid, instances.c.id)
        )
        with self._read() as conn:
            return [_record(Instance, row) for row in conn.execute(stmt)]

    # --- jobs --------------------------------------------------------------------

    def enqueue_ready_studies(
        self,
        *,
        stable_seconds: float,
        now: datetime | None = None,
        listening_since: datetime | None = None,
    ) -> list[int]:
        """Create one pending job per study that is ready; returns the new job ids.

        Ready: no instance for `stable_seconds`, and instances recorded since the
        study was last enqueued. If the study still has a pending job, that job
        takes the new instances (a job reads the study's instances when it runs),
        so no second job is made; otherwise the next generation is created.

        `listening_since` is when the SCP (re)started listening: time before it is
        not quiet time, since senders could not send while the node was down. A study
        cut off by a crash or restart thus waits `stable_seconds` after the restart
        for its re-sent rest, instead of being analysed in part and then again (a
        second generation, a second GSPS) when the rest arrives.
        """
        now = now or utcnow()
        quiet_since = now - timedelta(seconds=stable_seconds)
        if listening_since is not None and listening_since > quiet_since:
            return []
        ready = (
            select(studies.c.study_uid, studies.c.instance_count)
            .where(studies.c.instance_count > studies.c.enqueued_instance_count)
            .where(studies.c.last_received_at <= quiet_since)
            .order_by(studies.c.last_received_at)
            # A study another scheduler (or a receiver counting an instance) holds is left
            # to it; once locked, PostgreSQL checks again that the study is still ready,
            # and no one can count an instance until this transaction commits.
            .with_for_update(skip_locked=True)
        )
        created = []
        with self._write() as conn:
            for study_uid, instance_count in conn.execute(ready).all():
                if not _has_pending_job(conn, study_uid):
                    created.append(_insert_job(conn, study_uid, now))
                conn.execute(
                    update(studies)
                    .where(studies.c.study_uid == study_uid)
                    .values(enqueued_instance_count=instance_count, last_enqueued_at=now)
                )
        return created

    def claim_next_job(
        self,
        *,
        worker: str,
        lease_seconds: float,
        max_attempts: int | None = None,
        now: datetime | None = None,
    ) -> Job | None:
        """Take the oldest due pending job, or one whose worker's lease expired; None if none.

        With `max_attempts`, an expired job already tried that often is failed
        instead of reclaimed, so a job that kills its worker cannot loop forever.
        """
        now = now or utcnow()
        with self._write() as conn:
            if max_attempts is not None:
                _fail_exhausted_leases(conn, jobs, max_attempts=max_attempts, now=now)
            row = _claim(conn, jobs, worker=worker, lease_seconds=lease_seconds, now=now)
        return None if row is None else _record(Job, row)

    def heartbeat_job(
        self, job_id: int, *, worker: str, lease_seconds: float, now: datetime | None = None
    ) -> bool:
        """Extend the job's lease; False if `worker` no longer holds it (stop working on it)."""
        with self._write() as conn:
            return _extend_lease(
                conn, jobs, job_id, worker=worker, lease_seconds=lease_seconds, now=now or utcnow()
            )

    def complete_job(
        self,
        job_id: int,
        *,
        worker: str,
        result_path: str,
        result_sop_instance_uid: str,
        detections: int,
        destinations: Mapping[str, Sequence[str]] | Sequence[str],
        outputs: Mapping[str, tuple[str, str]] | None = None,
        now: datetime | None = None,
    ) -> None:
        """Mark the job done and create one pending delivery per destination and output, in
        one transaction.

        The job's result (`result_path`, `result_sop_instance_uid`) is its GSPS; `outputs`
        gives the others ("sr": (path, SOP Instance UID); "sc": (the captures' folder, its
        first capture's UID)). `destinations` maps each name to the outputs it takes; a
        plain list of names takes the GSPS. Raises LeaseLost (and changes nothing) if
        `worker` no longer holds the job.
        """
        now = now or utcnow()
        results = {"gsps": (str(result_path), result_sop_instance_uid), **(outputs or {})}
        wanted = _outputs_by_destination(destinations)
        rows = []
        for destination, names in wanted.items():
            for output in names:
                if output not in results:
                    raise ValueError(f"destination {destination} takes {output!r}, which the job did not make")
                path, sop_instance_uid = results[output]
                rows.append({
                    "job_id": job_id, "destination": destination, "output": output, "path": str(path),
                    "sop_instance_uid": sop_instance_uid, "state": State.PENDING, "attempts": 0,
                    "run_after": now, "created_at": now, "updated_at": now,
                })
        with self._write() as conn:
            _finish(
                conn,
                jobs,
                job_id,
                worker=worker,
                now=now,
                result_path=str(result_path),
                result_sop_instance_uid=result_sop_instance_uid,
                detections=detections,
            )
            if rows:
                conn.execute(insert(deliveries), rows)

    def fail_job(
        self,
        job_id: int,
        *,
        worker: str,
        error: str,
        retryable: bool,
        backoff_seconds: float,
        max_attempts: int,
        now: datetime | None = None,
    ) -> str:
        """Record a failed attempt; returns the new state ('pending' for a retry, or 'failed').

        Retryable with attempts left: pending again after backoff_seconds * 2**(attempts-1).
        Raises LeaseLost if `worker` no longer holds the job.
        """
        with self._write() as conn:
            return _fail(
                conn,
                jobs,
                job_id,
                worker=worker,
                error=error,
                retryable=retryable,
                backoff_seconds=backoff_seconds,
                max_backoff_seconds=float("inf"),
                max_attempts=max_attempts,
                now=now or utcnow(),
            )

    def fail_running_jobs_of(
        self,
        worker: str,
        *,
        error: str,
        backoff_seconds: float,
        max_attempts: int,
        now: datetime | None = None,
    ) -> list[tuple[int, str]]:
        """Fail the jobs held by `worker`, whose process died; returns [(job id, new state)].

        The attempt was counted when the job was claimed, so each job goes back to
        pending after the backoff, or to failed once max_attempts is spent: a study
        that kills its worker every time cannot take the pool down forever. Jobs of
        other workers are not touched.
        """
        now = now or utcnow()
        held = select(jobs.c.id).where(jobs.c.state == State.RUNNING, jobs.c.worker == worker)
        failed = []
        with self._write() as conn:
            for job_id in conn.scalars(held.order_by(jobs.c.id)).all():
                state = _fail(
                    conn, jobs, job_id, worker=worker, error=error, retryable=True,
                    backoff_seconds=backoff_seconds, max_backoff_seconds=float("inf"),
                    max_attempts=max_attempts, now=now,
                )
                failed.append((job_id, state.value))
        return failed

    def expire_leases(self, *, now: datetime | None = None, owners: Collection[str] | None = None) -> int:
        """End leases at once; returns how many jobs and deliveries were running under them.

        Without `owners` every lease ends: called at startup by a node that holds the data
        directory's run lock alone (SQLite), so whatever is still `running` was held by a
        node that crashed. With `owners` (a shared PostgreSQL deployment) only the leases
        of those dead processes end: worker ids are ``<owner>/<name>`` (see
        store.process_owner), and live processes elsewhere keep theirs. Either way the work
        is claimed again now instead of after its lease; the claim counts the attempt as
        usual, so work that crashes its process every time still ends in `failed`.
        """
        now = now or utcnow()
        with self._write() as conn:
            return sum(
                conn.execute(
                    update(table).where(table.c.state == State.RUNNING, _held_by_any(table, owners))
                    .values(lease_until=now)
                ).rowcount
                for table in (jobs, deliveries)
            )

    def rerun_study(self, study_uid: str, *, now: datetime | None = None) -> tuple[Job, int] | None:
        """Queue a new analysis of the whole study, at an operator's request.

        Returns (the pending job, the study's instance count), or None when no instance
        of the study is recorded. A job already pending for the study is that job (it
        reads the study's instances when it runs); otherwise the next generation is
        made, with a new analysis key and so new result UIDs: a new object for the PACS.
        """
        now = now or utcnow()
        with self._write() as conn:
            count = conn.scalar(  # locked: the scheduler must not enqueue the study meanwhile
                select(studies.c.instance_count).where(studies.c.study_uid == study_uid).with_for_update()
            )
            if not count:
                return None
            pending = select(jobs.c.id).where(jobs.c.study_uid == study_uid, jobs.c.state == State.PENDING)
            job_id = conn.scalar(pending.limit(1)) or _insert_job(conn, study_uid, now)
            # The scheduler must not make a second job for the same instances.
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(enqueued_instance_count=studies.c.instance_count, last_enqueued_at=now)
            )
            (job,) = _jobs_with_deliveries(conn, conn.execute(select(jobs).where(jobs.c.id == job_id)).all())
        return job, count

    def restore_delivered(
        self,
        study_uid: str,
        results: Iterable,
        *,
        resend_to: Mapping[str, Sequence[str]] | Collection[str] = (),
        now: datetime | None = None,
    ) -> list[int]:
        """Record a study's delivered results as done jobs, after the database was rebuilt.

        `results` are the study's entries of the delivered-results ledger, oldest first
        (objects with `result_sop_instance_uid`, `result_path`, `sop_instance_uids`,
        `delivered`: {destination: when}, and `output`, "gsps" when absent); see
        store.reconcile. Each becomes a done job with a done delivery per destination it
        reached, and a pending one for each destination of `resend_to` (name -> outputs it
        takes; a plain list of names takes the GSPS) that takes its output and never got it. The study's recorded instances
        that the results cover count as enqueued, so they are not analysed again; an
        instance none covers (it came later) makes the study ready as usual.

        Only for a study without jobs: when it has any, the database is the record and
        nothing is done. Returns the new job ids.
        """
        now = now or utcnow()
        results = list(results)
        with self._write() as conn:
            has_jobs = select(jobs.c.id).where(jobs.c.study_uid == study_uid).limit(1)
            if not results or conn.scalar(has_jobs) is not None:
                return []
            created, covered = [], set()
            takes = _outputs_by_destination(resend_to)
            for result in results:
                delivered: Mapping[str, datetime] = result.delivered
                output = getattr(result, "output", "gsps")
                finished = max(delivered.values(), default=now)
                job_id = _insert_job(
                    conn, study_uid, now, state=State.DONE, attempts=1, run_after=finished,
                    created_at=finished, updated_at=now, result_path=str(result.result_path),
                    result_sop_instance_uid=result.result_sop_instance_uid,
                )
                rows = [
                    {"destination": name, "state": State.DONE, "attempts": 1, "run_after": at,
                     "created_at": at, "updated_at": at}
                    for name, at in delivered.items()
                ] + [
                    {"destination": name, "state": State.PENDING, "attempts": 0, "run_after": now,
                     "created_at": now, "updated_at": now}
                    for name, names in takes.items() if output in names and name not in delivered
                ]
                if rows:
                    conn.execute(insert(deliveries), [
                        {**row, "job_id": job_id, "output": output, "path": str(result.result_path),
                         "sop_instance_uid": result.result_sop_instance_uid}
                        for row in rows
                    ])
                created.append(job_id)
                covered.update(result.sop_instance_uids)
            enqueued = _count_in(
                conn, instances.c.sop_instance_uid, sorted(covered), instances.c.study_uid == study_uid
            )
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(enqueued_instance_count=enqueued, last_enqueued_at=now)
            )
        return created

    def retry_job(self, job_id: int, *, now: datetime | None = None) -> bool:
        """Retry what failed: a failed job, or a done job's failed deliveries.

        Returns True if something went back to pending; False for an unknown id
        or a job with nothing failed.
        """
        now = now or utcnow()
        with self._write() as conn:
            job = conn.execute(_requeue(jobs, now=now).where(jobs.c.id == job_id))
            delivery = conn.execute(_requeue(deliveries, now=now).where(deliveries.c.job_id == job_id))
            return job.rowcount + delivery.rowcount > 0

    def run_job_now(self, job_id: int, *, now: datetime | None = None) -> int:
        """Make the job (if pending) and its pending deliveries due now, skipping their backoff.

        Returns how many rows were moved forward (0 for an unknown id or nothing pending).
        """
        now = now or utcnow()
        with self._write() as conn:
            return sum(
                conn.execute(
                    update(table)
                    .where(id_column == job_id, table.c.state == State.PENDING, table.c.run_after > now)
                    .values(run_after=now, updated_at=now)
                ).rowcount
                for table, id_column in ((jobs, jobs.c.id), (deliveries, deliveries.c.job_id))
            )

    def get_job(self, job_id: int) -> Job | None:
        """One job with its deliveries, or None."""
        with self._read() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.id == job_id)).all()
            found = _jobs_with_deliveries(conn, rows)
        return found[0] if found else None

    def previous_results(self, study_uid: str, *, before_generation: int) -> list[Job]:
        """The study's done jobs of earlier generations that made a result, newest first,
        each with its deliveries (where its other outputs are). A new analysis of the
        study replaces the newest result of each output (README "What the radiologist
        sees"): usually all in the newest job; after a rebuilt database each restored
        result is a job of its own (restore_delivered)."""
        stmt = (
            select(jobs)
            .where(jobs.c.study_uid == study_uid, jobs.c.generation < before_generation,
                   jobs.c.state == State.DONE, jobs.c.result_path.is_not(None))
            .order_by(jobs.c.generation.desc())
        )
        with self._read() as conn:
            return _jobs_with_deliveries(conn, conn.execute(stmt).all())

    def list_jobs(self, *, state: str | None = None, limit: int = 50) -> list[Job]:
        """The newest jobs (optionally in one state), each with its deliveries.

        ``state="failed"`` also lists done jobs with a failed delivery: for an operator
        the study failed either way (its result did not reach a destination).
        """
        stmt = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if state == State.FAILED:
            failed_delivery = (
                select(deliveries.c.id)
                .where(deliveries.c.job_id == jobs.c.id, deliveries.c.state == State.FAILED)
                .exists()
            )
            stmt = stmt.where(or_(jobs.c.state == State.FAILED, failed_delivery))
        elif state is not None:
            stmt = stmt.where(jobs.c.state == State(state))
        with self._read() as conn:
            return _jobs_with_deliveries(conn, conn.execute(stmt).all())

    # --- deliveries --------------------------------------------------------------

    def claim_next_delivery(
        self,
        *,
        worker: str,
        lease_seconds: float,
        max_attempts: int | None = None,
        now: datetime | None = None,
    ) -> Delivery | None:
        """Take the oldest due pending delivery, or one whose lease expired; None if none."""
        now = now or utcnow()
        with self._write() as conn:
            if max_attempts is not None:
                _fail_exhausted_leases(conn, deliveries, max_attempts=max_attempts, now=now)
            row = _claim(conn, deliveries, worker=worker, lease_seconds=lease_seconds, now=now)
        return None if row is None else _record(Delivery, row)

    def heartbeat_delivery(
        self, delivery_id: int, *, worker: str, lease_seconds: float, now: datetime | None = None
    ) -> bool:
        """Extend the delivery's lease; False if `worker` no longer holds it."""
        with self._write() as conn:
            return _extend_lease(
                conn, deliveries, delivery_id, worker=worker, lease_seconds=lease_seconds,
                now=now or utcnow(),
            )

    def complete_delivery(
        self, delivery_id: int, *, worker: str | None = None, now: datetime | None = None
    ) -> None:
        """Mark the delivery done; LeaseLost if it is not running (under `worker`, when given)."""
        with self._write() as conn:
            _finish(conn, deliveries, delivery_id, worker=worker, now=now or utcnow())

    def fail_delivery(
        self,
        delivery_id: int,
        *,
        error: str,
        retryable: bool,
        backoff_seconds: float,
        max_backoff_seconds: float,
        max_attempts: int,
        worker: str | None = None,
        now: datetime | None = None,
    ) -> str:
        """Record a failed send: pending again after a backoff capped at max_backoff_seconds, or failed.

        Returns the new state; raises LeaseLost if the delivery is not running (under `worker`).
        """
        with self._write() as conn:
            return _fail(
                conn,
                deliveries,
                delivery_id,
                worker=worker,
                error=error,
                retryable=retryable,
                backoff_seconds=backoff_seconds,
                max_backoff_seconds=max_backoff_seconds,
                max_attempts=max_attempts,
                now=now or utcnow(),
            )

    # --- retention ---------------------------------------------------------------

    def delivered_studies(
        self, *, delivered_before: datetime | None = None, limit: int = 100
    ) -> list[DeliveredStudy]:
        """Studies retention may remove, delivered longest ago first (see _delivered_studies).

        With `delivered_before`, only those fully delivered at or before it.
        """
        stmt = _delivered_studies(delivered_before).limit(limit)
        with self._read() as conn:
            return [_record(DeliveredStudy, row) for row in conn.execute(stmt)]

    def purge_study(
        self,
        study_uid: str,
        *,
        delivered_before: datetime | None = None,
        remove_files: Callable[[list[str], list[str]], T],
    ) -> T | None:
        """Delete a delivered study's rows and, through `remove_files`, its files, atomically.

        All in one BEGIN IMMEDIATE transaction, which holds SQLite's write lock, so no other
        process (the SCP recording a new instance of this study) can commit meanwhile:
        check again that the study may be removed (and was delivered at or before
        `delivered_before`, when given), delete its delivery, job, instance and study rows,
        call ``remove_files(instance_paths, result_paths)``, and only then commit. Returns
        what remove_files returned; None, changing nothing, if the study may no longer be
        removed (e.g. an instance arrived since it was listed). If remove_files raises,
        the rows stay (rolled back) and the exception propagates.
        """
        still = _delivered_studies(delivered_before).where(studies.c.study_uid == study_uid)
        study_jobs = select(jobs.c.id).where(jobs.c.study_uid == study_uid)
        with self._write() as conn:
            # On PostgreSQL the study row's lock stands in for SQLite's write lock: a
            # receiver counting a new instance of the study waits for the commit.
            conn.execute(select(studies.c.study_uid).where(studies.c.study_uid == study_uid).with_for_update())
            if conn.execute(still).first() is None:
                return None
            instance_paths = list(
                conn.scalars(
                    select(instances.c.path)
                    .where(instances.c.study_uid == study_uid)
                    .order_by(instances.c.id)
                )
            )
            job_results = select(jobs.c.result_path).where(
                jobs.c.study_uid == study_uid, jobs.c.result_path.is_not(None)
            )
            delivered = select(deliveries.c.path).where(deliveries.c.job_id.in_(study_jobs))
            result_paths = sorted(set(conn.scalars(job_results)) | set(conn.scalars(delivered)))
            conn.execute(delete(deliveries).where(deliveries.c.job_id.in_(study_jobs)))
            conn.execute(delete(jobs).where(jobs.c.study_uid == study_uid))
            conn.execute(delete(instances).where(instances.c.study_uid == study_uid))
            conn.execute(delete(studies).where(studies.c.study_uid == study_uid))
            # Files last, still inside the transaction: a crash before the commit leaves
            # every row (files of a delivered study gone at worst; see ops/retention.py).
            return remove_files(instance_paths, result_paths)

    # --- reporting ---------------------------------------------------------------

    def stats(self, *, last_errors: int = 5, now: datetime | None = None) -> dict:
        """Counts per job and delivery state, the oldest pending job's age, the latest errors.

        "instances" counts the recorded instances and those whose file was gone at the
        last startup (see store.reconcile); "missing_instances" lists the first of those.

        Errors are those still carried by a job or delivery (cleared on success), newest
        first, as {"job_id", "study_uid", "destination" (None for a job's own), "error", "at"}.
        """
        now = now or utcnow()
        with self._read() as conn:
            depth = _depth(conn, now)
            errors = [dict(row._mapping) for row in conn.execute(_latest_errors(last_errors))]
            instance_total = conn.scalar(select(func.count()).select_from(instances))
            is_missing = instances.c.missing_since.is_not(None)
            missing_total = conn.scalar(select(func.count()).select_from(instances).where(is_missing))
            missing = conn.execute(
                select(instances.c.sop_instance_uid, instances.c.study_uid, instances.c.path,
                       instances.c.missing_since)
                .where(is_missing)
                .order_by(instances.c.id)
                .limit(last_errors)
            )
            missing = [dict(row._mapping) for row in missing]
        return {
            **depth,
            "instances": {"total": instance_total, "missing": missing_total},
            "missing_instances": missing,
            "last_errors": errors,
        }

    def depth(self, *, now: datetime | None = None) -> dict:
        """What is waiting, cheaply (read at every metrics scrape): {"jobs": {state: count},
        "deliveries": {state: count}, "oldest_pending_job_age_seconds": float or None}."""
        with self._read() as conn:
            return _depth(conn, now or utcnow())

    def delivery_stats(self, *, now: datetime | None = None) -> dict:
        """Are results reaching their destinations? For health and status.

        - "failed": deliveries failed for good (attempts spent, or a permanent refusal);
        - "retrying": deliveries pending (or running again) after a failed attempt;
        - "latest_failed", "latest_retrying": the newest of each, as {"job_id",
          "destination", "error", "at"} (None when there is none);
        - "oldest_pending_age_seconds": the age of the oldest pending delivery;
        - "next_attempt": the pending delivery due first, {"job_id", "destination", "at"}.
        """
        now = now or utcnow()
        waiting = deliveries.c.state.in_([State.PENDING, State.RUNNING])
        retrying = and_(waiting, deliveries.c.error.is_not(None))
        failed = deliveries.c.state == State.FAILED
        pending = deliveries.c.state == State.PENDING

        def latest(conn: Connection, where) -> dict | None:
            row = conn.execute(
                select(deliveries.c.job_id, deliveries.c.destination, deliveries.c.error,
                       deliveries.c.updated_at.label("at"))
                .where(where)
                .order_by(deliveries.c.updated_at.desc(), deliveries.c.id.desc())
                .limit(1)
            ).one_or_none()
            return None if row is None else dict(row._mapping)

        def count(conn: Connection, where) -> int:
            return conn.scalar(select(func.count()).select_from(deliveries).where(where))

        with self._read() as conn:
            oldest = conn.scalar(select(func.min(deliveries.c.created_at)).where(pending))
            due_first = conn.execute(
                select(deliveries.c.job_id, deliveries.c.destination, deliveries.c.run_after.label("at"))
                .where(pending)
                .order_by(deliveries.c.run_after, deliveries.c.id)
                .limit(1)
            ).one_or_none()
            return {
                "failed": count(conn, failed),
                "retrying": count(conn, retrying),
                "latest_failed": latest(conn, failed),
                "latest_retrying": latest(conn, retrying),
                "oldest_pending_age_seconds": None if oldest is None else (now - oldest).total_seconds(),
                "next_attempt": None if due_first is None else dict(due_first._mapping),
            }
