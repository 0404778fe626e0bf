"""The node's SCP over TLS (PS3.15 Annex B): real handshakes on loopback.

Senders: pynetdicom with an ssl context, and dcmtk storescu (+tls, OpenSSL): an
independent TLS and DICOM implementation. What must be refused is refused at the
handshake, before any DICOM is read, and nothing is stored.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
import warnings

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    DigitalMammographyXRayImageStorageForPresentation,
    Verification,
)
from pynetdicom.status import Status
from structlog.testing import capture_logs

from tests.integration.dcmtk import storescu
from tests.integration.process import wait_for
from tests.tls.conftest import NODE_AE, client_context

SENDER_AE = "TLS_SCU"


def send(port: int, path, *, tls_args=None) -> tuple[bool, int | None]:
    """(association established?, C-STORE status) for one file over pynetdicom."""
    ae = AE(ae_title=SENDER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(DigitalMammographyXRayImageStorageForPresentation, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, tls_args=tls_args)
    try:
        if not assoc.is_established:
            return False, None
        status = assoc.send_c_store(dcmread(path))
        return True, int(status.Status) if status else None
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def handshake_failures(logs: list[dict]) -> list[dict]:
    return [entry for entry in logs if entry["event"] == "tls_handshake_failed"]


def test_tls_store_with_client_certificate_is_stored(tls_node, pki, mammogram_file):
    node = tls_node()
    with capture_logs() as logs:
        established, status = send(node.port, mammogram_file, tls_args=(client_context(pki), "localhost"))
    assert established
    assert status == Status.SUCCESS
    [stored] = node.stored_files()
    assert dcmread(stored).SOPInstanceUID == dcmread(mammogram_file).SOPInstanceUID
    [established_log] = [e for e in logs if e["event"] == "tls_established"]
    assert established_log["client_certificate"] == "TEST MODALITY"
    assert established_log["version"] in ("TLSv1.2", "TLSv1.3")


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk is not installed")
def test_dcmtk_storescu_with_tls_is_stored(tls_node, pki, mammogram_file):
    node = tls_node()
    tls = ["+tls", pki.client.private_key, pki.client.certificate, "+cf", pki.ca]
    result = storescu([mammogram_file], node.port, NODE_AE, extra_args=[str(a) for a in tls])
    assert result.ok, result.output
    assert len(node.stored_files()) == 1
    # The same storescu without +tls is refused (the SCP speaks TLS only).
    plain = storescu([mammogram_file], node.port, NODE_AE)
    assert not plain.ok


def test_plain_tcp_client_is_refused_and_the_scp_keeps_serving(tls_node, pki, mammogram_file):
    node = tls_node()
    with capture_logs() as logs:
        established, _ = send(node.port, mammogram_file, tls_args=None)
        assert not established
        wait_for(lambda: handshake_failures(logs), 10, description="tls_handshake_failed")
    assert node.stored_files() == []
    assert send(node.port, mammogram_file, tls_args=(client_context(pki), "localhost")) == (True, Status.SUCCESS)


@pytest.mark.parametrize(
    "certificate, stranger, expected_reason",
    [
        (False, False, "peer did not return a certificate"),
        (True, True, "certificate verify failed: unable to get local issuer certificate"),
    ],
    ids=["no-client-certificate", "certificate-from-unknown-ca"],
)
def test_clients_without_a_trusted_certificate_are_refused(
    tls_node, pki, mammogram_file, certificate, stranger, expected_reason
):
    node = tls_node()
    context = client_context(pki, certificate=certificate, stranger=stranger)
    with capture_logs() as logs:
        established, _ = send(node.port, mammogram_file, tls_args=(context, "localhost"))
        assert not established
        [failure] = wait_for(lambda: handshake_failures(logs), 10, description="tls_handshake_failed")
    assert failure["reason"] == expected_reason
    assert node.stored_files() == []


def test_client_certificate_is_optional_when_not_required(tls_node, pki, mammogram_file):
    node = tls_node(require_client_certificate=False)
    context = client_context(pki, certificate=False)
    assert send(node.port, mammogram_file, tls_args=(context, "localhost")) == (True, Status.SUCCESS)


def _handshake(port: int, context: ssl.SSLContext) -> str:
    """A bare TLS handshake; returns the negotiated version or raises ssl.SSLError."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.version()


def _legacy_client(pki) -> ssl.SSLContext:
    """A client that speaks TLS 1.1 only (OpenSSL 3 needs security level 0 for it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 itself is deprecated
        context = client_context(pki)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    return context


def _legacy_server(pki) -> tuple[int, socket.socket]:
    """A bare TLS server that does accept TLS 1.1: proves the legacy client really offers it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1_1
    context.load_cert_chain(pki.server.certificate, pki.server.private_key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        connection, _ = listener.accept()
        try:
            context.wrap_socket(connection, server_side=True).close()
        except OSError:
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], listener


def test_tls_1_1_is_refused(tls_node, pki):
    port, listener = _legacy_server(pki)
    with listener:
        assert _handshake(port, _legacy_client(pki)) == "TLSv1.1"  # the client can speak 1.1
    node = tls_node()
    with capture_logs() as logs:
        with pytest.raises(ssl.SSLError):
            _handshake(node.port, _legacy_client(pki))
        [failure] = wait_for(lambda: handshake_failures(logs), 10, description="tls_handshake_failed")
    assert failure["reason"] == "unsupported protocol"
    assert _handshake(node.port, client_context(pki)) in ("TLSv1.2", "TLSv1.3")


def test_minimum_version_1_3_refuses_tls_1_2(tls_node, pki):
    tls_1_2_only = client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert _handshake(tls_node().port, tls_1_2_only) == "TLSv1.2"  # the default accepts 1.2
    strict = tls_node(minimum_version="1.3")
    with pytest.raises(ssl.SSLError):
        _handshake(strict.port, tls_1_2_only)
    assert _handshake(strict.port, client_context(pki)) == "TLSv1.3"


def test_a_silent_connection_does_not_block_other_clients(tls_node, pki, mammogram_file):
    """The handshake runs in the connection's thread: the accept loop stays free."""
    node = tls_node()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10):  # connects, says nothing
        result = []
        sender = threading.Thread(
            target=lambda: result.append(
                send(node.port, mammogram_file, tls_args=(client_context(pki), "localhost"))
            ),
            daemon=True,
        )
        sender.start()
        sender.join(8)  # well under node.network_timeout_seconds (10): the silent one still waits
        assert result == [(True, Status.SUCCESS)]
