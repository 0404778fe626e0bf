"""C-STORE SCU and C-ECHO to the configured destinations (pynetdicom).

Outcome of a send, and why:

- Success (0x0000) and the C-STORE warnings of PS3.4 B.2.3 (0xB000 coercion of data
  elements, 0xB006 elements discarded, 0xB007 data set does not match SOP class): the
  destination stored the object, so the delivery is done.
- Duplicate SOP Instance (0x0111, PS3.7 C.4.1): the destination already holds this object,
  typically because an earlier attempt succeeded and its response was lost: also done.
- PermanentError, a retry of the same object to the same peer cannot succeed until someone
  changes something: association rejected-permanent (e.g. our AE title not known there, PS3.8
  9.3.4), no presentation context accepted for the object's SOP class, and the statuses
  0xA9xx (data set does not match SOP class), 0x0122 (SOP class not supported), 0x0117
  (invalid object instance) and 0x0124 (not authorised). The error names the destination and
  the status; after fixing the configuration, the delivery can be retried by hand.
- RetryableError, everything else: cannot connect, timeouts, aborts, rejected-transient,
  0xA7xx (out of resources), 0xCxxx (cannot understand: PACSs use it for any internal
  failure, which often passes) and unknown statuses. A PACS that refuses now may accept
  later, and the delivery policy bounds the retries (delivery.max_attempts, backoff).

Messages name the destination and the status by its standard name. They never contain the
peer's Error Comment (free text that could quote patient data).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicom_node.config import DestinationConfig, TLSConfig
from dicom_node.errors import PermanentError, RetryableError
from dicom_node.log import get_logger
from dicom_node.tls import describe_error, scu_tls_args

log = get_logger(__name__)

# PS3.4 Table B.2-1 (Storage Service Class) and PS3.7 C.4.1 (general) status codes.
SUCCESS = 0x0000
WARNING_COERCION_OF_DATA_ELEMENTS = 0xB000
WARNING_ELEMENTS_DISCARDED = 0xB006
WARNING_DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
DUPLICATE_SOP_INSTANCE = 0x0111
INVALID_OBJECT_INSTANCE = 0x0117
REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
REFUSED_NOT_AUTHORISED = 0x0124
REFUSED_OUT_OF_RESOURCES = range(0xA700, 0xA800)
ERROR_DATA_SET_DOES_NOT_MATCH_SOP_CLASS = range(0xA900, 0xAA00)
ERROR_CANNOT_UNDERSTAND = range(0xC000, 0xD000)

STORED_STATUSES = frozenset(
    {
        SUCCESS,
        WARNING_COERCION_OF_DATA_ELEMENTS,
        WARNING_ELEMENTS_DISCARDED,
        WARNING_DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        DUPLICATE_SOP_INSTANCE,
    }
)
PERMANENT_STATUSES = frozenset(
    {INVALID_OBJECT_INSTANCE, REFUSED_SOP_CLASS_NOT_SUPPORTED, REFUSED_NOT_AUTHORISED}
)

# PS3.8 9.3.4 A-ASSOCIATE-RJ Result.
REJECTED_PERMANENT = 0x01


def describe(destination: DestinationConfig) -> str:
    """How messages name a destination: ``pacs (PACS_AE@10.0.0.5:104)``, ``..., TLS)``."""
    tls = ", TLS" if destination.tls else ""
    return f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port}{tls})"


def status_name(code: int) -> str:
    """``0xA700 Refused: Out of Resources``: the code in hex with its standard name."""
    category, name = STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
    return f"0x{code:04X} {name or category}"


def send_file(
    path: Path,
    destination: DestinationConfig,
    *,
    calling_ae_title: str,
    timeout: float = 30,
    tls: TLSConfig | None = None,
) -> None:
    """C-STORE the DICOM file at `path` to `destination` (see `send_files`)."""
    send_files([path], destination, calling_ae_title=calling_ae_title, timeout=timeout, tls=tls)


def send_files(
    paths: Sequence[Path],
    destination: DestinationConfig,
    *,
    calling_ae_title: str,
    timeout: float = 30,
    tls: TLSConfig | None = None,
) -> None:
    """C-STORE the DICOM files at `paths` (one result: a file, or a study's captures) to
    `destination` on one association, one after the other.

    Proposes each file's SOP class with its transfer syntax and, in a presentation context
    of its own, Explicit and Implicit VR Little Endian (PS3.8 9.3.2.2: the peer accepts or
    refuses each context, so it can take the uncompressed one only). A compressed file
    that the peer takes only uncompressed is decompressed before sending: every capture is
    compressed losslessly, so the decoded object is the same instance (same SOP Instance
    UID, same pixels). Returns when the destination has stored them all; raises
    RetryableError or PermanentError (see the module docstring) at the first that fails,
    so that the caller sends them all again (a PACS keeps one copy of an instance sent twice).
    `tls` (security.tls) gives the CAs and client certificate for a destination with
    ``tls = true``.
    """
    if not paths:
        raise PermanentError(f"nothing to send to {describe(destination)}: the result holds no file")
    headers = [(Path(path), _read(Path(path), stop_before_pixels=True)) for path in paths]
    ae = _application_entity(calling_ae_title, timeout)
    by_class: dict[UID, set[UID]] = {}
    for _, header in headers:
        by_class.setdefault(UID(header.SOPClassUID), set()).add(UID(header.file_meta.TransferSyntaxUID))
    for sop_class, syntaxes in by_class.items():
        for syntax in sorted(s for s in syntaxes if s.is_compressed):
            ae.add_requested_context(sop_class, [syntax])
        native = sorted(s for s in syntaxes if not s.is_compressed)
        ae.add_requested_context(
            sop_class, list(dict.fromkeys([*native, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        )
    what = ", ".join(f"{sop_class.name} ({', '.join(sorted(s.name for s in syntaxes))})"
                     for sop_class, syntaxes in by_class.items())
    assoc = _associate(ae, destination, what=what, tls=tls)
    try:
        for path, _ in headers:
            dataset = _read(path)
            _fit_to_accepted(dataset, assoc, destination)
            try:
                status = assoc.send_c_store(dataset)
            except (OSError, RuntimeError) as error:  # RuntimeError: the association died
                raise RetryableError(f"C-STORE to {describe(destination)} failed: {error}") from error
            except (AttributeError, ValueError) as error:  # the data set cannot be encoded as agreed
                raise PermanentError(f"C-STORE to {describe(destination)} failed: {error}") from error
            _check_store_status(status, destination, str(dataset.SOPInstanceUID))
    finally:
        _close(assoc)


def _fit_to_accepted(dataset: Dataset, assoc: Association, destination: DestinationConfig) -> None:
    """Decompress `dataset` when the peer took its SOP class uncompressed only; PermanentError
    when it took the SOP class in no transfer syntax at all."""
    sop_class, syntax = UID(dataset.SOPClassUID), UID(dataset.file_meta.TransferSyntaxUID)
    accepted = {UID(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class}
    if not accepted:
        raise PermanentError(f"{describe(destination)} does not accept {sop_class.name}")
    if syntax.is_compressed and syntax not in accepted:
        try:
            # Lossless: the same instance, so the same SOP Instance UID (pydicom would make a new one).
            dataset.decompress(generate_instance_uid=False)
        except Exception as error:  # no decoder, or data that does not decode: sending again cannot help
            raise PermanentError(f"cannot decompress {dataset.SOPInstanceUID} for {describe(destination)}: "
                                 f"{type(error).__name__}") from error
        log.info("decompressed_for_peer", destination=destination.name, sop_instance_uid=str(dataset.SOPInstanceUID),
                 transfer_syntax=syntax.name)


def echo(
    destination: DestinationConfig,
    *,
    calling_ae_title: str,
    timeout: float = 10,
    tls: TLSConfig | None = None,
) -> str:
    """C-ECHO `destination`; return a one-line result, raise RetryableError on any failure."""
    ae = _application_entity(calling_ae_title, timeout)
    ae.add_requested_context(Verification)
    started = time.monotonic()
    try:
        assoc = _associate(ae, destination, what="Verification", tls=tls)
    except PermanentError as error:
        # `dicom-node echo` reports every failure the same way: the peer is not usable now.
        raise RetryableError(str(error)) from error
    try:
        status = assoc.send_c_echo()
    except RuntimeError as error:  # the association died
        raise RetryableError(f"C-ECHO to {describe(destination)} failed: {error}") from error
    finally:
        _close(assoc)
    code = int(status.get("Status", -1)) if status else -1
    if code != SUCCESS:
        detail = "no response (timeout or abort)" if code < 0 else f"status 0x{code:04X}"
        raise RetryableError(f"C-ECHO to {describe(destination)} failed: {detail}")
    elapsed_ms = (time.monotonic() - started) * 1000
    return f"C-ECHO {describe(destination)} OK in {elapsed_ms:.0f} ms"


def _read(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    try:
        dataset = dcmread(path, stop_before_pixels=stop_before_pixels)
    except (FileNotFoundError, IsADirectoryError, InvalidDicomError) as error:
        raise PermanentError(f"cannot send {path}: {error}") from error
    except OSError as error:  # a disk or NFS hiccup may pass
        raise RetryableError(f"cannot read {path}: {error}") from error
    missing = [
        keyword for keyword in ("SOPClassUID", "SOPInstanceUID") if not dataset.get(keyword)
    ] + [keyword for keyword in ("TransferSyntaxUID",) if not dataset.file_meta.get(keyword)]
    if missing:
        raise PermanentError(f"cannot send {path}: no {', '.join(missing)}")
    return dataset


def _application_entity(calling_ae_title: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = timeout  # TCP connect
    ae.acse_timeout = timeout  # association request/release
    ae.dimse_timeout = timeout  # waiting for the C-STORE / C-ECHO response
    ae.network_timeout = timeout  # silence on an open association
    return ae


def _associate(
    ae: AE, destination: DestinationConfig, *, what: str, tls: TLSConfig | None
) -> Association:
    where = describe(destination)
    connected: list[bool] = []
    rejections: list[A_ASSOCIATE] = []

    def keep_rejection(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            rejections.append(event.pdu.to_primitive())

    tls_args = scu_tls_args(destination, tls)  # ConfigError when a TLS file is unusable
    started = time.monotonic()
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, lambda _event: connected.append(True)),
                # pynetdicom race: when a peer rejects and closes the connection before the
                # requesting thread has checked the socket, the association ends "aborted"
                # and the A-ASSOCIATE-RJ never reaches assoc.acceptor. The DUL still decodes
                # the PDU, so keep it from there (dcmtk `storescp --refuse` shows this).
                (evt.EVT_PDU_RECV, keep_rejection),
            ],
            tls_args=tls_args,
        )
    except OSError as error:  # the host name does not resolve (DNS may come back)
        raise RetryableError(f"cannot reach {where}: {error.strerror or error}") from error
    if assoc.is_established:
        return assoc
    timeout = ae.connection_timeout
    rejection = assoc.acceptor.primitive if assoc.is_rejected else None
    if rejection is None and rejections:
        rejection = rejections[-1]
    if rejection is not None:
        reason = f"{rejection.result_str}, {rejection.source_str}: {rejection.reason_str}"
        if rejection.result == REJECTED_PERMANENT:
            raise PermanentError(f"{where} rejected the association ({reason})")
        raise RetryableError(f"{where} rejected the association ({reason})")
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        raise PermanentError(f"{where} does not accept {what}")
    if tls_args and tls_args[0].tls_errors:
        _raise_tls_error(where, tls_args[0].tls_errors[-1])
    if not connected:
        raise RetryableError(f"cannot connect to {where} (refused or no answer within {timeout:g} s)")
    if time.monotonic() - started < timeout:
        raise RetryableError(f"{where} closed the connection during association negotiation")
    raise RetryableError(f"{where} did not answer the association request within {timeout:g} s")


def _raise_tls_error(where: str, error: BaseException) -> None:
    message = f"TLS handshake with {where} failed: {describe_error(error)}"
    if isinstance(error, ssl.SSLCertVerificationError):
        # Its certificate is not signed by our CAs, expired, or names another host:
        # retrying cannot help until a certificate or security.tls.ca_certificates changes.
        raise PermanentError(message) from error
    raise RetryableError(message) from error


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()


def _check_store_status(status: Dataset, destination: DestinationConfig, sop_instance: str) -> None:
    where = describe(destination)
    if not status or "Status" not in status:
        raise RetryableError(f"no C-STORE response from {where} (timeout or abort)")
    code = int(status.Status)
    if code in STORED_STATUSES:
        if code != SUCCESS:
            log.warning(
                "c_store_warning", destination=destination.name,
                sop_instance_uid=sop_instance, status=status_name(code),
            )
        return
    message = f"{where} did not store {sop_instance}: status {status_name(code)}"
    offending = status.get("OffendingElement")
    if offending:  # tags only, never values
        tags = list(offending) if isinstance(offending, (list, MultiValue)) else [offending]
        message += " (offending elements " + ", ".join(f"{int(t):08X}" for t in tags) + ")"
    if code in ERROR_DATA_SET_DOES_NOT_MATCH_SOP_CLASS or code in PERMANENT_STATUSES:
        raise PermanentError(message)
    raise RetryableError(message)
