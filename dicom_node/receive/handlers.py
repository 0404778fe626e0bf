"""The C-STORE handler: validate, store, record, answer. It never runs a model.

One C-STORE becomes one durable file and one job-table row before Success is
sent, so that nothing acknowledged is ever lost:

1. the dataset is spooled, as it arrives and without being decoded, to a Part 10
   file under the store's tmp/ (preamble, File Meta with the negotiated transfer
   syntax and the network provenance, the dataset bytes exactly as received: see
   dicom_node.receive.spool);
2. the handler parses only the identifying attributes of that file;
3. ``InstanceStore.persist_instance`` fsyncs it and links it into place;
4. ``Queue.record_instance`` commits the row; then Success is returned (the instance's
   log line and counts follow the answer: dicom_node.receive.responses.after_answer).

Anything else gets a failure status and a log line saying why; nothing
half-written is left behind. Logs carry UIDs and AE titles, never patient data.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
import time
import zlib
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.status import Status

from dicom_node import metrics
from dicom_node.errors import QueueUnavailable
from dicom_node.log import describe_error, get_logger
from dicom_node.receive.activity import ReceiveActivity
from dicom_node.receive.responses import after_answer
from dicom_node.receive.spool import StorageLimits, spool_of
from dicom_node.receive.structure import (
    IMAGE_PIXEL_TAGS,
    MalformedDataset,
    ScannedDataset,
    check_pixel_data,
    scan_dataset,
)
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
WANTED_TAGS = frozenset({*IDENTITY_UIDS, MODALITY_TAG, *IMAGE_PIXEL_TAGS})
# More refused SOP classes than this is a sender proposing all it knows, not what it has.
MAX_SOP_CLASSES_NAMED = 8
INFLATE_CHUNK = MEGABYTE  # a deflated data set is inflated to disk this much at a time


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
    association = event.assoc
    log.info("association_accepted", contexts=len(association.accepted_contexts))
    refused = sorted({str(cx.abstract_syntax) for cx in association.rejected_contexts})
    if not refused:
        return
    if len(refused) <= MAX_SOP_CLASSES_NAMED:
        # A PACS administrator routing CT (or anything not mammography) here sees why
        # nothing arrives: the sender is told "no presentation context" and we say which.
        log.warning(
            "sop_classes_refused", sop_class_uids=refused,
            sop_classes=[_sop_class_name(uid) for uid in refused],
            accepted=len(association.accepted_contexts),
        )
    else:  # a blanket proposal (dcmtk storescu offers every storage class it knows)
        log.info("sop_classes_refused", count=len(refused), accepted=len(association.accepted_contexts))


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else "(unknown SOP class)"


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


def _inflate(spool: Path, offset: int, target: Path, *, limits: StorageLimits, store: InstanceStore) -> None:
    """Inflate a Deflated Explicit VR Little Endian data set (PS3.5 A.5) into `target`.

    Streamed a megabyte at a time, so memory stays flat whatever the ratio (a 0.5 MB
    stream of zeros inflates to 500 MB); bounded like a received data set: by
    node.max_dataset_megabytes and by the free space under data_dir.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = 0
    try:
        with open(spool, "rb") as source, open(target, "wb") as out:
            source.seek(offset)
            pending, read_all = b"", False
            while not inflater.eof:
                if not pending and not read_all:
                    pending = source.read(INFLATE_CHUNK)
                    read_all = not pending
                # With the input all read, zlib may still hold output in its window: asked
                # again with no input, it gives it, up to the end of the stream.
                data = inflater.decompress(pending, INFLATE_CHUNK)
                pending = inflater.unconsumed_tail
                if not data and not pending and read_all:
                    break  # no input left and nothing more comes out: the stream is cut short
                written += len(data)
                if written > limits.max_dataset_bytes:
                    raise InstanceRefused(
                        StoreStatus.OUT_OF_RESOURCES,
                        f"deflated data set inflates to more than node.max_dataset_megabytes "
                        f"({limits.max_dataset_bytes // MEGABYTE} MB)",
                    )
                check_free_space(store, incoming_bytes=len(data), min_free_bytes=limits.keep_free_bytes)
                out.write(data)
    except zlib.error:
        raise InstanceRefused(
            StoreStatus.CANNOT_UNDERSTAND, "dataset cannot be parsed (broken deflate stream)"
        ) from None
    if not inflater.eof:
        raise InstanceRefused(
            StoreStatus.CANNOT_UNDERSTAND, "dataset cannot be parsed (deflate stream ends early)"
        )


