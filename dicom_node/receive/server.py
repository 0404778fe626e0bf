"""The association server: the AE, its sockets, and pynetdicom adapted to a hostile network.

Everything that bends pynetdicom lives here, each with the reason it exists.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (
    BreastTomosynthesisImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node.config import Config
from dicom_node.errors import ConfigError
from dicom_node.libraries import configure_libraries
from dicom_node.log import get_logger
from dicom_node.receive.access import (
    calling_ae_of,
    check_access_config,
    handle_requested,
)
from dicom_node.receive.activity import ReceiveActivity
from dicom_node.receive.handlers import (
    MEGABYTE,
    handle_store,
    log_aborted,
    log_established,
    log_released,
)
from dicom_node.store import InstanceStore
from dicom_node.tls import scp_context, server_handshake

log = get_logger("dicom_node.receive")

STORAGE_SOP_CLASSES = (
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    BreastTomosynthesisImageStorage,
    # Accepted at negotiation because some mammography systems wrap images as
    # Secondary Capture; only those with Modality MG are stored (see handle_store).
    SecondaryCaptureImageStorage,
)
TRANSFER_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
MAX_PDU_BYTES = MEGABYTE


def discard_unhandled_datasets(association) -> None:
    """Delete the spool files of C-STOREs that were never handed to handle_store.

    pynetdicom spools a data set to a NamedTemporaryFile(delete=False) as it arrives and
    deletes it once the handler has run. A data set cut off by an abort, a dropped
    connection or a release, or complete but still queued when the association ended,
    would stay on disk (patient data) until the next start. Called when the
    association's thread ends, however it ends (pynetdicom fires no event when its DUL
    thread dies on a malformed PDU).
    """
    dimse = association.dimse
    queued = [primitive for _, primitive in list(dimse.msg_queue.queue)]
    spools = [getattr(dimse.message, "_data_set_file", None)]
    spools += [getattr(primitive, "_dataset_file", None) for primitive in queued]
    for spool in filter(None, spools):
        Path(spool.name).unlink(missing_ok=True)



class StoreRequestHandler(RequestHandler):
    """pynetdicom's per-connection handler, with two hooks on the association's threads."""

    def _create_association(self):
        association = super()._create_association()
        run, dul_run = association.run, association.dul.run

        def run_then_discard() -> None:
            try:
                run()
            finally:
                discard_unhandled_datasets(association)

        def dul_run_then_wake() -> None:
            try:
                dul_run()
            except Exception as error:  # noqa: BLE001 - a peer's bytes must not kill the thread loudly
                # pynetdicom decodes a command in its DUL thread and raises on some malformed
                # ones (a command set without Command Field: AttributeError); uncaught, the
                # thread dies with a raw traceback on stderr. The connection ends either way.
                log.warning(
                    "association_protocol_error",
                    error=type(error).__name__,
                    peer=str(association.requestor.address),
                    calling_ae=calling_ae_of(association),
                )
            finally:
                # An acceptor waits up to the ACSE timeout for its A-ASSOCIATE-RQ even when
                # the connection is already gone (garbage, a port scan, a TCP health check),
                # and counts against node.max_associations all that time: wake it up.
                association.dul.to_user_queue.put(None)

        association.run = run_then_discard
        association.dul.run = dul_run_then_wake
        return association


class StoreServer(ThreadedAssociationServer):
    """The association server, with Nagle off on every accepted connection.

    With TLS the handshake runs in the association's thread (pynetdicom would run it
    in the accept loop, where one silent client blocks every other connection).
    """

    def get_request(self):
        client_socket, address = self.socket.accept()
        # DIMSE is request/response: without TCP_NODELAY each small response
        # PDU can wait for the peer's delayed ACK (tens of ms per instance).
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom checks its network timeout only between PDUs and reads a PDU with
        # blocking recv() calls (accepted sockets have no timeout): a peer that stops
        # in the middle of a PDU would hold the association's threads, and its slot
        # under node.max_associations, forever.
        client_socket.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def process_request_thread(self, request, client_address):
        if self.ssl_context and not server_handshake(
            request, timeout=self.ae.network_timeout, peer=str(client_address[0])
        ):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def build_ae(config: Config) -> AE:
    """The application entity with this node's presentation contexts and limits."""
    # Spool C-STORE datasets to a file as they arrive instead of decoding them:
    # constant memory per association and the bytes are stored as sent.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # What pydicom and pynetdicom print (reading validation, pynetdicom's loggers): done
    # at every process start, and here for an SCP started on its own (tests).
    configure_libraries()
    ae = AE(ae_title=config.node.ae_title)
    # PS3.8 D.1: the Maximum Length a peer may send us. pynetdicom holds a whole PDU in
    # memory (several copies) before spooling it: unlimited, a 128 MiB image sent as one
    # PDU raised the SCP's peak memory by 513 MiB, against 4 MiB with 1 MiB PDUs, which
    # were also faster. A tomosynthesis volume in one PDU could exhaust the memory.
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.maximum_associations = config.node.max_associations
    ae.network_timeout = config.node.network_timeout_seconds
    ae.acse_timeout = config.node.network_timeout_seconds
    ae.dimse_timeout = config.node.network_timeout_seconds
    # Called/calling AE checks happen in handle_requested, which logs the reason.
    ae.require_called_aet = False
    ae.require_calling_aet = []
    ae.add_supported_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


def start_scp(config: Config, *, queue, store: InstanceStore) -> StoreServer:
    """Start listening on node.host:node.port in background threads; return the server.

    The caller stops it with ``server.shutdown()``. With node.port = 0 the bound
    port is ``server.server_address[1]``. ``server.activity`` (a ReceiveActivity) counts
    what was stored and refused.
    """
    check_access_config(config, warn=False)  # serve checked (and warned) before its workers started
    ae = build_ae(config)
    activity = ReceiveActivity()
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [config]),
        (evt.EVT_ESTABLISHED, log_established),
        (evt.EVT_RELEASED, log_released),
        (evt.EVT_ABORTED, log_aborted),
        (evt.EVT_C_STORE, handle_store, [queue, store, config.node.min_free_megabytes * MEGABYTE, activity]),
    ]
    # ae.start_server(block=False) without its fixed server class: same steps.
    try:
        server = ae.make_server(
            (config.node.host, config.node.port), evt_handlers=handlers, server_class=StoreServer,
            request_handler=StoreRequestHandler,
            ssl_context=scp_context(config),  # None: plain TCP (PS3.15 Annex B when set)
        )
    except OSError as error:  # port in use, address not on this host, port < 1024 unprivileged
        raise ConfigError(
            f"node.host/node.port: cannot listen on {config.node.host}:{config.node.port} ({error.strerror})"
        ) from None
    threading.Thread(
        target=server.serve_forever, name=f"StoreServer@{config.node.port}", daemon=True
    ).start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes it from there
    server.activity = activity  # read by health and status
    host, port = server.server_address[:2]
    log.info("scp_listening", ae_title=config.node.ae_title, host=host, port=port,
             tls=config.security.tls.enabled)
    return server
