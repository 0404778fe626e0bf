"""Fixtures for the queue tests: a migrated queue on a real SQLite file under tmp_path."""

from __future__ import annotations

import pytest

from dicom_node.queue import Queue


@pytest.fixture
def database_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'queue.sqlite'}"


@pytest.fixture
def queue(database_url):
    queue = Queue(database_url)
    queue.migrate()
    yield queue
    queue.close()