def _scan(data, *, start: int, syntax: UID) -> ScannedDataset:
    """The data set's structure checked and its identifying and image values read."""
    scanned = scan_dataset(
        data, start=start, implicit=syntax == ImplicitVRLittleEndian, wanted=WANTED_TAGS
    )
    # PS3.5 A.4: compressed transfer syntaxes encapsulate Pixel Data (undefined length),
    # native ones do not; otherwise the stored file would misstate its own pixels.
    encapsulated = scanned.pixel_data_encapsulated
    if encapsulated is not None and encapsulated != syntax.is_encapsulated:
        state = "encapsulated" if encapsulated else "not encapsulated"
        raise MalformedDataset(f"Pixel Data is {state}, unlike the transfer syntax")
    check_pixel_data(data, scanned, transfer_syntax=str(syntax))
    return scanned


def read_identity(
    path: Path, *, transfer_syntax: str, limits: StorageLimits, store: InstanceStore,
    data_set_offset: int | None = None,
) -> InstanceIdentity:
    """Check the spooled data set's structure and read its identifying attributes.

    Raises InstanceRefused. The data set must be well formed in the negotiated transfer
    syntax (see dicom_node.receive.structure), since it is stored as received, and its
    pixel data must hold the image it declares; no reason quotes a received value, which
    could be patient data. Pixels are never decoded.
    """
    syntax = UID(transfer_syntax)
    # The File Meta, then the data set as received; the spool knows where the header it
    # wrote ends (reading the File Meta back took 0.25 ms of every answer).
    offset = split_dataset(path)[1] if data_set_offset is None else data_set_offset
    try:
        if syntax == DeflatedExplicitVRLittleEndian:
            with store.temp_path(suffix=".inflated") as inflated:
                _inflate(path, offset, inflated, limits=limits, store=store)
                scanned = _scan_file(inflated, start=0, syntax=ExplicitVRLittleEndian)
        else:
            scanned = _scan_file(path, start=offset, syntax=syntax)
    except MalformedDataset as error:
        raise InstanceRefused(
            StoreStatus.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {error}"
        ) from None

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


def _scan_file(path: Path, *, start: int, syntax: UID) -> ScannedDataset:
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            raise MalformedDataset("the data set is empty")
        # Only element headers are read, so only their pages are ever touched.
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _scan(data, start=start, syntax=syntax)


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
    """Refuse the instance if writing `incoming_bytes` would leave less than `min_free_bytes`.

    The statvfs call is cheap enough to make per chunk, so storage resumes as soon as
    space returns.
    """
    free = store.free_bytes()
    if free - incoming_bytes < min_free_bytes:
        raise InstanceRefused(StoreStatus.OUT_OF_RESOURCES, _disk_space_low(free, min_free_bytes))


def _disk_space_low(free: int, min_free_bytes: int) -> str:
    # PS3.4 B.2.3: Refused: Out of Resources; the sender keeps the instance and retries.
    return f"disk space low: {free // MEGABYTE} MB free, node.min_free_megabytes is {min_free_bytes // MEGABYTE}"


def handle_store(
    event: evt.Event, queue, store: InstanceStore, limits: StorageLimits,
    activity: ReceiveActivity | None = None,
) -> int | Dataset:
    """EVT_C_STORE: store and record the instance, or say why not. Never raises.

    Returns the status: Success bare, a refusal as a Dataset with its Error Comment. The
    answer's log line and counts follow it on the wire (after_answer)."""
    started = time.perf_counter()
    response = _store(event, queue, store, limits)
    after_answer(functools.partial(_account, response, seconds=time.perf_counter() - started, activity=activity))
    return response


def _account(response: int | Dataset, *, seconds: float, activity: ReceiveActivity | None) -> None:
    status = response if isinstance(response, int) else response.Status
    count_answer(status, seconds=seconds)
    if activity is not None:
        if status == StoreStatus.SUCCESS:
            activity.record_stored()
        else:
            activity.record_refused(status, response.get("ErrorComment", ""))


