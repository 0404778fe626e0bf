"""The job table's two databases, and everything that differs between them, in one place.

SQLite (``sqlite:///path``) is the embedded default: one file under node.data_dir, one
host. PostgreSQL (``postgresql+psycopg://...``, the psycopg 3 driver) is shared by any
number of processes on any number of hosts. `Queue` (ops.py) issues the same statements
on both; a `Backend` says how to connect, how a write transaction begins, which driver
errors mean "the database is unavailable", how to check the database at startup and
how migrations are serialised.

How concurrent writers stay correct:

- SQLite: every write transaction starts with ``BEGIN IMMEDIATE``, which takes the
  database's single write lock, so read-then-write operations are atomic across
  processes. The row-lock clauses in ops.py (``FOR UPDATE [SKIP LOCKED]``) are not
  rendered by SQLite's compiler: the statements are the ones SQLite always ran.
- PostgreSQL: writes run at READ COMMITTED, the server's default, set explicitly so that
  a changed ``default_transaction_isolation`` cannot change it. Claims take the oldest
  due row with ``FOR NO KEY UPDATE SKIP LOCKED`` (a row another claimer holds is skipped,
  not waited for, and the lock re-checks that the row is still due); the study-to-job
  step locks each ready study row the same way, so two schedulers never enqueue the same
  study; reads that decide a later write (a failed attempt's count, a rerun, a purge)
  lock their row with ``FOR UPDATE``; the study counter is an ``INSERT ... ON CONFLICT DO
  UPDATE``. SERIALIZABLE would give the same guarantees only with a retry loop around
  every transaction. Readers get one REPEATABLE READ snapshot, as a SQLite reader gets
  one WAL snapshot.
"""

from __future__ import annotations

import math
import os
import sqlite3
from pathlib import Path
from typing import ClassVar

from sqlalchemy import URL, Connection, Engine, create_engine, event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import GenericFunction

from dicom_node.errors import ConfigError

_READ_ONLY = "dicom_node_read_only"  # execution option: plain (deferred) BEGIN for SQLite readers
POSTGRESQL_DRIVER = "psycopg"
# Kinds that waiting will not cure: at startup they stop the node with a config error.
UNUSABLE_KINDS = frozenset({
    "permission denied", "read-only", "corrupt", "cannot open", "not a database",
    "authentication failed", "no such database",
})
# The key pg_advisory_xact_lock serialises migrations on ("dnode" in ASCII).
_MIGRATION_LOCK = 0x646E6F6465


class greatest(GenericFunction):
    """The largest of its arguments: GREATEST on PostgreSQL, SQLite's multi-argument max()."""

    inherit_cache = True


@compiles(greatest, "sqlite")
def _greatest_sqlite(element, compiler, **kw) -> str:
    return f"max({compiler.process(element.clauses, **kw)})"


def masked(url: URL) -> str:
    """The URL as it may be logged and shown: its password (if any) as ***."""
    return url.render_as_string(hide_password=True)


class Backend:
    """What a database needs that the other does not (see the module docstring)."""

    name: str
    insert = staticmethod(sqlite_insert)  # an INSERT with this dialect's ON CONFLICT
    reader_options: ClassVar[dict] = {}  # execution options for read-only transactions
    target: str  # what messages name: the file, or the URL without its password

    def __init__(self, url: URL, busy_timeout_seconds: float):
        self.url = url
        self.busy_timeout_seconds = busy_timeout_seconds

    def create_engine(self) -> Engine:
        raise NotImplementedError

    def unavailable_kind(self, error: BaseException) -> str | None:
        """The kind of database trouble behind `error`, or None when it is not such trouble."""
        raise NotImplementedError

    def unusable(self, reason: str) -> ConfigError:
        """The one-line startup error for a database that cannot be used, with the way out."""
        raise NotImplementedError

    def check_before_connecting(self) -> None:
        """ConfigError for what can be seen without connecting."""

    def check(self, conn: Connection, *, known_revisions: frozenset[str]) -> None:
        """ConfigError if the connected database is damaged (a cheap check, at each start)."""

    def lock_for_migration(self, conn: Connection) -> None:
        """Serialise migrations of concurrent starts (inside the migration's transaction)."""


# SQLite primary result codes (https://sqlite.org/rescode.html) that mean "the database
# cannot be used now", as the kind named in QueueUnavailable. Any other error (a
# constraint, a malformed statement) is a bug and is raised as it is.
_SQLITE_UNAVAILABLE_KINDS = {
    3: "permission denied",  # SQLITE_PERM
    5: "locked by another process",  # SQLITE_BUSY: the busy timeout ran out
    6: "locked",  # SQLITE_LOCKED
    7: "out of memory",  # SQLITE_NOMEM
    8: "read-only",  # SQLITE_READONLY
    10: "I/O error",  # SQLITE_IOERR
    11: "corrupt",  # SQLITE_CORRUPT
    13: "disk full",  # SQLITE_FULL
    14: "cannot open",  # SQLITE_CANTOPEN
    15: "lock protocol error",  # SQLITE_PROTOCOL
    26: "not a database",  # SQLITE_NOTADB
}


