"""Where a C-STORE data set's bytes go as they arrive: the file that becomes the instance.

`SpoolFile` is made for a C-STORE request as soon as its command is decoded, before any
data set byte (dicom_node.receive.limits.DimseGuard), under the store's tmp/ (so on the
instances' filesystem, which the disk checks watch; what a crash leaves there is removed by
store.reconcile at the next start). pynetdicom writes the data set's fragments to it, as it
would to its own spool (``STORE_RECV_CHUNKED_DATASET``, which the node leaves off: that one
is a NamedTemporaryFile in tempfile's process-wide folder, started with a File Meta that
pydicom takes 0.2 ms to write and that is not the one we keep).

- It starts the file with the Part 10 header the stored instance keeps (preamble, File
  Meta with the negotiated transfer syntax and the network provenance, PS3.10 7.1), so
  the complete spool file is the instance file: the handler fsyncs it and links it into
  place, with no copy;
- it writes only within the limits: past node.max_dataset_megabytes, or when free disk
  space would fall under node.min_free_megabytes, the file is closed and deleted and the
  rest of the data set dropped; the handler then answers Out of Resources
  (`SpoolFile.refusal`, found through `spool_of`);
- with fsync on, it starts the writeback of what it wrote every 128 KiB, and of the rest
  when the data set is complete (`close`), so that the fsync before the answer has little
  left to write.

`streaming_spool` says when a data fragment may go from the socket straight into the
spool (dicom_node.receive.limits.read_pdu_bounded), skipping pynetdicom's per-PDU work.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from dataclasses import dataclass

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_node.files import start_writeback
from dicom_node.log import get_logger

log = get_logger("dicom_node.receive")

KIB = 1024
MEGABYTE = 1024 * KIB
# PS3.4 B.2.3: Refused: Out of Resources. The sender keeps the instance and may retry.
OUT_OF_RESOURCES = 0xA700
# Free space is read (statvfs) once per this many bytes written, and each reading must leave
# room for them above the watermark: a data set never writes under it unchecked.
SPACE_CHECK_BYTES = MEGABYTE
# With fsync on, the writeback of the bytes written is started every this many bytes (in
# practice at every write of a streamed megabyte, and of each 128 KiB PDU): the fsync before
# the answer waits for at most the last of them. Its median over 64 full-size mammograms,
# over loopback onto this project's test disks: 4 MiB 1.4-2.3 ms; 1 MiB 0.62-1.07 ms;
# 128 KiB 0.49 ms, with no slower transfer.
WRITEBACK_BYTES = 128 * KIB
PREAMBLE = b"\x00" * 128 + b"DICM"  # PS3.10 7.1


@dataclass(frozen=True)
class StorageLimits:
    """What one received data set may take: its size, and the disk space under data_dir."""

    max_dataset_bytes: int  # node.max_dataset_megabytes
    keep_free_bytes: int  # node.min_free_megabytes: the reserve the job table and results live on

    @classmethod
    def from_config(cls, config) -> StorageLimits:
        return cls(config.node.max_dataset_megabytes * MEGABYTE, config.node.min_free_megabytes * MEGABYTE)


@dataclass(frozen=True)
class SpoolRefusal:
    """Why the data set was not kept; the handler answers it (our own words only)."""

    status: int
    reason: str


def part10_header(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, calling_ae: str, called_ae: str
) -> bytes:
    """Preamble and File Meta of a received instance (PS3.10 7.1), as pynetdicom writes
    them (its implementation UID and version) plus the network provenance: Source and
    Receiving AE Title are ours, Sending AE Title the caller's.

    Encoded here, in Explicit VR Little Endian (PS3.10 7.1), because pydicom takes a
    millisecond to write these nine elements, on every instance. Values are the request's
    as sent (undecodable characters replaced): the handler refuses a data set whose own,
    validated UIDs differ from them, so a stored file never contradicts its File Meta.
    """
    elements = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),  # File Meta Information Version
        _element(0x0002, b"UI", uid_value(sop_class_uid)),
        _element(0x0003, b"UI", uid_value(sop_instance_uid)),
        _element(0x0010, b"UI", uid_value(transfer_syntax)),
        _element(0x0012, b"UI", uid_value(PYNETDICOM_IMPLEMENTATION_UID)),
        _element(0x0013, b"SH", text_value(PYNETDICOM_IMPLEMENTATION_VERSION)),
        _element(0x0016, b"AE", text_value(called_ae)),  # Source Application Entity Title
        _element(0x0017, b"AE", text_value(calling_ae)),  # Sending Application Entity Title
        _element(0x0018, b"AE", text_value(called_ae)),  # Receiving Application Entity Title
    ))
    return PREAMBLE + _element(0x0000, b"UL", struct.pack("<L", len(elements))) + elements


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """A group 0002 data element, Explicit VR Little Endian (PS3.5 7.1.2)."""
    if vr == b"OB":  # 2 reserved bytes, then a 32-bit length
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def uid_value(value: str) -> bytes:
    """A UI value as encoded (also in command sets: dicom_node.receive.responses)."""
    data = str(value).encode("ascii", "replace")
    return data + b"\x00" * (len(data) % 2)  # PS3.5 9.1: a UI value is padded with NUL


def text_value(value: str) -> bytes:
    """A text value (AE, SH, LO) as encoded, in ASCII."""
    data = str(value).encode("ascii", "replace")
    return data + b" " * (len(data) % 2)  # PS3.5 6.2: text values are padded with a space


class SpoolFile:
    """A C-STORE data set's file under the store's tmp/, started with our Part 10 header and
    written within limits.

    pynetdicom calls ``write(fragment)``, ``file.flush()``, ``close()`` and reads ``name``;
    `read_pdu_bounded` calls ``write`` too. Writes go straight to the file descriptor (a
    fragment is far larger than any buffer). Past the limits the file is closed and
    deleted, and every later fragment is dropped; ``refusal`` says why.
    """

    def __init__(self, limits: StorageLimits, store, *, header: bytes):
        self._limits = limits
        self._store = store  # dicom_node.store.InstanceStore
        self.refusal: SpoolRefusal | None = None
        self.size = 0
        self._next_space_check = 0
        self._written_back = 0
        self.data_set_offset = len(header)  # where the data set as received starts
        self._file: io.FileIO | None = None  # closes the descriptor if the object is dropped unclosed
        try:
            self._fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=store.tmp_dir)  # 0600
        except OSError as error:  # tmp/ gone or not writable, no inode left
            # "" and not None: pynetdicom unlinks the name after the handler, catching OSError.
            self._fd, self.name = None, ""
            self._refuse(f"cannot create the spool file ({error.strerror or type(error).__name__})")
            return
        self._file = io.FileIO(self._fd, "wb", closefd=True)
        self.write(header)

    @property
    def file(self) -> SpoolFile:
        return self

    def write(self, data) -> None:
        """Append ``data`` (bytes or a memoryview), or drop it if the limits are passed."""
        self.write_pieces((data,), len(data))

    def write_pieces(self, pieces, count: int) -> None:
        """Append ``pieces`` (buffers, `count` bytes in all, at most IOV_MAX of them) with
        one system call where the kernel takes them all, or drop them past the limits."""
        if not self._admit(count):
            return
        try:
            written = os.writev(self._fd, pieces)
            if written < count:  # a short write (a signal, or the disk filling): the rest
                for piece in pieces:
                    if written >= len(piece):
                        written -= len(piece)
                        continue
                    view, written = memoryview(piece)[written:], 0
                    while view:
                        view = view[os.write(self._fd, view):]
        except OSError as error:  # the disk filled between two checks, or failed
            self._refuse(f"cannot write the data set ({error.strerror or type(error).__name__})")
            return
        if self._store.fsync and self.size - self._written_back >= WRITEBACK_BYTES:
            start_writeback(self._fd, self._written_back, self.size - self._written_back)
            self._written_back = self.size

    def _admit(self, count: int) -> bool:
        """Whether `count` more bytes stay within the limits; refuses the data set if not.
        Nothing more is written once the file is closed (a hang-up closes it)."""
        if self.refusal is not None or self._fd is None:
            return False
        self.size += count
        limits = self._limits
        if self.size > limits.max_dataset_bytes:
            self._refuse(
                f"data set larger than node.max_dataset_megabytes ({limits.max_dataset_bytes // MEGABYTE} MB)"
            )
            return False
        if self.size >= self._next_space_check:
            free = self._store.free_bytes()
            if free - count - SPACE_CHECK_BYTES < limits.keep_free_bytes:
                self._refuse(
                    f"disk space low: {free // MEGABYTE} MB free, node.min_free_megabytes is "
                    f"{limits.keep_free_bytes // MEGABYTE}"
                )
                return False
            self._next_space_check = self.size + SPACE_CHECK_BYTES
        return True

    def flush(self) -> None:
        """Nothing to do: every write went to the file descriptor."""

    def close(self) -> None:
        """Close the file (once; pynetdicom and the cleanup of an ended association may both).

        With fsync on, the writeback of the bytes written since the last one started (fewer
        than 128 KiB, the end of the data set) starts now: the disk writes them while the
        handler checks the data set, before its fsync. In runs of 64 full-size mammograms
        each way (8 per association, alternating), the median fsync of the file took 0.54,
        0.85 and 1.25 ms with it, against 1.05, 0.97 and 2.71 ms without (the last while the
        disk was slow: the fsyncs after it then waited for the disk instead).
        """
        unstarted = self.size - self._written_back
        if self._fd is not None and self._store.fsync and unstarted:
            start_writeback(self._fd, self._written_back, unstarted)
            self._written_back = self.size
        self._close_file()

    def discard(self) -> None:
        """Close and remove the file: its data set will not be kept (refused, cut off, never
        handled). A file already gone, or never made, is no error."""
        self._close_file()
        try:
            os.unlink(self.name)
        except OSError:
            pass

    def _close_file(self) -> None:
        self._fd = None
        if self._file is not None:
            self._file.close()

    def _refuse(self, reason: str) -> None:
        self.refusal = SpoolRefusal(OUT_OF_RESOURCES, reason)
        self.discard()
        log.warning("data_set_discarded", reason=reason, received_bytes=self.size)


def spool_of(request) -> SpoolFile | None:
    """The SpoolFile a C-STORE request primitive's data set was spooled into, if any."""
    spool = getattr(request, "_dataset_file", None)
    return spool if isinstance(spool, SpoolFile) else None


def message_spool(message) -> SpoolFile | None:
    """The SpoolFile the data set of a DIMSE message still being decoded (pynetdicom's
    `dimse.message`, None between messages) is written into, if any: the primitive that
    message becomes carries it on as `spool_of` finds it."""
    spool = getattr(message, "_data_set_file", None)
    return spool if isinstance(spool, SpoolFile) else None


def streaming_spool(dul) -> SpoolFile | None:
    """The spool of the C-STORE data set now arriving, if a data fragment read from the
    socket may be written to it at once, bypassing pynetdicom's PDU events.

    Only while the association is established (Sta6) and every PDU read before has been
    handled (no event and no PDU waiting in the DUL's queues): the fragment's bytes then
    land after all earlier ones, in order. Runs in the association's DUL thread, the only
    reader of the socket and the only consumer of those queues.
    """
    if dul.state_machine.current_state != "Sta6" or not dul.event_queue.empty() or not dul._recv_pdu.empty():
        return None
    return message_spool(dul.assoc.dimse.message)