def count_answer(status: int, *, seconds: float) -> None:
    """The C-STORE answer in the metrics: received, with the `seconds` storing took, or
    refused under its status's name."""
    if status == StoreStatus.SUCCESS:
        metrics.get().instances_received.inc()
        metrics.get().instance_store.observe(seconds)
    else:
        metrics.get().c_store_refusals.labels(status=StoreStatus(status).name).inc()


def _persist(event: evt.Event, store: InstanceStore, identity: InstanceIdentity) -> Path:
    """The spool file, already the Part 10 file, durable at the instance's final path.

    The spool stays (pynetdicom removes it once the handler returns), so that it can be
    persisted again if its final file is removed before the row is committed.
    """
    return store.persist_instance(
        event.dataset_path,
        study_uid=identity.study_uid,
        series_uid=identity.series_uid,
        sop_instance_uid=identity.sop_instance_uid,
        keep_source=True,
    )


def _store(event: evt.Event, queue, store: InstanceStore, limits: StorageLimits) -> int | Dataset:
    request = event.request
    try:
        spool = spool_of(request)
        # Dropped while it arrived (too large, or the disk filled)?
        if spool is not None and spool.refusal is not None:
            raise InstanceRefused(StoreStatus(spool.refusal.status), spool.refusal.reason)
        transfer_syntax = event.context.transfer_syntax
        identity = read_identity(
            event.dataset_path, transfer_syntax=transfer_syntax, limits=limits, store=store,
            data_set_offset=spool.data_set_offset if spool is not None else None,
        )
        check_identity(
            identity,
            request_sop_class=str(request.AffectedSOPClassUID),
            request_sop_instance=str(request.AffectedSOPInstanceUID),
        )
        # Storing writes no more bytes: the spool is the file (see _persist).
        size = os.path.getsize(event.dataset_path)
        path = _persist(event, store, identity)
        new = queue.record_instance(
            sop_instance_uid=identity.sop_instance_uid,
            sop_class_uid=identity.sop_class_uid,
            study_uid=identity.study_uid,
            series_uid=identity.series_uid,
            path=str(path),
            transfer_syntax=str(transfer_syntax),
            calling_ae=event.assoc.requestor.ae_title,
            size_bytes=size,
        )
        if not path.exists():
            # Retention removed the study (rows and files, in one transaction) after
            # persist_instance found this file there and before our row was committed:
            # the row is ours now, so the file must be again.
            log.warning("instance_rewritten", sop_instance_uid=identity.sop_instance_uid)
            path = _persist(event, store, identity)
        after_answer(functools.partial(
            log.info,
            "instance_stored" if new else "instance_duplicate",
            sop_instance_uid=identity.sop_instance_uid,
            study_uid=identity.study_uid,
            transfer_syntax=str(transfer_syntax),
            bytes=size,
        ))
        return StoreStatus.SUCCESS
    except InstanceRefused as refused:
        log.warning(
            "instance_refused",
            reason=refused.reason,
            status=f"0x{refused.status:04X}",
            sop_instance_uid=safe_uid(request.AffectedSOPInstanceUID),
            sop_class_uid=safe_uid(request.AffectedSOPClassUID),
        )
        return _status(refused.status, refused.reason)
    except QueueUnavailable as error:
        # The row was not committed (lock wait over, disk full, I/O error): no Success,
        # so the sender keeps the instance and sends it again later (PS3.4 B.2.3, Refused:
        # Out of Resources). The fsynced file may stay: the re-send finds it in place, and
        # store.reconcile records it at the next start if no re-send comes. Deleting it
        # could remove the file of a concurrent duplicate that was acknowledged.
        return _failed(request, StoreStatus.OUT_OF_RESOURCES, f"job database {error.kind}; retry later",
                       error=str(error))
    except OSError as error:
        return _failed(request, StoreStatus.OUT_OF_RESOURCES, "cannot write the instance",
                       error=f"{type(error).__name__}: {error.strerror or error}")
    except Exception as error:
        # Received values are read in read_identity only, which reports parse errors by
        # type; whatever else fails is ours: its type and raise site are what helps.
        return _failed(request, StoreStatus.PROCESSING_FAILURE, "internal error while storing",
                       error=describe_error(error))


def _failed(request, status: StoreStatus, comment: str, *, error: str) -> Dataset:
    """A failure status for the sender and an ERROR line for the operator."""
    log.error("instance_store_failed", error=error, status=f"0x{status:04X}",
              sop_instance_uid=safe_uid(request.AffectedSOPInstanceUID))
    return _status(status, comment)