class SQLiteBackend(Backend):
    """One file, WAL mode, every write under BEGIN IMMEDIATE."""

    name = "sqlite"
    insert = staticmethod(sqlite_insert)
    reader_options: ClassVar[dict] = {_READ_ONLY: True}

    def __init__(self, url: URL, busy_timeout_seconds: float):
        if not url.database or url.database == ":memory:":
            raise ValueError(f"{masked(url)!r}: the queue needs a SQLite file (sqlite:///path)")
        super().__init__(url, busy_timeout_seconds)
        self.path = Path(url.database)
        self.target = url.database

    def create_engine(self) -> Engine:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        busy_timeout_seconds = self.busy_timeout_seconds
        engine = create_engine(self.url, connect_args={"timeout": busy_timeout_seconds})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record) -> None:
            # Take BEGIN away from the sqlite3 driver (it would emit a deferred BEGIN
            # only before DML); the "begin" hook below emits our own.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {round(busy_timeout_seconds * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is fsynced before it returns; the SCP answers Success after it.
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:
            read_only = conn.get_execution_options().get(_READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine

    def unavailable_kind(self, error: BaseException) -> str | None:
        original = error.orig if isinstance(error, DBAPIError) else error
        if not isinstance(original, sqlite3.Error):
            return None
        code = getattr(original, "sqlite_errorcode", None)
        return None if code is None else _SQLITE_UNAVAILABLE_KINDS.get(code & 0xFF)

    def unusable(self, reason: str) -> ConfigError:
        path = self.path
        if reason in ("permission denied", "read-only", "cannot open"):
            return ConfigError(
                f"node.data_dir: cannot use the job database {path} ({reason}); make it, its -wal "
                "and -shm files and its folder readable and writable by the node's user"
            )
        return ConfigError(
            f"node.data_dir: {path} is not a readable SQLite database ({reason}); move it away "
            "(with its -wal and -shm files) and start again: stored instances are recorded again "
            f"from {path.parent / 'instances'} and delivered studies are not sent again"
        )

    def check_before_connecting(self) -> None:
        if self.path.is_dir():
            raise self.unusable("it is a directory")
        if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            raise self.unusable("permission denied")

    def check(self, conn: Connection, *, known_revisions: frozenset[str]) -> None:
        # `PRAGMA quick_check` reads every page once (no index cross-checks): fast enough
        # for each start.
        problems = [row[0] for row in conn.exec_driver_sql("PRAGMA quick_check")]
        if problems != ["ok"]:
            # The messages name pages and indexes; they are not shown (one line is the rule).
            raise self.unusable(f"corrupt: quick_check found {len(problems)} problem(s)")

    # lock_for_migration: nothing to add, the migration runs under BEGIN IMMEDIATE.


# SQLSTATE codes (PostgreSQL manual, appendix A) and classes that mean "the database
# cannot be used now". A connection that never opened (refused, no route, timed out)
# carries no SQLSTATE: "server unavailable".
_POSTGRESQL_UNAVAILABLE_KINDS = {
    "08": "connection lost",  # class 08, connection exception
    "53100": "disk full",
    "53200": "out of memory",
    "53300": "too many connections",
    "53": "out of resources",  # the rest of class 53
    "57P01": "server shutting down",  # admin_shutdown
    "57P02": "server crashed",  # crash_shutdown
    "57P03": "server starting up",  # cannot_connect_now
    "58030": "I/O error",
    "55P03": "locked by another process",  # lock_not_available: lock_timeout ran out
    "40P01": "deadlock",  # the server aborted one of two transactions; the next try succeeds
    "40001": "serialization failure",
    "25006": "read-only",  # a hot standby, not the primary
    "28000": "authentication failed",
    "28P01": "authentication failed",
    "3D000": "no such database",
    "42501": "permission denied",
    "XX001": "corrupt",
    "XX002": "corrupt",
}


# A connection refused by the server: libpq keeps only the server's message text, no
# SQLSTATE; these are its words (the server's lc_messages in English, the default).
_CONNECT_REFUSALS = (  # (words that must all be there, kind); the first match wins
    (("starting up",), "server starting up"),  # the database system is starting up
    (("shutting down",), "server shutting down"),
    (("too many clients",), "too many connections"),
    (("connection slots",), "too many connections"),
    (("permission denied",), "permission denied"),  # permission denied for database "x"
    (("authentication failed",), "authentication failed"),  # password authentication failed
    (("no pg_hba.conf entry",), "authentication failed"),
    (("role", "does not exist"), "authentication failed"),
    (("role", "not permitted to log in"), "authentication failed"),
    (("database", "does not exist"), "no such database"),
)


def _connect_failure_kind(error) -> str:
    """The kind of a connection that never opened: refused by the server, or no server at all."""
    pgconn = getattr(error, "pgconn", None)
    if pgconn is not None and pgconn.needs_password and not pgconn.used_password:
        return "authentication failed"  # the server wants a password and none was found
    message = str(error)
    if "FATAL:" not in message:
        return "server unavailable"  # refused, no route, timed out, name not resolved
    refusal = message.split("FATAL:", 1)[1]
    return next(
        (kind for words, kind in _CONNECT_REFUSALS if all(word in refusal for word in words)),
        "server unavailable",
    )


class PostgreSQLBackend(Backend):
    """A shared server: a pre-pinged connection pool, row locks, lock_timeout as the busy timeout."""

    name = "postgresql"
    insert = staticmethod(postgresql_insert)
    reader_options: ClassVar[dict] = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}

    def __init__(self, url: URL, busy_timeout_seconds: float):
        if url.get_driver_name() != POSTGRESQL_DRIVER:
            raise ValueError(
                f"{masked(url)!r}: the queue's PostgreSQL driver is psycopg 3 (postgresql+psycopg://)"
            )
        super().__init__(url, busy_timeout_seconds)
        self.target = masked(url)

    def create_engine(self) -> Engine:
        wait = self.busy_timeout_seconds
        # What the URL's query does not set itself. libpq counts connect_timeout in whole
        # seconds, at least 2.
        connect_args = {
            key: value
            for key, value in {"connect_timeout": max(2, math.ceil(wait)), "application_name": "dicom-node"}.items()
            if key not in self.url.query
        }
        engine = create_engine(
            self.url,
            pool_pre_ping=True,  # a connection the server dropped (restart, failover) is replaced
            pool_size=5,
            max_overflow=20,
            pool_timeout=wait,
            isolation_level="READ COMMITTED",
            connect_args=connect_args,
        )
        lock_timeout_ms = max(1, round(wait * 1000))

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record) -> None:
            # A write waits at most the busy timeout for a row lock, as on SQLite; then
            # 55P03, "locked by another process".
            with dbapi_connection.cursor() as cursor:
                cursor.execute(f"SET lock_timeout = {lock_timeout_ms}")
            dbapi_connection.commit()

        return engine

    def unavailable_kind(self, error: BaseException) -> str | None:
        if isinstance(error, PoolTimeout):
            return "no free connection"  # every pooled connection busy past the busy timeout
        if not isinstance(error, SQLAlchemyError):
            return None
        original = error.orig if isinstance(error, DBAPIError) else None
        import psycopg

        if not isinstance(original, psycopg.Error):
            return None
        code = original.sqlstate
        if code is None:
            return _connect_failure_kind(original) if isinstance(original, psycopg.OperationalError) else None
        return _POSTGRESQL_UNAVAILABLE_KINDS.get(code) or _POSTGRESQL_UNAVAILABLE_KINDS.get(code[:2])

    def unusable(self, reason: str) -> ConfigError:
        return ConfigError(
            f"queue.url: cannot use the job database {self.target} ({reason}); check the database "
            "name, the role and its password (PGPASSWORD or ~/.pgpass), and that the role may "
            "create tables in it"
        )

    def check(self, conn: Connection, *, known_revisions: frozenset[str]) -> None:
        # Connected (QueueUnavailable otherwise); the schema is ours or not there yet. A
        # revision this node does not know was made by a newer dicom-node sharing the server.
        from alembic.runtime.migration import MigrationContext

        revision = MigrationContext.configure(conn).get_current_revision()
        if revision is not None and revision not in known_revisions:
            raise ConfigError(
                f"queue.url: the job database {self.target} has schema revision {revision}, "
                "unknown to this dicom-node (a newer version migrated it); upgrade this node"
            )

    def lock_for_migration(self, conn: Connection) -> None:
        # DDL is transactional on PostgreSQL: the first start migrates, the others wait
        # here, then find the schema at head and change nothing.
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")


def backend_for(url: URL, busy_timeout_seconds: float) -> Backend:
    """The backend for `url`; ValueError for a database the queue does not run on."""
    backends = {"sqlite": SQLiteBackend, "postgresql": PostgreSQLBackend}
    try:
        backend = backends[url.get_backend_name()]
    except KeyError:
        raise ValueError(
            f"{masked(url)!r}: the queue runs on SQLite (sqlite:///path) or PostgreSQL "
            "(postgresql+psycopg://user@host/database)"
        ) from None
    return backend(url, busy_timeout_seconds)
