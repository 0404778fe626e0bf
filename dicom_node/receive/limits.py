"""Bounds on what a peer can make the SCP hold, checked as bytes arrive: pynetdicom adapted.

pynetdicom trusts its peer. It reads a PDU by allocating whatever length the header
claims (an A-ASSOCIATE-RQ claiming 400 MiB grew the node by 800 MiB), keeps command
fragments in memory until the last one comes (256 MiB of them grew it by 258 MiB), spools
a C-STORE data set of any size to disk, and gives each recv() a fresh timeout, so a PDU
dripping in byte by byte never times out. Here, per association:

- `read_pdu_bounded` replaces the DUL's PDU reader: the length is checked against the PDU
  type as the 6-byte header arrives (PS3.8 9.3.1), before anything is allocated: a
  P-DATA-TF over the maximum length we announced (PS3.8 D.1), any other PDU over
  MAX_CONTROL_PDU_BYTES. The whole PDU must arrive within the network timeout.
- `DimseGuard` sits between the DUL and pynetdicom's DIMSE decoder, one PDV at a time: a
  command set over MAX_COMMAND_SET_BYTES, data set bytes before their command (PS3.7 E.2
  forbids it), a data set kept in memory (any message but a C-STORE) over
  MAX_COMMAND_SET_BYTES, or more than MAX_QUEUED_MESSAGES requests waiting for answers
  (we negotiate no asynchronous operations: PS3.7 D.3.3.3) end the association.
- `SpoolFile` wraps the file pynetdicom spools a C-STORE data set into: it stops writing
  once the data set passes node.max_dataset_megabytes or free disk space would fall under
  node.min_free_megabytes, deletes what was written, and discards the rest of the data
  set; the C-STORE handler then answers Out of Resources (`spool_refusal`).

Every hang-up is an A-ABORT (PS3.8 9.3.8, source: service provider) followed by closing
the connection, and one log line naming the peer. No log line quotes received bytes.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from pynetdicom.pdu_primitives import P_DATA

from dicom_node import metrics
from dicom_node.log import get_logger

log = get_logger("dicom_node.receive")

KIB = 1024
MEGABYTE = 1024 * KIB
# PS3.4 B.2.3: Refused: Out of Resources. The sender keeps the instance and may retry.
OUT_OF_RESOURCES = 0xA700
# PS3.8 9.3.2: an A-ASSOCIATE-RQ holds the application context, presentation contexts and
# user information; ours accept 4 abstract syntaxes, a real one is a few kB. Release and
# abort PDUs are 10 bytes. Anything longer is not a request we could accept.
MAX_CONTROL_PDU_BYTES = 64 * KIB
# PS3.7 E.1: a command set is a few dozen elements, well under 1 kB in practice.
MAX_COMMAND_SET_BYTES = 64 * KIB
# Requests decoded but not yet answered. With no asynchronous operations window
# negotiated a peer has one outstanding request at a time (PS3.7 D.3.3.3); a few more
# leave room for a C-CANCEL or a sloppy peer.
MAX_QUEUED_MESSAGES = 4

# PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
# A-ABORT PDU (PS3.8 9.3.8): source 2, DICOM UL service-provider; reason 0, not specified.
A_ABORT_PROVIDER = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x00)
PDV_CONTROL_COMMAND = 0x01  # PS3.8 E.2: bit 0 set: command information; bit 1: last fragment


def peer_of(association) -> str:
    return str(association.requestor.address)


def hang_up(dul, event: str, **fields) -> None:
    """Send an A-ABORT, close the connection and log `event` with the peer.

    Runs in the association's DUL thread: closing its AssociationSocket queues the
    "transport closed" event (Evt17), on which pynetdicom ends the association as aborted.
    """
    association = dul.assoc
    log.warning(event, peer=peer_of(association), calling_ae=_calling_ae(association), **fields)
    if dul.socket is not None and dul.socket.socket is not None:
        dul.socket.send(A_ABORT_PROVIDER)
        dul.socket.close()


def _calling_ae(association) -> str | None:
    primitive = association.requestor.primitive
    return primitive.calling_ae_title if primitive is not None else None


# --------------------------------------------------------------------------- PDUs


def _recv_exactly(sock: socket.socket, count: int, deadline: float) -> bytes | None:
    """`count` bytes, or None if the peer closed the connection or `deadline` passed."""
    chunks, received = [], 0
    while received < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(count - received, 256 * KIB))
        except (OSError, TimeoutError):
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def read_pdu_bounded(dul, *, max_pdata_bytes: int, timeout: float) -> None:
    """Replacement for ``DULServiceProvider._read_pdu_data``, with bounded length and time.

    Same events as pynetdicom's reader (Evt17 closed, Evt19 unknown PDU, or the PDU's own
    event), plus a hang-up for a PDU too long for its type or too slow to arrive.
    """
    association_socket = dul.socket
    sock = association_socket.socket
    deadline = time.monotonic() + timeout
    try:
        header = _recv_exactly(sock, 6, deadline)
        if header is None:
            dul.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in KNOWN_PDU_TYPES:
            log.warning("pdu_unknown", peer=peer_of(dul.assoc), pdu_type=pdu_type)
            dul.event_queue.put("Evt19")
            return
        limit = max_pdata_bytes if pdu_type == P_DATA_TF else MAX_CONTROL_PDU_BYTES
        if length > limit:
            hang_up(dul, "pdu_too_long", pdu_type=pdu_type, length=length, limit=limit)
            return
        body = _recv_exactly(sock, length, deadline)
        if body is None:
            if time.monotonic() >= deadline:
                hang_up(dul, "pdu_too_slow", pdu_type=pdu_type, length=length, timeout_seconds=timeout)
            else:
                dul.event_queue.put("Evt17")
            return
    finally:
        if association_socket.socket is not None:
            sock.settimeout(timeout)
    try:
        pdu, event = dul._decode_pdu(bytearray(header + body))
    except Exception as error:  # noqa: BLE001 - a peer's bytes: any decoding error is theirs
        log.warning("pdu_undecodable", peer=peer_of(dul.assoc), pdu_type=pdu_type, error=type(error).__name__)
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


# --------------------------------------------------------------------------- DIMSE


class DimseGuard:
    """Feeds pynetdicom's DIMSE decoder one PDV at a time, hanging up on what is unbounded.

    Installed as ``association.dimse.receive_primitive``; runs in the DUL thread.
    """

    def __init__(self, association, *, limits: StorageLimits, store):
        self.association = association
        self.dimse = association.dimse
        self.receive = self.dimse.receive_primitive  # pynetdicom's own
        self.limits = limits
        self.store = store

    def __call__(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            if not self._admit(data):
                return
            single = P_DATA()
            single.presentation_data_value_list = [[context_id, data]]  # pynetdicom wants lists
            self.receive(single)
            self._wrap_new_spool()
            if self.dimse.msg_queue.qsize() > MAX_QUEUED_MESSAGES:
                self._hang_up("dimse_too_many_requests", queued=self.dimse.msg_queue.qsize(),
                              limit=MAX_QUEUED_MESSAGES)
                return

    def _admit(self, data: bytes) -> bool:
        message = self.dimse.message
        fragment = len(data) - 1
        if data[0] & PDV_CONTROL_COMMAND:
            held = message.encoded_command_set.tell() if message is not None else 0
            if held + fragment > MAX_COMMAND_SET_BYTES:
                self._hang_up("dimse_command_too_long", limit=MAX_COMMAND_SET_BYTES)
                return False
            return True
        if message is None or not message.command_set:  # no command decoded yet (an empty Dataset)
            # PS3.7 E.2 / PS3.8 E.2: a message's data set follows its complete command set.
            self._hang_up("dimse_data_before_command")
            return False
        if getattr(message, "_data_set_file", None) is None:  # kept in memory by pynetdicom
            if message.data_set.tell() + fragment > MAX_COMMAND_SET_BYTES:
                self._hang_up("dimse_data_set_too_long", limit=MAX_COMMAND_SET_BYTES)
                return False
        metrics.get().received_bytes.inc(fragment)
        return True

    def _wrap_new_spool(self) -> None:
        message = self.dimse.message
        spool = getattr(message, "_data_set_file", None) if message is not None else None
        if spool is not None and not isinstance(spool, SpoolFile):
            message._data_set_file = SpoolFile(spool, self.limits, self.store)

    def _hang_up(self, event: str, **fields) -> None:
        message = self.dimse.message
        spool = getattr(message, "_data_set_file", None) if message is not None else None
        if spool is not None:
            spool.close()
            _unlink(spool.name)
        hang_up(self.association.dul, event, **fields)


def _unlink(name: str) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


# --------------------------------------------------------------------------- spooling


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


class SpoolFile:
    """pynetdicom's spool file (a NamedTemporaryFile), written only within the limits.

    pynetdicom calls ``write(fragment)``, ``file.flush()``, ``close()`` and reads ``name``.
    Past the limits the file is closed and deleted, and every later fragment is
    dropped; ``refusal`` says why.
    """

    def __init__(self, spool, limits: StorageLimits, store):
        self._spool = spool
        self._limits = limits
        self._store = store  # dicom_node.store.InstanceStore
        self.name = spool.name
        self.size = spool.tell()
        self.refusal: SpoolRefusal | None = None

    @property
    def file(self) -> SpoolFile:
        return self

    def write(self, data: bytes) -> None:
        if self.refusal is not None:
            return
        self.size += len(data)
        limits = self._limits
        if self.size > limits.max_dataset_bytes:
            self._refuse(
                f"data set larger than node.max_dataset_megabytes ({limits.max_dataset_bytes // MEGABYTE} MB)"
            )
            return
        free = self._store.unreserved_free_bytes()
        if free - len(data) < limits.keep_free_bytes:
            self._refuse(
                f"disk space low: {free // MEGABYTE} MB free, node.min_free_megabytes is "
                f"{limits.keep_free_bytes // MEGABYTE}"
            )
            return
        self._spool.write(data)

    def flush(self) -> None:
        if self.refusal is None:
            self._spool.flush()

    def close(self) -> None:
        self._spool.close()

    def _refuse(self, reason: str) -> None:
        self.refusal = SpoolRefusal(OUT_OF_RESOURCES, reason)
        self._spool.close()
        _unlink(self.name)
        log.warning("data_set_discarded", reason=reason, received_bytes=self.size)


def spool_refusal(request) -> SpoolRefusal | None:
    """The SpoolFile's refusal for a C-STORE request primitive, if its data set was dropped."""
    spool = getattr(request, "_dataset_file", None)
    return spool.refusal if isinstance(spool, SpoolFile) else None
