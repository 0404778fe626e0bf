"""The queue on PostgreSQL: a server that goes away and comes back, and what stops a start.

The operations themselves run on both databases (the `queue` fixture of every queue
test); here is what only a client-server database has: connections that fail, a
database that is not there, a schema made by a newer node.
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from dicom_node.errors import ConfigError, QueueUnavailable
from dicom_node.queue import Queue
from dicom_node.bench.postgres import PostgresServer, postgres_bin_dir
from tests.queue.queue_helpers import T0, new_uid, record


@pytest.fixture
def own_server():
    """A server of this test's own, to stop and start again."""
    server = PostgresServer(postgres_bin_dir()).start()
    yield server
    server.stop()


def test_a_server_that_stops_is_queue_unavailable_and_writes_resume_when_it_is_back(own_server):
    url = own_server.url(own_server.create_database(), password="s3cret-pw")  # trust: not checked
    queue = Queue(url, busy_timeout_seconds=2)
    try:
        queue.migrate()
        assert record(queue, new_uid(), now=T0)
        own_server.stop(remove=False)
        with pytest.raises(QueueUnavailable) as away:
            record(queue, new_uid(), now=T0)
        assert away.value.kind in ("server unavailable", "connection lost", "server shutting down")
        assert "s3cret-pw" not in str(away.value) and "***" in str(away.value)
        assert away.value.__cause__ is None and away.value.__suppress_context__  # no SQL, no values
        own_server.start()
        # The pool's pre-ping replaces the dead connections: no restart of ours needed.
        assert record(queue, new_uid(), now=T0)
        assert queue.stats()["instances"]["total"] == 2
    finally:
        queue.close()


def test_nothing_listening_is_queue_unavailable_not_a_config_error(postgres_server):
    queue = Queue(postgres_server.url("postgres").replace(f":{postgres_server.port}/", ":1/"))
    try:
        with pytest.raises(QueueUnavailable, match="unavailable: server unavailable"):
            queue.migrate()  # waiting may help (the server is starting): serve exits 1, systemd retries
    finally:
        queue.close()


def test_a_missing_database_stops_the_start_with_a_config_error_naming_queue_url(postgres_server):
    queue = Queue(postgres_server.url("no_such_db", password="s3cret-pw"))
    try:
        with pytest.raises(ConfigError) as refused:
            queue.migrate()
    finally:
        queue.close()
    message = str(refused.value)
    assert message.startswith("queue.url: cannot use the job database postgresql+psycopg://postgres:***@")
    assert "(no such database)" in message and "s3cret-pw" not in message and "\n" not in message


def test_a_schema_from_a_newer_node_is_a_config_error(postgres_url):
    queue = Queue(postgres_url)
    try:
        queue.migrate()
        engine = create_engine(postgres_url)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
        engine.dispose()
        with pytest.raises(ConfigError, match="schema revision 0099, unknown to this dicom-node"):
            queue.migrate()
    finally:
        queue.close()
