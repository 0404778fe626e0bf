"""systemd readiness and watchdog: a real `dicom-node serve` talks sd_notify to a socket we hold.

systemd (Type=notify, WatchdogSec=) listens on the datagram socket named by NOTIFY_SOCKET;
this test plays systemd's part with a real AF_UNIX socket.
"""

from __future__ import annotations

import json
import socket

import pytest

from .node_process import NodeProcess, write_config
from .process import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def systemd_messages(tmp_path, monkeypatch):
    """Play systemd: a datagram socket named by NOTIFY_SOCKET; returns a function giving
    every message received so far."""
    notify_path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(notify_path))
    systemd.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    received: list[str] = []

    def messages() -> list[str]:
        try:
            while True:
                received.append(systemd.recv(4096).decode())
        except TimeoutError:
            pass
        return received

    yield messages
    systemd.close()


def boxes_file(tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"label": "TEST DOUBLE", "boxes": []}))
    return boxes


def test_serve_notifies_ready_after_listening_then_watchdog_and_stopping(tmp_path, systemd_messages):
    config = write_config(tmp_path / "node.toml", {
        "node": {"host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "data")},
        "detector": {"architecture": "fixed_boxes", "weights": str(boxes_file(tmp_path))},
    })
    node = NodeProcess(config)
    try:
        node.start()
        wait_for(lambda: {"READY=1", "WATCHDOG=1"} <= set(systemd_messages()), 30,
                 description="READY=1 and WATCHDOG=1")
        # READY=1 only once the SCP listens: the port it logged accepts connections now.
        with socket.create_connection(("127.0.0.1", node.port), timeout=5):
            pass
        assert node.stop() == 0
        assert "STOPPING=1" in systemd_messages()
    finally:
        node.kill()


def test_worker_notifies_ready_once_its_workers_loaded_then_watchdog_and_stopping(
    tmp_path, systemd_messages, postgres_url
):
    config = write_config(tmp_path / "node.toml", {
        "node": {"data_dir": str(tmp_path / "data")},
        "queue": {"url": postgres_url},
        "workers": {"count": 1, "device": "cpu"},
        "detector": {"architecture": "fixed_boxes", "weights": str(boxes_file(tmp_path))},
    })
    worker = NodeProcess(config, "worker")
    try:
        worker.start()
        wait_for(lambda: {"READY=1", "WATCHDOG=1"} <= set(systemd_messages()), 30,
                 description="READY=1 and WATCHDOG=1")
        assert worker.events("worker_ready")  # READY=1 only once the model is loaded
        assert worker.stop() == 0
        assert "STOPPING=1" in systemd_messages()
    finally:
        worker.kill()
