"""The C-STORE handler: validate, store, record, answer. It never runs a model.

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

import mmap
import os
import re
import zlib
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.status import Status

from dicom_node.errors import QueueUnavailable
from dicom_node.log import get_logger
from dicom_node.receive.activity import ReceiveActivity
from dicom_node.receive.structure import MalformedDataset, scan_dataset
from dicom_node.store import InstanceStore, validate_uid

log = get_logger("dicom_node.receive")

ACCEPTED_MODALITIES = frozenset({"MG"})
# Modality defined terms (PS3.3 C.7.3.1.1.1) a refusal may name. Any other value is not
# quoted: it is whatever the sender put there, patient data included.
KNOWN_MODALITIES = frozenset("CR CT DX ES IO MG MR NM OT PT PX RF RG SC SM US XA XC".split())
MEGABYTE = 1024 * 1024
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


def log_established(event: evt.Event) -> None:
    log.info("association_accepted", contexts=len(event.assoc.accepted_contexts))


def log_released(event: evt.Event) -> None:
    log.info("association_released")


def log_aborted(event: evt.Event) -> None:
    log.warning("association_aborted")


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


def handle_store(
    event: evt.Event, queue, store: InstanceStore, min_free_bytes: int = 0,
    activity: ReceiveActivity | None = None,
) -> Dataset:
    """EVT_C_STORE: store and record the instance, or say why not. Never raises."""
    response = _store(event, queue, store, min_free_bytes)
    if activity is not None:
        if response.Status == StoreStatus.SUCCESS:
            activity.record_stored()
        else:
            activity.record_refused(response.Status, response.get("ErrorComment", ""))
    return response


def _store(event: evt.Event, queue, store: InstanceStore, min_free_bytes: int) -> Dataset:
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
    except QueueUnavailable as error:
        # The row was not committed (lock wait over, disk full, I/O error): no Success,
        # so the sender keeps the instance and sends it again later (PS3.4 B.2.3, Refused:
        # Out of Resources). The fsynced file may stay: the re-send finds it in place, and
        # store.reconcile records it at the next start if no re-send comes. Deleting it
        # could remove the file of a concurrent duplicate that was acknowledged.
        log.error(
            "instance_store_failed",
            error=str(error),
            status=f"0x{StoreStatus.OUT_OF_RESOURCES:04X}",
            sop_instance_uid=safe_uid(request.AffectedSOPInstanceUID),
        )
        return _status(StoreStatus.OUT_OF_RESOURCES, f"job database {error.kind}; retry later")
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
