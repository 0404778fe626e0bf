"""[metrics]: its config, the endpoint off by default (no port opened), the scrape-time gauges
read from a real SQLite queue (the `queue` fixture of tests/ops/conftest.py), and GET /metrics
from a real HTTP server.

The counters of every process of a running node: tests/integration/test_node_metrics.py.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node import metrics
from dicom_node.config import parse_config
from dicom_node.errors import ConfigError
from dicom_node.ops.metrics import METRICS_DIR, prepare_metrics, start_metrics_server
from dicom_node.ops.preflight import check_ports_free
from dicom_node.receive.access import ConnectionTable
from tests.queue.queue_helpers import T0, analyse, new_uid, record

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(autouse=True)
def counted_in_memory():
    """Each test leaves the process counting in memory, as it found it."""
    yield
    metrics.use_directory(None)


def config(tmp_path: Path, **sections):
    return parse_config({"node": {"data_dir": str(tmp_path / "data")}, **sections}, base_dir=tmp_path)


def listening_sockets() -> set[str]:
    """This process's listening TCP sockets (their inodes), read from /proc."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listening = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                    listening.add(fields[9])
    return listening


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# --- config ------------------------------------------------------------------------


def test_metrics_are_off_by_default_on_loopback(tmp_path):
    assert config(tmp_path).metrics.model_dump() == {"enabled": False, "host": "127.0.0.1", "port": 9464}


@pytest.mark.parametrize(("sections", "message"), [
    ({"metrics": {"enabled": True, "port": 70000}}, "metrics.port: Input should be less than or equal to 65535"),
    ({"metrics": {"enabled": "maybe"}}, "metrics.enabled: Input should be a valid boolean, unable to interpret input"),
    ({"metrics": {"path": "/m"}}, "metrics.path: unknown key"),
    ({"metrics": {"enabled": True, "port": 11112}}, "metrics.port: 11112 is also node.port"),
    ({"metrics": {"enabled": True, "port": 8080}, "health": {"enabled": True}}, "metrics.port: 8080 is also health.port"),
])  # fmt: skip
def test_a_bad_metrics_setting_is_a_config_error_naming_the_key(tmp_path, sections, message):
    with pytest.raises(ConfigError) as raised:
        config(tmp_path, **sections)
    assert str(raised.value) == f"config: {message}"


def test_the_same_port_on_other_addresses_is_allowed(tmp_path):
    node_elsewhere = config(tmp_path, node={"data_dir": "d", "host": "10.0.0.5"},
                            metrics={"enabled": True, "port": 11112})  # fmt: skip
    health_off = config(tmp_path, metrics={"enabled": True, "port": 8080})
    assert (node_elsewhere.metrics.port, health_off.metrics.port) == (11112, 8080)


def test_check_config_names_the_metrics_port_in_use(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"^metrics.port: port {port} on 127.0.0.1 is in use by another program$"):
            check_ports_free(config(tmp_path, node={"data_dir": "d", "port": 0},
                                    metrics={"enabled": True, "port": port}))  # fmt: skip


# --- off: nothing listens, nothing is written --------------------------------------


def test_metrics_off_opens_no_port_and_writes_nothing(tmp_path, queue, monkeypatch):
    monkeypatch.setenv(metrics.MULTIPROCESS_ENV, str(tmp_path / "inherited"))
    off = config(tmp_path)
    before = listening_sockets()
    prepare_metrics(off)
    assert start_metrics_server(off, queue=queue, scp=None) is None
    assert listening_sockets() == before
    assert metrics.MULTIPROCESS_ENV not in os.environ  # workers spawned now count in memory
    assert not (tmp_path / "data" / METRICS_DIR).exists()

    on = config(tmp_path, metrics={"enabled": True, "port": 0})  # the check can see a server
    (tmp_path / "data").mkdir(exist_ok=True)
    prepare_metrics(on)
    server = start_metrics_server(on, queue=queue, scp=None)
    try:
        assert len(listening_sockets() - before) == 1
    finally:
        server.stop()


# --- on: what GET /metrics shows -----------------------------------------------------


def test_get_metrics_shows_the_queue_and_this_process_counters(tmp_path, queue):
    node = config(tmp_path, metrics={"enabled": True, "port": 0},
                  destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}])  # fmt: skip
    (tmp_path / "data" / METRICS_DIR).mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / METRICS_DIR / "counter_1.db").write_bytes(b"a previous run's")
    prepare_metrics(node)
    assert list((tmp_path / "data" / METRICS_DIR).glob("counter_1.db")) == []  # wiped at start
    done = new_uid()
    record(queue, done, now=T0)
    analyse(queue, done, now=T0)  # done, one delivery pending
    waiting = new_uid()
    record(queue, waiting, now=T0)
    queue.enqueue_ready_studies(stable_seconds=0, now=T0)
    metrics.get().instances_received.inc(2)
    metrics.get().c_store_refusals.labels(status="CANNOT_UNDERSTAND").inc()

    server = start_metrics_server(node, queue=queue, scp=None)
    try:
        status, content_type, text = scrape(server.port)
        not_found, _, body = scrape(server.port, "/")
    finally:
        server.stop()
    assert status == 200 and content_type.startswith("text/plain; version=")
    found = samples(text)
    assert found[("dicom_node_instances_received_total", ())] == 2
    assert found[("dicom_node_c_store_refusals_total", (("status", "CANNOT_UNDERSTAND"),))] == 1
    assert found[("dicom_node_c_store_refusals_total", (("status", "OUT_OF_RESOURCES"),))] == 0  # shown at 0
    assert found[("dicom_node_delivery_failures_total", (("destination", "pacs"), ("outcome", "failed")))] == 0
    assert found[("dicom_node_queue_jobs", (("state", "done"),))] == 1
    assert found[("dicom_node_queue_jobs", (("state", "pending"),))] == 1
    assert found[("dicom_node_queue_deliveries", (("state", "pending"),))] == 1
    # The pending job was created at T0, long ago.
    age = found[("dicom_node_oldest_pending_job_age_seconds", ())]
    assert age > timedelta(days=30).total_seconds()
    assert not_found == 404 and "try GET /metrics" in body


def test_the_readme_lists_every_metric_served(tmp_path, queue):
    node = config(tmp_path, metrics={"enabled": True, "port": 0},
                  destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}])  # fmt: skip
    (tmp_path / "data").mkdir(exist_ok=True)
    prepare_metrics(node)
    scp = SimpleNamespace(connections=ConnectionTable(max_connections=1, max_per_address=1))
    server = start_metrics_server(node, queue=queue, scp=scp)
    try:
        _, _, text = scrape(server.port)
    finally:
        server.stop()
    served = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(text)
    }
    section = README.read_text().split("\n### Metrics\n", 1)[1].split("\n## ", 1)[0]
    listed = {name for row in section.splitlines() if row.startswith("| `dicom_node_")
              for name in re.findall(r"`(dicom_node_[a-z_]+)", row.split(" | ")[0])}  # fmt: skip
    assert listed == served
