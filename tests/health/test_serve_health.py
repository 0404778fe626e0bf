"""A real `dicom-node serve` with [health] enabled: GET /health, `dicom-node status`, run lock."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation
from pynetdicom.status import Status

from tests import synthetic
from tests.integration.node_process import NodeProcess, write_config
from tests.integration.process import wait_for

pytestmark = pytest.mark.integration

NODE_AE = "DICOM_NODE"
JOB_TIMEOUT_SECONDS = 180


def get_health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def send(port: int, path) -> int:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(DigitalMammographyXRayImageStorageForPresentation, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(dcmread(path)).Status)
    finally:
        assoc.release()
        ae.shutdown()


def status_cli(config, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", "status", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def node_config(tmp_path, *, name: str = "node.toml", health_port: int = 0):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes", "boxes": []}))
    return write_config(
        tmp_path / name,
        {
            "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "data")},
            "study": {"stable_seconds": 1},
            "workers": {"count": 1, "device": "cpu"},
            "detector": {"architecture": "fixed_boxes", "weights": str(boxes)},
            "health": {"enabled": True, "host": "127.0.0.1", "port": health_port},
        },
    )


def test_serve_answers_health_and_status_reports_it(tmp_path):
    config = node_config(tmp_path)
    node = NodeProcess(config).start()
    try:
        [listening] = node.events("health_listening")
        health_port = int(listening["port"])
        status, body = get_health(health_port)
        assert status == 200, body
        assert body["status"] == "ok" and body["scp_listening"] is True
        assert body["workers"] == {"alive": 1, "expected": 1}
        assert body["queue_depth"] == 0

        assert send(node.port, synthetic.write(synthetic.mammogram(), tmp_path / "mg.dcm")) == Status.SUCCESS
        wait_for(lambda: get_health(health_port)[1]["jobs"]["done"] == 1, JOB_TIMEOUT_SECONDS,
                 description="the job done, seen through /health")  # fmt: skip

        # `status` runs while the node does: the run lock says it runs, /health adds the rest.
        # The node's health.port is 0 (a free port): status gets the port it took.
        report_config = node_config(tmp_path, name="status.toml", health_port=health_port)
        result = status_cli(report_config, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["node"] | {"state_age_seconds": 0} == {
            "running": True, "pid": node.process.pid, "data_dir": str(tmp_path / "data"), "state_age_seconds": 0,
            "listening": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": node.port}}  # fmt: skip
        assert report["jobs"]["done"] == 1 and report["queue_depth"] == 0
        assert report["health"]["status"] == "ok"
        text = status_cli(report_config).stdout
        assert f"node:        running (pid {node.process.pid})" in text
        assert "SCP listening, workers alive 1/1" in text

        # A second node on the same data_dir refuses to start, before loading anything.
        second = subprocess.run(
            [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2
        assert f"another dicom-node (pid {node.process.pid}) is running" in second.stderr
    finally:
        exit_status = node.stop()
        print(node.output())
    assert exit_status == 0
    after = json.loads(status_cli(config, "--json").stdout)
    assert after["node"]["running"] is False
    assert after["health"]["problems"] == [f"no dicom-node is running on {tmp_path / 'data'}"]
    assert not (tmp_path / "data" / "node-state.json").exists()  # removed at stop
