"""A real `dicom-node serve` with TLS on both sides: dcmtk storescu +tls in, GSPS out over TLS."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from pydicom import dcmread

from tests import synthetic
from tests.integration.dcmtk import storescu
from tests.integration.node_process import NodeProcess, write_config
from tests.integration.process import wait_for
from tests.tls.conftest import NODE_AE, PEER_AE, tls_section

pytestmark = pytest.mark.integration

GSPS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
GSPS_TIMEOUT_SECONDS = 180


def node_config(tmp_path, pki, peer_port: int, **tls_overrides):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes", "boxes": [[0.2, 0.2, 0.5, 0.5, 0.9]]}))
    return write_config(
        tmp_path / "node.toml",
        {
            "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "data")},
            # The node's server certificate (serverAuth and clientAuth) is also its client certificate.
            "security.tls": tls_section(pki, **tls_overrides),
            "study": {"stable_seconds": 1},
            "workers": {"count": 1, "device": "cpu"},
            "detector": {"architecture": "fixed_boxes", "weights": str(boxes)},
            "delivery": {"retry_backoff_seconds": 1, "max_backoff_seconds": 2},
        },
        destinations=[{"name": "tls_pacs", "ae_title": PEER_AE, "host": "127.0.0.1", "port": peer_port, "tls": True}],
    )


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed")
def test_serve_receives_and_delivers_over_tls(tmp_path, pki, tls_peer):
    peer = tls_peer(require_client_certificate=True)
    node = NodeProcess(node_config(tmp_path, pki, peer.port)).start()
    try:
        image = synthetic.write(synthetic.mammogram(), tmp_path / "mg.dcm")
        tls = ["+tls", pki.client.private_key, pki.client.certificate, "+cf", pki.ca]
        result = storescu([image], node.port, NODE_AE, extra_args=[str(a) for a in tls])
        assert result.ok, result.output

        def gsps_received():
            if node.process.poll() is not None or node.events("delivery_failed"):
                raise RuntimeError(f"dicom-node exited or failed to deliver:\n{node.output()}")
            return [ds for ds in peer.received if ds.SOPClassUID == GSPS_SOP_CLASS]

        [gsps] = wait_for(gsps_received, GSPS_TIMEOUT_SECONDS, description="the GSPS at the TLS peer")
        assert gsps.StudyInstanceUID == dcmread(image).StudyInstanceUID
        [established] = node.events("tls_established")
        assert established["client_certificate"] == "TEST MODALITY"
        assert node.events("scp_listening")[0]["tls"] is True
    finally:
        status = node.stop()
        print(node.output())
    assert status == 0


def test_serve_with_a_bad_tls_file_exits_2_naming_the_key(tmp_path, pki):
    config = node_config(tmp_path, pki, 2762, certificate=str(tmp_path / "missing.crt"))
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"config error: security.tls.certificate: {tmp_path / 'missing.crt'} is not a file" in result.stderr
    assert "worker" not in result.stdout + result.stderr  # stopped before any worker started
