"""The node's SCU over TLS: send_file and echo to TLS peers (pynetdicom and dcmtk storescp).

The destination's certificate is verified (CA and host name); a failed handshake is an
error that says "TLS handshake" and why, never a vague "cannot connect".
"""

from __future__ import annotations

import shutil

import pytest
from pydicom import dcmread

from dicom_node.config import DestinationConfig, TLSConfig
from dicom_node.deliver.scu import echo, send_file
from dicom_node.errors import PermanentError, RetryableError
from tests.integration.dcmtk import StoreSCP
from tests.tls.conftest import PEER_AE
from tests.tls.pki import Pki

CALLING_AE = "DICOM_NODE"


def destination(port: int, *, ae_title: str = PEER_AE, tls: bool = True, **extra) -> DestinationConfig:
    return DestinationConfig(name="pacs", ae_title=ae_title, host="127.0.0.1", port=port, tls=tls, **extra)


def node_tls(pki: Pki, *, client_certificate: bool = True, trust: bool = True) -> TLSConfig:
    """The node's [security.tls] as the SCU uses it: CAs to trust, client certificate."""
    values = {"ca_certificates": pki.ca if trust else pki.other_ca}
    if client_certificate:
        values |= {"certificate": pki.client.certificate, "private_key": pki.client.private_key}
    return TLSConfig(**values)


def test_send_file_over_tls_is_stored_by_the_peer(tls_peer, pki, mammogram_file):
    peer = tls_peer(require_client_certificate=True)
    send_file(mammogram_file, destination(peer.port), calling_ae_title=CALLING_AE, tls=node_tls(pki), timeout=10)
    [received] = peer.received
    assert received.SOPInstanceUID == dcmread(mammogram_file).SOPInstanceUID


def test_echo_over_tls(tls_peer, pki):
    peer = tls_peer()
    result = echo(destination(peer.port), calling_ae_title=CALLING_AE, tls=node_tls(pki))
    assert result.startswith("C-ECHO pacs (TLS_PACS@127.0.0.1:") and ", TLS) OK" in result


@pytest.mark.parametrize(
    "dest_kwargs, tls_kwargs, expected",
    [
        ({"tls_server_name": "pacs.example"}, {}, "certificate verify failed: Hostname mismatch"),
        ({}, {"trust": False}, "certificate verify failed: unable to get local issuer certificate"),
    ],
    ids=["host-name-mismatch", "untrusted-ca"],
)
def test_an_unverifiable_peer_certificate_is_a_permanent_error(
    tls_peer, pki, mammogram_file, dest_kwargs, tls_kwargs, expected
):
    peer = tls_peer(require_client_certificate=False)
    with pytest.raises(PermanentError) as error:
        send_file(mammogram_file, destination(peer.port, **dest_kwargs), calling_ae_title=CALLING_AE,
                  tls=node_tls(pki, **tls_kwargs), timeout=10)  # fmt: skip
    assert "TLS handshake with pacs (TLS_PACS@127.0.0.1:" in str(error.value)
    assert expected in str(error.value)
    assert peer.received == []


def test_tls_to_a_plain_tcp_peer_is_a_retryable_tls_error(tls_peer, pki, mammogram_file):
    peer = tls_peer(tls=False)
    with pytest.raises(RetryableError, match="TLS handshake with pacs .* failed"):
        send_file(mammogram_file, destination(peer.port), calling_ae_title=CALLING_AE, tls=node_tls(pki), timeout=10)
    assert peer.received == []


def test_peer_requiring_a_client_certificate_refuses_us_without_one(tls_peer, pki, mammogram_file):
    peer = tls_peer(require_client_certificate=True)
    with pytest.raises(RetryableError) as error:
        send_file(mammogram_file, destination(peer.port), calling_ae_title=CALLING_AE,
                  tls=node_tls(pki, client_certificate=False), timeout=10)  # fmt: skip
    assert "TLS handshake with pacs" in str(error.value)
    assert "certificate required" in str(error.value)
    assert peer.received == []


class TlsStoreSCP(StoreSCP):
    """dcmtk storescp with +tls; ready once the node's own echo over TLS succeeds."""

    def __init__(self, workdir, pki: Pki):
        tls = ["+tls", pki.server.private_key, pki.server.certificate, "+cf", pki.ca]
        super().__init__(workdir, ae_title="TLS_STORESCP", extra_args=tls)
        self.pki = pki

    def _answers_echo(self, _process) -> bool:
        try:
            echo(destination(self.port, ae_title=self.ae_title), calling_ae_title=CALLING_AE,
                 tls=node_tls(self.pki), timeout=5)  # fmt: skip
        except RetryableError:
            return False
        return True


@pytest.mark.skipif(shutil.which("storescp") is None, reason="dcmtk is not installed")
def test_send_file_over_tls_to_dcmtk_storescp(tmp_path, pki, mammogram_file):
    receiver = TlsStoreSCP(tmp_path / "storescp", pki)
    with receiver:
        send_file(mammogram_file, destination(receiver.port, ae_title=receiver.ae_title),
                  calling_ae_title=CALLING_AE, tls=node_tls(pki), timeout=10)  # fmt: skip
        [received] = receiver.wait_for_files(1)
        assert dcmread(received).SOPInstanceUID == dcmread(mammogram_file).SOPInstanceUID
