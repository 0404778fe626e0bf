"""The Storage SCP: validate, store, record, answer. It never runs a model.

One C-STORE becomes one durable file and one job-table row before Success is
sent, so that nothing acknowledged is ever lost:

1. pynetdicom spools the dataset to a temp file as it arrives
   (``STORE_RECV_CHUNKED_DATASET``), without decoding it;
2. the handler parses only the identifying attributes of that file;
3. it writes a Part 10 file (preamble, File Meta with the negotiated transfer
   syntax, the dataset bytes exactly as received) under the store's tmp/;
4. ``InstanceStore.persist_instance`` fsyncs and renames it into place;
5. ``Queue.record_instance`` commits the row; then Success is returned.

Anything else gets a failure status and a log line saying why; nothing
half-written is left behind. Logs carry UIDs and AE titles, never patient data.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import mmap
import os
import re
import socket
import threading
import zlib
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import pydicom.config
import structlog
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
    BreastTomosynthesisImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.status import Status
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node.config import CallerConfig, Config
from dicom_node.errors import ConfigError
from dicom_node.log import get_logger
from dicom_node.receive.structure import MalformedDataset, scan_dataset
from dicom_node.store import InstanceStore, validate_uid
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
ACCEPTED_MODALITIES = frozenset({"MG"})
# Modality defined terms (PS3.3 C.7.3.1.1.1) a refusal may name. Any other value is not
# quoted: it is whatever the sender put there, patient data included.
KNOWN_MODALITIES = frozenset("CR CT DX ES IO MG MR NM OT PT PX RF RG SC SM US XA XC".split())
MEGABYTE = 1024 * 1024
MAX_PDU_BYTES = MEGABYTE
# The attributes the handler reads (tag -> name); pixel data is never decoded here.
IDENTITY_UIDS = {
    0x00080016: "SOP Class UID",
    0x00080018: "SOP Instance UID",
    0x0020000D: "Study Instance UID",
    0x0020000E: "Series Instance UID",
}
MODALITY_TAG = 0x00080060
# A deflated data set is inflated in memory to be checked; beyond this it is refused.
MAX_INFLATED_BYTES = 512 * MEGABYTE


class StoreStatus(IntEnum):
    """C-STORE response statuses this SCP sends."""

    SUCCESS = Status.SUCCESS
    # PS3.4 B.2.3: Refused: Out of Resources (A7xx); the sender may retry later.
    OUT_OF_RESOURCES = 0xA700
    # PS3.4 B.2.3: Error: Data Set does not match SOP Class (A9xx).
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # PS3.4 B.2.3: Error: Cannot understand (Cxxx).
    CANNOT_UNDERSTAND = 0xC000
    # PS3.7 Annex C general status: Refused: SOP Class not supported (non-MG objects).
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    # PS3.7 Annex C general status: Processing failure (an unexpected error on our side).
    PROCESSING_FAILURE = 0x0110


class AssociateResult(IntEnum):
    """A-ASSOCIATE-RJ Result (PS3.8 9.3.4)."""

    REJECTED_PERMANENT = 0x01
    REJECTED_TRANSIENT = 0x02


class AssociateSource(IntEnum):
    """A-ASSOCIATE-RJ Source (PS3.8 9.3.4)."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_PRESENTATION = 0x03


