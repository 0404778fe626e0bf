"""The association server: the AE, its sockets, and pynetdicom adapted to a hostile network.

Everything that bends pynetdicom lives here, each with the reason it exists.
"""

from __future__ import annotations

import functools
import socket
import threading

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
    ConnectionTable,
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
from dicom_node.receive.limits import DimseGuard, PduReader, read_pdu_bounded
from dicom_node.receive.proposals import ProposalCache, decode_pdu_with_proposals, remember_negotiations
from dicom_node.receive.reactor import serve_stores_in_dul_thread, wake_association_on_work, wake_on_activity
from dicom_node.receive.responses import answer_stores_directly
from dicom_node.receive.spool import StorageLimits, message_spool, spool_of
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

    A data set is spooled as it arrives (dicom_node.receive.spool) and pynetdicom deletes
    its file once the handler has run. A data set cut off by an abort, a dropped
    connection or a release, or complete but still queued when the association ended,
    would stay on disk (patient data) until the next start. Called when the
    association's thread ends, however it ends (pynetdicom fires no event when its DUL
    thread dies on a malformed PDU).
    """
    dimse = association.dimse
    queued = [primitive for _, primitive in list(dimse.msg_queue.queue)]
    spools = [message_spool(dimse.message)] + [spool_of(primitive) for primitive in queued]
    for spool in filter(None, spools):
        spool.discard()

class SharedContexts(list):
    """The server's presentation contexts, which pynetdicom deep-copies for every association
    it accepts (RequestHandler._create_association): half a millisecond of every association
    setup, for five contexts and their 46 transfer syntaxes. Its negotiation only reads them
    (presentation.negotiate_as_acceptor), so each association gets the same contexts in a
    list of its own."""

    def __deepcopy__(self, memo) -> list:
        return list(self)


class StoreRequestHandler(RequestHandler):
    """pynetdicom's per-connection handler, adapted on the association's threads:

    - the DUL reads PDUs with bounded length and time, and the DIMSE decoder is fed through
      a guard that bounds command sets, in-memory data sets, queued requests and spooled
      data sets (dicom_node.receive.limits);
    - the DUL waits on its socket and its outgoing queue, and the association thread on the
      DUL's messages, instead of polling (dicom_node.receive.reactor);
    - an A-ASSOCIATE-RQ proposing contexts proposed before is decoded and negotiated from
      what came of them then (dicom_node.receive.proposals);
    - C-STORE responses are encoded here (dicom_node.receive.responses);
    - spool files of data sets never handed to the C-STORE handler are deleted;
    - an exception in the DUL thread (a peer's malformed bytes) is logged, not printed.
    """

    def _create_association(self):
        association = super()._create_association()
        server: StoreServer = self.server
        server.connections.attach(self.request, association)
        dul = association.dul
        reader = PduReader(capacity=MAX_PDU_BYTES)
        dul._read_pdu_data = lambda: read_pdu_bounded(
            dul, reader, max_pdata_bytes=MAX_PDU_BYTES, timeout=server.ae.network_timeout
        )
        dul._decode_pdu = functools.partial(decode_pdu_with_proposals, dul, server.proposals)
        association.dimse.receive_primitive = DimseGuard(association, limits=server.limits, store=server.store)
        outgoing = wake_on_activity(dul, unread=lambda: reader.buffered)
        wake_association_on_work(association)
        answer_stores_directly(association)
        run, dul_run = association.run, association.dul.run

        def run_then_discard() -> None:
            try:
                run()
            finally:
                discard_unhandled_datasets(association)
                outgoing.close()  # run() returns once the DUL thread has stopped
                never_requested = association.requestor.primitive is None
                server.connections.remove(
                    self.request, request_timeout=server.ae.acse_timeout if never_requested else None
                )

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
    """The association server: Nagle off, connection limits, association time limit.

    Every accepted connection is admitted by a ConnectionTable (per-address and total
    limits, before anything is known of the peer) or closed at once; a thread closes
    associations older than node.max_association_seconds. With TLS the handshake runs in
    the association's thread (pynetdicom would run it in the accept loop, where one silent
    client blocks every other connection).
    """

    # Set by start_scp once the server is made (pynetdicom's make_server builds it).
    connections: ConnectionTable
    limits: StorageLimits
    proposals: ProposalCache
    store: InstanceStore
    max_association_seconds: float
    WATCH_EVERY_SECONDS = 1.0
    # socketserver's listen() backlog is 5: in a burst of connections (a flood, or many
    # modalities at once) the kernel drops the SYNs beyond it, and each of those peers,
    # the PACS among them, retries after 1 s, then 3 s, 7 s... The kernel caps this value
    # at net.core.somaxconn.
    request_queue_size = 512

    reuse_port = False  # node.reuse_port: ReusePortStoreServer

    def server_bind(self) -> None:
        # Before bind, or the kernel refuses a second listener on the port (EADDRINUSE).
        # Every listener must set it, under the same user: another user cannot hijack the port.
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def verify_request(self, request, client_address) -> bool:
        # socketserver closes the connection when this returns False.
        return self.connections.admit(request, str(client_address[0])) is not None

    def watch_limits(self) -> None:
        """Close what has been open too long, until shutdown(); run in its own thread."""
        self._watching = threading.Event()
        while not self._watching.wait(self.WATCH_EVERY_SECONDS):
            self.connections.expire(max_age_seconds=self.max_association_seconds)

    def shutdown(self) -> None:
        watching = getattr(self, "_watching", None)
        if watching is not None:
            watching.set()
        super().shutdown()

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
        # This thread only starts the association's own threads; the association thread
        # takes the connection out of the table when it ends (StoreRequestHandler).
        started = False
        try:
            if self.ssl_context and not server_handshake(
                request, timeout=self.ae.network_timeout, peer=str(client_address[0])
            ):
                self.shutdown_request(request)
                return
            super().process_request_thread(request, client_address)
            started = True
        finally:
            if not started:
                self.connections.remove(request)


class ReusePortStoreServer(StoreServer):
    """A StoreServer that shares its port with this node's other receivers (node.reuse_port)."""

    reuse_port = True


