"""A real Storage SCP in-process on a free port, with a real store and SQLite queue."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from dicom_node.config import Config, parse_config
from dicom_node.queue import Queue
from dicom_node.receive import start_scp
from dicom_node.store import InstanceStore
from tests.integration.node_process import open_to_any_caller
from tests.receive.helpers import NODE_AE, SYNTAXES, make_encoded


@dataclass
class RunningNode:
    config: Config
    store: InstanceStore
    queue: Queue
    server: object

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def data_dir(self) -> Path:
        return self.config.node.data_dir


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def make_node(tmp_path):
    """Start an SCP with config overrides (``make_node(security={...})``); all stopped after."""
    running: list[RunningNode] = []

    def start(**overrides) -> RunningNode:
        data = {
            "node": {
                "ae_title": NODE_AE,
                "host": "127.0.0.1",
                "port": 0,
                "data_dir": str(tmp_path / f"data{len(running)}"),
            }
        }
        config = parse_config(open_to_any_caller(_merge(data, overrides)), base_dir=tmp_path)
        store = InstanceStore(config.node.data_dir, fsync=config.node.fsync)
        queue = Queue(config.database_url)
        queue.migrate()
        node = RunningNode(config, store, queue, start_scp(config, queue=queue, store=store))
        running.append(node)
        return node

    yield start
    for node in running:
        node.server.shutdown()
        node.queue.close()


@pytest.fixture
def node(make_node) -> RunningNode:
    return make_node()


@pytest.fixture(scope="session")
def encoded_files(tmp_path_factory) -> dict[str, Path]:
    """One small synthetic mammogram per accepted transfer syntax (encoded once per session)."""
    folder = tmp_path_factory.mktemp("encoded")
    return {syntax: make_encoded(folder, syntax, seed=i) for i, syntax in enumerate(SYNTAXES)}


@pytest.fixture
def log_output(capsys):
    """The node's logging set up at DEBUG as JSON lines; returns a reader of what was logged."""
    from dicom_node.log import configure_logging

    saved = structlog.get_config()
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    pynetdicom_level = logging.getLogger("pynetdicom").level
    configure_logging("debug", "json")  # writes to sys.stderr, which capsys captures
    yield lambda: capsys.readouterr().err
    structlog.configure(**saved)
    root.handlers[:], level = saved_root
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)