class AssociateDiagnostic(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. (PS3.8 9.3.4), for the sources above."""

    NO_REASON_GIVEN = 0x01  # source: service user
    CALLING_AE_TITLE_NOT_RECOGNIZED = 0x03  # source: service user
    CALLED_AE_TITLE_NOT_RECOGNIZED = 0x07  # source: service user
    LOCAL_LIMIT_EXCEEDED = 0x02  # source: service provider (presentation)


@dataclass(frozen=True)
class Rejection:
    """Why an association request is refused, and the A-ASSOCIATE-RJ fields saying so."""

    reason: str
    result: AssociateResult
    source: AssociateSource
    diagnostic: AssociateDiagnostic


@dataclass(frozen=True)
class InstanceIdentity:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str


class InstanceRefused(Exception):
    """The received dataset is not stored; ``status`` and ``reason`` go to the sender."""

    def __init__(self, status: StoreStatus, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


_association_ids = itertools.count(1)


# --------------------------------------------------------------------------- access


def _caller_host_matches(allowed: str, peer: str) -> bool:
    """``allowed`` is an IP address, a network (CIDR) or a host name."""
    try:
        peer_ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(peer_ip, ipaddress.IPv6Address) and peer_ip.ipv4_mapped:
        peer_ip = peer_ip.ipv4_mapped
    try:
        return peer_ip in ipaddress.ip_network(allowed, strict=False)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(allowed, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return any(ipaddress.ip_address(info[4][0]) == peer_ip for info in infos)


def _caller_allowed(callers: list[CallerConfig], *, calling_ae: str, peer: str) -> bool:
    if not callers:
        return True
    return any(
        caller.ae_title == calling_ae
        and (caller.host is None or _caller_host_matches(caller.host, peer))
        for caller in callers
    )


def check_association_request(
    config: Config,
    *,
    calling_ae: str,
    called_ae: str,
    peer: str,
    active_total: int,
    active_from_caller: int,
) -> Rejection | None:
    """Decide whether an association request is accepted; ``None`` means yes.

    ``active_total`` and ``active_from_caller`` count the association being
    requested as well.
    """
    security = config.security
    if security.require_called_ae_title and called_ae != config.node.ae_title:
        return Rejection(
            f"called AE title {called_ae!r} is not {config.node.ae_title!r}",
            AssociateResult.REJECTED_PERMANENT,
            AssociateSource.SERVICE_USER,
            AssociateDiagnostic.CALLED_AE_TITLE_NOT_RECOGNIZED,
        )
    if not _caller_allowed(security.allowed_callers, calling_ae=calling_ae, peer=peer):
        return Rejection(
            f"calling AE title {calling_ae!r} from {peer} is not in security.allowed_callers",
            AssociateResult.REJECTED_PERMANENT,
            AssociateSource.SERVICE_USER,
            AssociateDiagnostic.CALLING_AE_TITLE_NOT_RECOGNIZED,
        )
    if active_total > config.node.max_associations:
        return Rejection(
            f"node.max_associations ({config.node.max_associations}) reached",
            AssociateResult.REJECTED_TRANSIENT,
            AssociateSource.SERVICE_PROVIDER_PRESENTATION,
            AssociateDiagnostic.LOCAL_LIMIT_EXCEEDED,
        )
    if active_from_caller > security.max_associations_per_caller:
        return Rejection(
            f"security.max_associations_per_caller ({security.max_associations_per_caller}) "
            f"reached for {calling_ae!r}",
            AssociateResult.REJECTED_TRANSIENT,
            AssociateSource.SERVICE_PROVIDER_PRESENTATION,
            AssociateDiagnostic.LOCAL_LIMIT_EXCEEDED,
        )
    return None


def _calling_ae_of(association) -> str | None:
    primitive = association.requestor.primitive
    return primitive.calling_ae_title if primitive is not None else None


def handle_requested(event: evt.Event, config: Config) -> None:
    """EVT_REQUESTED: access control, before any presentation context is negotiated."""
    association = event.assoc
    request = association.requestor.primitive
    calling_ae = request.calling_ae_title
    peer = association.requestor.address
    # Association threads run handlers in their own context: bind once, log everywhere.
    structlog.contextvars.bind_contextvars(
        assoc_id=f"a{next(_association_ids)}", calling_ae=calling_ae, peer=peer
    )
    try:
        acceptors = [a for a in association.ae.active_associations if a.is_acceptor]
        rejection = check_association_request(
            config,
            calling_ae=calling_ae,
            called_ae=request.called_ae_title,
            peer=peer,
            active_total=len(acceptors),
            active_from_caller=sum(1 for a in acceptors if _calling_ae_of(a) == calling_ae),
        )
    except Exception as error:  # fail closed: pynetdicom would accept after a handler error
        rejection = Rejection(
            f"access check failed ({type(error).__name__}: {error})",
            AssociateResult.REJECTED_TRANSIENT,
            AssociateSource.SERVICE_USER,
            AssociateDiagnostic.NO_REASON_GIVEN,
        )
    if rejection is None:
        return
    log.warning(
        "association_rejected", reason=rejection.reason, called_ae=request.called_ae_title
    )
    association.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
    # As pynetdicom does after its own rejections: wait until the A-ASSOCIATE-RJ
    # is out and the peer has closed the connection, then end the association.
    association.kill()


def _log_established(event: evt.Event) -> None:
    log.info("association_accepted", contexts=len(event.assoc.accepted_contexts))


def _log_released(event: evt.Event) -> None:
    log.info("association_released")


def _log_aborted(event: evt.Event) -> None:
    log.warning("association_aborted")


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


# --------------------------------------------------------------------------- C-STORE


def safe_uid(value) -> str:
    """``value`` if it is a UID, else a placeholder: a hostile "UID" may hold patient data."""
    try:
        return validate_uid(value, name="UID")
    except ValueError:
        return "(not a valid UID)"


def _inflate(data: bytes) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian data set (PS3.5 A.5), bounded in size."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data, MAX_INFLATED_BYTES + 1)
    except zlib.error:
        raise InstanceRefused(
            StoreStatus.CANNOT_UNDERSTAND, "dataset cannot be parsed (broken deflate stream)"
        ) from None
    if len(inflated) > MAX_INFLATED_BYTES:
        raise InstanceRefused(
            StoreStatus.OUT_OF_RESOURCES,
            f"deflated dataset inflates to more than {MAX_INFLATED_BYTES // MEGABYTE} MB",
        )
    if not inflater.eof:
        raise InstanceRefused(
            StoreStatus.CANNOT_UNDERSTAND, "dataset cannot be parsed (deflate stream ends early)"
        )
    return inflated


def read_identity(path: Path, *, transfer_syntax: str) -> InstanceIdentity:
    """Check the spooled data set's structure and read its identifying attributes.

    Raises InstanceRefused. The data set must be well formed in the negotiated transfer
    syntax (see dicom_node.receive.structure), since it is stored as received; no reason
    quotes a received value, which could be patient data.
    """
    syntax = UID(transfer_syntax)
    wanted = frozenset({*IDENTITY_UIDS, MODALITY_TAG})
    _, offset = split_dataset(path)  # pynetdicom's File Meta, then the data set as received
    try:
        with open(path, "rb") as spool:
            with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if syntax == DeflatedExplicitVRLittleEndian:
                    scanned = scan_dataset(_inflate(data[offset:]), implicit=False, wanted=wanted)
                else:
                    implicit = syntax == ImplicitVRLittleEndian
                    scanned = scan_dataset(data, start=offset, implicit=implicit, wanted=wanted)
    except MalformedDataset as error:
        raise InstanceRefused(
            StoreStatus.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {error}"
        ) from None
    # PS3.5 A.4: compressed transfer syntaxes encapsulate Pixel Data (undefined length),
    # native ones do not; otherwise the stored file would misstate its own pixels.
    encapsulated = scanned.pixel_data_encapsulated
    if encapsulated is not None and encapsulated != syntax.is_encapsulated:
        state = "encapsulated" if encapsulated else "not encapsulated"
        raise InstanceRefused(
            StoreStatus.CANNOT_UNDERSTAND, f"Pixel Data is {state}, unlike the transfer syntax"
        )

    def text(tag: int) -> str:
        return scanned.values.get(tag, b"").decode("ascii", "replace").strip("\x00 ")

    uids = {}
    for tag, label in IDENTITY_UIDS.items():
        if not text(tag):
            raise InstanceRefused(StoreStatus.CANNOT_UNDERSTAND, f"{label} is missing")
        try:
            uids[tag] = validate_uid(text(tag), name=label)
        except ValueError:
            raise InstanceRefused(
                StoreStatus.CANNOT_UNDERSTAND, f"{label} is not a valid UID"
            ) from None
    return InstanceIdentity(
        sop_class_uid=uids[0x00080016],
        sop_instance_uid=uids[0x00080018],
        study_uid=uids[0x0020000D],
        series_uid=uids[0x0020000E],
        modality=text(MODALITY_TAG),
    )


def check_identity(
    identity: InstanceIdentity, *, request_sop_class: str, request_sop_instance: str
) -> None:
    """Refuse a dataset that contradicts its C-STORE request or is not a mammogram."""
    # PS3.7 9.1.1.1: Affected SOP Class/Instance UID identify the dataset sent; the
    # File Meta is built from them, so a mismatch would make a self-contradicting file.
    if identity.sop_class_uid != request_sop_class:
        raise InstanceRefused(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOP Class UID differs from the C-STORE request's ({identity.sop_class_uid} vs "
            f"{safe_uid(request_sop_class)})",
        )
    if identity.sop_instance_uid != request_sop_instance:
        raise InstanceRefused(
            StoreStatus.CANNOT_UNDERSTAND,
            f"SOP Instance UID differs from the C-STORE request's ({identity.sop_instance_uid} "
            f"vs {safe_uid(request_sop_instance)})",
        )
    if identity.modality not in ACCEPTED_MODALITIES:
        known = identity.modality in KNOWN_MODALITIES
        modality = identity.modality if known else "(missing or unknown)"
        raise InstanceRefused(
            StoreStatus.SOP_CLASS_NOT_SUPPORTED, f"Modality {modality} is not accepted, only MG"
        )


def write_part10(target: Path, *, spool: Path, calling_ae: str, called_ae: str) -> int:
    """Write the spooled dataset to ``target`` as a Part 10 file; return its size.

    pynetdicom's spool file already holds a preamble and File Meta built from the
    request and the negotiated transfer syntax, followed by the dataset bytes as
    received. The File Meta is rewritten to add the network provenance
    (PS3.10 7.1: Sending/Receiving/Source AE Title); the dataset bytes are copied
    by the kernel, never decoded, so compressed pixel data stays bit-identical.
    """
    file_meta, offset = split_dataset(spool)
    file_meta.SourceApplicationEntityTitle = called_ae
    file_meta.SendingApplicationEntityTitle = calling_ae
    file_meta.ReceivingApplicationEntityTitle = called_ae
    with open(spool, "rb") as source, open(target, "wb") as out:
        out.write(b"\x00" * 128 + b"DICM")  # PS3.10 7.1 preamble and prefix
        write_file_meta_info(out, file_meta, enforce_standard=True)
        out.flush()
        remaining = os.fstat(source.fileno()).st_size - offset
        while remaining > 0:
            sent = os.sendfile(out.fileno(), source.fileno(), offset, remaining)
            if sent == 0:
                raise OSError(f"spool file {spool} ended early")
            offset += sent
            remaining -= sent
        return os.fstat(out.fileno()).st_size


def _status(status: StoreStatus, comment: str | None = None) -> Dataset:
    response = Dataset()
    response.Status = int(status)
    if comment:
        # PS3.7 Annex E: (0000,0902) Error Comment is an LO in the default repertoire:
        # at most 64 characters, no backslash or control characters (it may quote a
        # hostile value sent to us).
        response.ErrorComment = re.sub(r"[^\x20-\x5b\x5d-\x7e]", "?", comment)[:64]
    return response


def check_free_space(store: InstanceStore, *, incoming_bytes: int, min_free_bytes: int) -> None:
    """Refuse the instance if storing it would leave less than ``min_free_bytes`` free.

    Checked before anything is written, so a refusal leaves no partial file; the
    statvfs call is cheap enough to make per C-STORE, so storage resumes as soon as
    space returns.
    """
    free = store.free_bytes()
    if free - incoming_bytes < min_free_bytes:
        # PS3.4 B.2.3: Refused: Out of Resources; the sender keeps the instance and retries.
        raise InstanceRefused(
            StoreStatus.OUT_OF_RESOURCES,
            f"disk space low: {free // MEGABYTE} MB free, node.min_free_megabytes is "
            f"{min_free_bytes // MEGABYTE}",
        )


def handle_store(event: evt.Event, queue, store: InstanceStore, min_free_bytes: int = 0) -> Dataset:
    """EVT_C_STORE: store and record the instance, or say why not. Never raises."""
    request = event.request
    try:
        calling_ae = event.assoc.requestor.ae_title
        called_ae = event.assoc.acceptor.ae_title
        transfer_syntax = event.context.transfer_syntax
        identity = read_identity(event.dataset_path, transfer_syntax=transfer_syntax)
        check_identity(
            identity,
            request_sop_class=str(request.AffectedSOPClassUID),
            request_sop_instance=str(request.AffectedSOPInstanceUID),
        )
        check_free_space(
            store, incoming_bytes=os.path.getsize(event.dataset_path), min_free_bytes=min_free_bytes
        )
        with store.temp_path() as staged:
            size = write_part10(
                staged, spool=event.dataset_path, calling_ae=calling_ae, called_ae=called_ae
            )
            path = store.persist_instance(
                staged,
                study_uid=identity.study_uid,
                series_uid=identity.series_uid,
                sop_instance_uid=identity.sop_instance_uid,
            )
        new = queue.record_instance(
            sop_instance_uid=identity.sop_instance_uid,
            sop_class_uid=identity.sop_class_uid,
            study_uid=identity.study_uid,
            series_uid=identity.series_uid,
            path=str(path),
            transfer_syntax=str(transfer_syntax),
            calling_ae=calling_ae,
            size_bytes=size,
        )
        log.info(
            "instance_stored" if new else "instance_duplicate",
            sop_instance_uid=identity.sop_instance_uid,
            study_uid=identity.study_uid,
            transfer_syntax=str(transfer_syntax),
            bytes=size,
        )
        return _status(StoreStatus.SUCCESS)
    except InstanceRefused as refused:
        log.warning(
            "instance_refused",
            reason=refused.reason,
            status=f"0x{refused.status:04X}",
            sop_instance_uid=safe_uid(request.AffectedSOPInstanceUID),
        )
        return _status(refused.status, refused.reason)
    except OSError as error:
        log.error(
            "instance_store_failed",
            error=f"{type(error).__name__}: {error.strerror or error}",
            sop_instance_uid=safe_uid(request.AffectedSOPInstanceUID),
        )
        return _status(StoreStatus.OUT_OF_RESOURCES, "cannot write the instance")
    except Exception as error:
        # Only identifiers reach this point (the dataset is read in read_identity,
        # which reports parse errors by type only), so the message is safe to log.
        log.error(
            "instance_store_failed",
            error=f"{type(error).__name__}: {str(error)[:500]}",
            sop_instance_uid=safe_uid(request.AffectedSOPInstanceUID),
        )
        return _status(StoreStatus.PROCESSING_FAILURE, "internal error while storing")


# --------------------------------------------------------------------------- server


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
                    calling_ae=_calling_ae_of(association),
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


class _WithoutReceivedValues(logging.Filter):
    """Keeps pynetdicom's log lines free of what peers sent.

    pynetdicom quotes received values ("Non-conformant 'Affected SOP Instance UID' value
    '...'", and a hostile UID may hold a patient's name) and attaches tracebacks whose
    text holds raw PDU bytes. A line is kept up to its first quote, a traceback as its type.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message, quote, _ = record.getMessage().partition("'")
        if quote:
            message = f"{message.rstrip()} (received values not logged)"
        if record.exc_info and record.exc_info[0] is not None:
            message = f"{message} [{record.exc_info[0].__name__}]"
        record.msg, record.args = message, None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def _keep_received_values_out_of_logs() -> None:
    """Filter every pynetdicom logger (a logger's filters do not apply to its children)."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "pynetdicom"]
    for logger in map(logging.getLogger, names):
        if not any(isinstance(f, _WithoutReceivedValues) for f in logger.filters):
            logger.addFilter(_WithoutReceivedValues())


def build_ae(config: Config) -> AE:
    """The application entity with this node's presentation contexts and limits."""
    # Spool C-STORE datasets to a file as they arrive instead of decoding them:
    # constant memory per association and the bytes are stored as sent.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pydicom's reading validation warns (log and stderr) quoting the value, e.g. of a
    # command's "UID" that holds a patient's name; this process validates what it reads
    # itself (dicom_node.receive.structure, validate_uid).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    _keep_received_values_out_of_logs()
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
    port is ``server.server_address[1]``.
    """
    ae = build_ae(config)
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [config]),
        (evt.EVT_ESTABLISHED, _log_established),
        (evt.EVT_RELEASED, _log_released),
        (evt.EVT_ABORTED, _log_aborted),
        (evt.EVT_C_STORE, handle_store, [queue, store, config.node.min_free_megabytes * MEGABYTE]),
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
    host, port = server.server_address[:2]
    log.info("scp_listening", ae_title=config.node.ae_title, host=host, port=port,
             tls=config.security.tls.enabled)
    return server
