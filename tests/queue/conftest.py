"""Fixtures for the queue tests: a migrated queue on each database the queue runs on.

`database_url` (and so `queue`) is parametrized over a real SQLite file under tmp_path
and a fresh database on a real PostgreSQL server (dicom_node/bench/postgres.py). A test that is
about SQLite itself (its file, pragmas, fault injection) is marked ``sqlite_only`` and
runs on SQLite alone.
"""

from __future__ import annotations

import pytest

from dicom_node.queue import Queue

BACKENDS = ("sqlite", "postgresql")


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only: a queue test about SQLite itself (file, pragmas, faults)")


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        only_sqlite = metafunc.definition.get_closest_marker("sqlite_only") is not None
        metafunc.parametrize("backend", ("sqlite",) if only_sqlite else BACKENDS)


@pytest.fixture
def database_url(request, backend, tmp_path) -> str:
    if backend == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'queue.sqlite'}"


@pytest.fixture
def queue(database_url):
    queue = Queue(database_url)
    queue.migrate()
    yield queue
    queue.close()
