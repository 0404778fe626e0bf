"""Schema and connection set-up: Alembic migrations, SQLite pragmas, PostgreSQL sessions."""

from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from dicom_node.queue import Queue
from dicom_node.queue.models import metadata
from tests.queue.queue_helpers import T0, new_uid, record


def test_migrate_twice_keeps_the_data(queue, database_url):
    record(queue, new_uid(), now=T0)
    queue.migrate()
    again = Queue(database_url)
    try:
        again.migrate()
    finally:
        again.close()
    with queue._engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [("0004",)]
        assert conn.exec_driver_sql("SELECT count(*) FROM instances").all() == [(1,)]


def test_migrations_create_exactly_the_models_schema(queue, database_url):
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert differences == []


@pytest.mark.sqlite_only
def test_connections_use_wal_full_sync_busy_timeout_and_foreign_keys(queue, tmp_path):
    with sqlite3.connect(tmp_path / "queue.sqlite") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # stored in the file
    with queue._engine.connect() as conn:  # per-connection settings
        pragma = conn.exec_driver_sql
        assert pragma("PRAGMA synchronous").scalar() == 2  # FULL
        assert pragma("PRAGMA foreign_keys").scalar() == 1
        assert pragma("PRAGMA busy_timeout").scalar() >= 10_000


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_queue_needs_a_sqlite_file(url):
    with pytest.raises(ValueError, match="needs a SQLite file"):
        Queue(url)


@pytest.mark.parametrize("url, message", [
    ("mysql+pymysql://node:secret@db/queue", "runs on SQLite .* or PostgreSQL"),
    ("postgresql+psycopg2://node:secret@db/queue", "driver is psycopg 3"),
])
def test_other_databases_and_drivers_are_refused_without_showing_the_password(url, message):
    with pytest.raises(ValueError, match=message) as refused:
        Queue(url)
    assert "secret" not in str(refused.value) and "***" in str(refused.value)


def test_postgresql_sessions_read_committed_with_the_busy_timeout_as_lock_timeout(postgres_url):
    queue = Queue(postgres_url, busy_timeout_seconds=1.5)
    try:
        with queue._write() as conn:
            assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "read committed"
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "1500ms"
        with queue._read() as conn:
            assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "repeatable read"
            assert conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "on"
    finally:
        queue.close()
