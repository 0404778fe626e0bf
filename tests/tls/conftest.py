"""TLS test fixtures: throwaway certificates, the node's SCP with TLS, a TLS Storage SCP peer."""

from __future__ import annotations

import shutil
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    DigitalMammographyXRayImageStorageForPresentation,
    GrayscaleSoftcopyPresentationStateStorage,
    Verification,
)
from pynetdicom.status import Status

from dicom_node.config import Config, parse_config
from dicom_node.queue import Queue
from dicom_node.receive import start_scp
from dicom_node.store import InstanceStore
from tests import synthetic
from tests.tls.pki import Pki, make_pki

NODE_AE = "DICOM_NODE"
PEER_AE = "TLS_PACS"


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line tool is not installed")
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_section(pki: Pki, **overrides) -> dict:
    """[security.tls] for the node: server certificate, test CA, client certificates required."""
    return {
        "enabled": True,
        "certificate": str(pki.server.certificate),
        "private_key": str(pki.server.private_key),
        "ca_certificates": str(pki.ca),
        "require_client_certificate": True,
        **overrides,
    }


@dataclass
class TlsNode:
    config: Config
    queue: Queue
    server: object

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stored_files(self) -> list[Path]:
        return sorted((self.config.node.data_dir / "instances").rglob("*.dcm"))


@pytest.fixture
def tls_node(tmp_path, pki):
    """Start the node's SCP in-process with TLS (``tls_node(require_client_certificate=False)``)."""
    running: list[TlsNode] = []

    def start(**tls_overrides) -> TlsNode:
        data = {
            "node": {
                "ae_title": NODE_AE, "host": "127.0.0.1", "port": 0,
                "data_dir": str(tmp_path / f"node{len(running)}"),
                "network_timeout_seconds": 10,
            },
            "security": {"allow_any_caller": True, "tls": tls_section(pki, **tls_overrides)},
        }  # fmt: skip
        config = parse_config(data, base_dir=tmp_path)
        store = InstanceStore(config.node.data_dir, fsync=False)
        queue = Queue(config.database_url)
        queue.migrate()
        node = TlsNode(config, queue, start_scp(config, queue=queue, store=store))
        running.append(node)
        return node

    yield start
    for node in running:
        node.server.shutdown()
        node.queue.close()


def client_context(
    pki: Pki,
    *,
    certificate: bool = True,
    stranger: bool = False,
    maximum_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context trusting the test CA, presenting the client (or stranger) certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if certificate:
        pair = pki.stranger if stranger else pki.client
        context.load_cert_chain(pair.certificate, pair.private_key)
    if maximum_version is not None:
        context.maximum_version = maximum_version
    return context


@pytest.fixture
def mammogram_file(tmp_path) -> Path:
    return synthetic.write(synthetic.mammogram(rows=64, columns=48), tmp_path / "mg.dcm")


@dataclass
class PeerScp:
    """A pynetdicom Storage SCP with TLS: the destination in the SCU tests."""

    port: int
    received: list[Dataset] = field(default_factory=list)


@pytest.fixture
def tls_peer(pki):
    """Start a TLS Storage SCP (``tls_peer(require_client_certificate=True)``); stopped after."""
    servers = []

    def start(*, require_client_certificate: bool = True, tls: bool = True) -> PeerScp:
        ae = AE(ae_title=PEER_AE)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_supported_context(Verification)
        for sop_class in (DigitalMammographyXRayImageStorageForPresentation, GrayscaleSoftcopyPresentationStateStorage):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        context = None
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(pki.server.certificate, pki.server.private_key)
            if require_client_certificate:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(cafile=str(pki.ca))
        peer = PeerScp(port=0)

        def on_store(event):
            peer.received.append(event.dataset)
            return Status.SUCCESS

        server = ae.start_server(
            ("127.0.0.1", 0), block=False, ssl_context=context,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )  # fmt: skip
        servers.append(server)
        peer.port = server.server_address[1]
        return peer

    yield start
    for server in servers:
        server.shutdown()