def build_ae(config: Config) -> AE:
    """The application entity with this node's presentation contexts and limits."""
    # C-STORE data sets go to a file as they arrive, the one the instance becomes
    # (dicom_node.receive.spool: DimseGuard makes it): constant memory per association and
    # the bytes are stored as sent. pynetdicom's own spooling stays off (see there).
    _config.STORE_RECV_CHUNKED_DATASET = False
    # What pydicom and pynetdicom print (reading validation, pynetdicom's loggers): done
    # at every process start, and here for an SCP started on its own (tests).
    configure_libraries()
    ae = AE(ae_title=config.node.ae_title)
    # PS3.8 D.1: the Maximum Length a peer may send us. pynetdicom holds a whole PDU in
    # memory (several copies) before spooling it: unlimited, a 128 MiB image sent as one
    # PDU raised the SCP's peak memory by 513 MiB, against 4 MiB with 1 MiB PDUs, which
    # were also faster. A tomosynthesis volume in one PDU could exhaust the memory.
    ae.maximum_pdu_size = MAX_PDU_BYTES
    # pynetdicom counts every connection, even one that never sent its A-ASSOCIATE-RQ, as an
    # association; ours (handle_requested) count accepted associations only, so pynetdicom's
    # check must never come first. At most node.max_connections connections are open, but a
    # connection closed to make room (ConnectionTable) keeps its threads, which pynetdicom
    # counts, for some milliseconds more: with the limit itself here, the association that
    # made room was refused "local limit exceeded" now and then.
    ae.maximum_associations = 2 * config.node.max_connections
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
    limits = StorageLimits.from_config(config)
    connections = ConnectionTable(
        max_connections=config.node.max_connections,
        max_per_address=config.security.max_connections_per_address,
    )
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [config, connections]),
        (evt.EVT_ESTABLISHED, log_established),
        (evt.EVT_ESTABLISHED, serve_stores_in_dul_thread),
        (evt.EVT_RELEASED, log_released),
        (evt.EVT_ABORTED, log_aborted),
        (evt.EVT_C_STORE, handle_store, [queue, store, limits, activity]),
    ]
    # ae.start_server(block=False) without its fixed server class: same steps.
    try:
        server = ae.make_server(
            (config.node.host, config.node.port), evt_handlers=handlers,
            server_class=ReusePortStoreServer if config.node.reuse_port else StoreServer,
            request_handler=StoreRequestHandler,
            ssl_context=scp_context(config),  # None: plain TCP (PS3.15 Annex B when set)
        )
    except OSError as error:  # port in use, address not on this host, port < 1024 unprivileged
        raise ConfigError(
            f"node.host/node.port: cannot listen on {config.node.host}:{config.node.port} ({error.strerror})"
        ) from None
    server.connections, server.limits, server.store = connections, limits, store
    server.contexts = SharedContexts(server.contexts)
    server.proposals = ProposalCache()
    remember_negotiations()
    server.max_association_seconds = config.node.max_association_seconds
    server.activity = activity  # read by health and status
    threading.Thread(
        target=server.serve_forever, name=f"StoreServer@{config.node.port}", daemon=True
    ).start()
    threading.Thread(target=server.watch_limits, name="StoreServer-limits", daemon=True).start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes it from there
    host, port = server.server_address[:2]
    log.info("scp_listening", ae_title=config.node.ae_title, host=host, port=port,
             tls=config.security.tls.enabled)
    return server
