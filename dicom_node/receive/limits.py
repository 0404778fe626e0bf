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
  (we negotiate no asynchronous operations: PS3.7 D.3.3.3) end the association, and so
  does a PDV on a presentation context that was never accepted (PS3.8 9.3.5.1).
- each C-STORE data set goes to a `SpoolFile` (dicom_node.receive.spool) that DimseGuard
  makes as soon as the command is decoded; it stops writing once the data set passes
  node.max_dataset_megabytes or free disk space would fall under node.min_free_megabytes.

A data set's fragments are most of what a mammography sender sends. `read_pdu_bounded`
writes each one that continues a spooled data set from the socket straight into its
spool: pynetdicom would copy it four times over and wake two threads for every PDU, which
held ingest to a third of dcmtk's storescp.

Every hang-up is an A-ABORT (PS3.8 9.3.8, source: service provider) followed by closing
the connection, and one log line naming the peer. No log line quotes received bytes.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from pathlib import Path

from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.pdu_primitives import P_DATA

from dicom_node import metrics
from dicom_node.log import get_logger
from dicom_node.receive.spool import SpoolFile, StorageLimits, message_spool, part10_header, streaming_spool

log = get_logger("dicom_node.receive")

KIB = 1024
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
PDV_CONTROL_LAST = 0x02
# PS3.8 9.3.5.1: a PDV item starts with its length (4 bytes, counting what follows), the
# presentation context ID (1) and the message control header (1).
PDV_ITEM_HEADER = struct.Struct(">LBB")
PDU_HEADER = struct.Struct(">BBL")  # PS3.8 9.3.1: type, reserved, length of what follows
PDU_AND_PDV_HEADERS = PDU_HEADER.size + PDV_ITEM_HEADER.size
FRAGMENT_ENDS = PDV_CONTROL_COMMAND | PDV_CONTROL_LAST  # a command, or a message's last fragment
# os.writev takes at most IOV_MAX (1024 on Linux) buffers.
MAX_PIECES_PER_WRITE = 512
READER_START_BYTES = 64 * KIB  # a PduReader's buffer until a data set streams
STREAM_WAIT_SECONDS = 0.005  # between two streamed fragments, at most


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


def _recv_some(sock: socket.socket, view: memoryview, deadline: float) -> int:
    """Receive into `view` what is there (at least a byte): 0 if the peer closed the
    connection or `deadline` passed first."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return 0
    sock.settimeout(remaining)
    try:
        return sock.recv_into(view)
    except (OSError, TimeoutError):
        return 0


class PduReader:
    """One connection's bytes, received through one buffer.

    A recv() takes whatever the socket holds, up to the buffer's free room, so one call
    may bring several PDUs, and what it brought beyond the PDU being read waits here for
    the next read (`buffered`; dicom_node.receive.reactor makes the DUL come back for it).
    Receiving a 128 KiB PDU at a time took three times as long in recv() as a megabyte at
    a time, over loopback. The buffer starts small and grows to `capacity` (the longest
    PDU we accept) once a data set streams or a PDU needs it: a connection that sends
    little holds little.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._buffer = bytearray(READER_START_BYTES)
        self._start = self._end = 0  # the unread bytes are _buffer[_start:_end]

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def take(self, sock: socket.socket, count: int, deadline: float) -> bytearray | None:
        """The next `count` bytes (at most `capacity`), or None if the peer closed the
        connection or `deadline` passed first."""
        self._make_room(count)
        while self.buffered < count:
            if not self._receive(sock, deadline):
                return None
        data = self._buffer[self._start:self._start + count]  # a copy: the buffer is reused
        self._consume(count)
        return data

    def stream(self, sock: socket.socket, spool: SpoolFile, count: int, deadline: float, *,
               context_id: int, max_length: int) -> int:
        """Write the next `count` bytes (the rest of a data set fragment, at most `capacity`)
        to `spool` once they are all here, together with the fragments of the whole PDUs
        buffered behind them (see `_write_fragments`); return the bytes written, or 0 if the
        peer closed the connection or `deadline` passed first.

        One write per batch received: writing each PDU's bytes as they came, then the whole
        PDUs behind it, took 107 writes per full-size mammogram instead of 43."""
        if len(self._buffer) < self.capacity:
            self._make_room(self.capacity)
        while self.buffered < count:
            if not self._receive(sock, deadline):
                return 0
        return self._write_fragments(spool, count, context_id=context_id, max_length=max_length)

    def _write_fragments(self, spool: SpoolFile, first: int, *, context_id: int, max_length: int) -> int:
        """Write the `first` unread bytes (the rest of a fragment) and the data set fragments
        of every whole P-DATA-TF PDU buffered after them that continues the data set (one
        PDV, not the last fragment, of `context_id`, at most `max_length` long), with one
        write; return their bytes.

        The same PDUs `_read_pdu` would stream one by one, taken together: a megabyte
        received holds eight 128 KiB PDUs, and each turn of the loop costs more than the
        bytes it writes."""
        buffer, start, end = self._buffer, self._start + first, self._end
        spans = [(self._start, start)] if first else []
        while end - start >= PDU_AND_PDV_HEADERS and len(spans) < MAX_PIECES_PER_WRITE:
            pdu_type, _, length = PDU_HEADER.unpack_from(buffer, start)
            if pdu_type != P_DATA_TF or length > max_length or end - start < PDU_HEADER.size + length:
                break
            if not _one_continuing_fragment(length, PDV_ITEM_HEADER.unpack_from(buffer, start + PDU_HEADER.size),
                                            context_id):
                break
            spans.append((start + PDU_AND_PDV_HEADERS, start + PDU_HEADER.size + length))
            start += PDU_HEADER.size + length
        if not spans:
            return 0
        count = sum(stop - begin for begin, stop in spans)
        with memoryview(buffer) as view:
            pieces = [view[begin:stop] for begin, stop in spans]
            try:
                spool.write_pieces(pieces, count)
            finally:
                for piece in pieces:
                    piece.release()
        self._consume(start - self._start)
        return count

    def _receive(self, sock: socket.socket, deadline: float) -> bool:
        """Append what the socket has (at least a byte) after the unread bytes."""
        if self._end == len(self._buffer):  # move the unread bytes to the front
            unread = self.buffered
            self._buffer[:unread] = self._buffer[self._start:self._end]
            self._start, self._end = 0, unread
        with memoryview(self._buffer) as view:
            received = _recv_some(sock, view[self._end:], deadline)
        self._end += received
        return received > 0

    def _consume(self, count: int) -> None:
        self._start += count
        if self._start == self._end:
            self._start = self._end = 0

    def _make_room(self, size: int) -> None:
        """Room for `size` bytes from the first unread one: the unread ones are moved to the
        front of a buffer at least `size` long."""
        if len(self._buffer) - self._start >= size:
            return
        unread = self._buffer[self._start:self._end]
        self._buffer = unread + bytearray(max(size, len(self._buffer)) - len(unread))
        self._start, self._end = 0, len(unread)


def _arriving(sock: socket.socket) -> bool:
    """Whether the next PDU's bytes arrive within STREAM_WAIT_SECONDS: streaming goes on
    without a turn of the reactor (which would then wait for them on the socket)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted already, unseen by select
        return True
    try:
        readable, _, _ = select.select([sock], [], [], STREAM_WAIT_SECONDS)
    except (OSError, ValueError):  # closed meanwhile: the reactor finds out
        return False
    return bool(readable)


def _continues_data_set(dul, pdu_length: int, pdv_header: bytes) -> bool:
    """Whether a P-DATA-TF PDU is one PDV holding a data set fragment of the message being
    received, and not its last (the last completes the message: pynetdicom must see it)."""
    return _one_continuing_fragment(pdu_length, PDV_ITEM_HEADER.unpack(pdv_header),
                                    dul.assoc.dimse.message.context_id)


def _one_continuing_fragment(pdu_length: int, pdv_item: tuple[int, int, int], context_id: int) -> bool:
    """Whether a P-DATA-TF PDU of `pdu_length` is the single PDV `pdv_item` (its length,
    context and control header), a data set fragment of `context_id` that is not the last."""
    item_length, item_context, control = pdv_item
    return item_length + 4 == pdu_length and control & FRAGMENT_ENDS == 0 and item_context == context_id


def _read_pdu(dul, reader: PduReader, *, max_pdata_bytes: int, timeout: float) -> bytearray | None:
    """The next PDU for pynetdicom to decode, or None with its event queued or the peer
    hung up on. Data set fragments that continue a spooled data set are written to the
    spool on the way (as long as the reactor has nothing to send), each PDU within
    `timeout`."""
    sock = dul.socket.socket
    streamed = False
    while True:
        deadline = time.monotonic() + timeout
        header = reader.take(sock, 6, deadline)
        if header is None:
            if streamed:  # within a data set: the next PDU is due
                return _ended(dul, deadline, pdu_type=P_DATA_TF, length=None, timeout=timeout)
            dul.event_queue.put("Evt17")
            return None
        pdu_type, _, length = PDU_HEADER.unpack(header)
        if pdu_type not in KNOWN_PDU_TYPES:
            log.warning("pdu_unknown", peer=peer_of(dul.assoc), pdu_type=pdu_type)
            dul.event_queue.put("Evt19")
            return None
        limit = max_pdata_bytes if pdu_type == P_DATA_TF else MAX_CONTROL_PDU_BYTES
        if length > limit:
            hang_up(dul, "pdu_too_long", pdu_type=pdu_type, length=length, limit=limit)
            return None
        prefix = b""
        spool = streaming_spool(dul) if pdu_type == P_DATA_TF and length > PDV_ITEM_HEADER.size else None
        if spool is not None:
            prefix = reader.take(sock, PDV_ITEM_HEADER.size, deadline)
            if prefix is None:
                return _ended(dul, deadline, pdu_type=pdu_type, length=length, timeout=timeout)
            if _continues_data_set(dul, length, prefix):
                written = reader.stream(sock, spool, length - PDV_ITEM_HEADER.size, deadline,
                                        context_id=dul.assoc.dimse.message.context_id, max_length=max_pdata_bytes)
                if not written:
                    return _ended(dul, deadline, pdu_type=pdu_type, length=length, timeout=timeout)
                metrics.get().received_bytes.inc(written)
                streamed = True
                if dul.to_provider_queue.empty() and not dul._kill_thread and (
                    reader.buffered or _arriving(sock)
                ):
                    continue
                return None  # back to the reactor: something to send, a stop, or a pause
        body = reader.take(sock, length - len(prefix), deadline)
        if body is None:
            return _ended(dul, deadline, pdu_type=pdu_type, length=length, timeout=timeout)
        return bytearray().join((header, prefix, body))


def _ended(dul, deadline: float, *, pdu_type: int, length: int | None, timeout: float) -> None:
    """The socket gave no more of a PDU: the peer was too slow (hang up) or closed it (Evt17)."""
    if time.monotonic() >= deadline:
        hang_up(dul, "pdu_too_slow", pdu_type=pdu_type, length=length, timeout_seconds=timeout)
    else:
        dul.event_queue.put("Evt17")


def read_pdu_bounded(dul, reader: PduReader, *, max_pdata_bytes: int, timeout: float) -> None:
    """Replacement for ``DULServiceProvider._read_pdu_data``, with bounded length and time.

    Same events as pynetdicom's reader (Evt17 closed, Evt19 unknown PDU, or the PDU's own
    event), plus a hang-up for a PDU too long for its type or too slow to arrive. Data set
    fragments streamed into their spool (see `_read_pdu`) queue no event.
    """
    association_socket = dul.socket
    sock = association_socket.socket
    try:
        pdu = _read_pdu(dul, reader, max_pdata_bytes=max_pdata_bytes, timeout=timeout)
    finally:
        if association_socket.socket is not None:
            sock.settimeout(timeout)
    if pdu is None:
        return
    try:
        decoded, event = dul._decode_pdu(pdu)
    except Exception as error:  # noqa: BLE001 - a peer's bytes: any decoding error is theirs
        log.warning("pdu_undecodable", peer=peer_of(dul.assoc), pdu_type=pdu[0], error=type(error).__name__)
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(decoded)


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
            if context_id not in self.association._accepted_cx:
                # PS3.8 9.3.5.1: a PDV names an accepted presentation context; pynetdicom
                # would fail on it with a KeyError in the middle of decoding.
                self._hang_up("pdv_context_not_accepted", context_id=context_id)
                return
            if not self._admit(data):
                return
            single = P_DATA()
            single.presentation_data_value_list = [[context_id, data]]  # pynetdicom wants lists
            self.receive(single)
            self._start_spool()
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
        if message_spool(message) is None:  # kept in memory by pynetdicom
            if message.data_set.tell() + fragment > MAX_COMMAND_SET_BYTES:
                self._hang_up("dimse_data_set_too_long", limit=MAX_COMMAND_SET_BYTES)
                return False
        metrics.get().received_bytes.inc(fragment)
        return True

    def _start_spool(self) -> None:
        """Give the C-STORE request whose command was just decoded the file its data set will
        be written to (see dicom_node.receive.spool), before the data set's first byte.

        pynetdicom has then made the message a C_STORE_RQ; one without a data set is already
        complete (and gone from `dimse.message`), and a message with a spool has one."""
        message = self.dimse.message
        if not isinstance(message, C_STORE_RQ) or message._data_set_file is not None:
            return
        association, command = self.association, message.command_set
        header = part10_header(
            sop_class_uid=command.AffectedSOPClassUID,
            sop_instance_uid=command.AffectedSOPInstanceUID,
            transfer_syntax=association._accepted_cx[message.context_id].transfer_syntax[0],
            calling_ae=association.requestor.ae_title,
            called_ae=association.acceptor.ae_title,
        )
        spool = SpoolFile(self.limits, self.store, header=header)
        message._data_set_file = spool
        message._data_set_path = Path(spool.name)

    def _hang_up(self, event: str, **fields) -> None:
        spool = message_spool(self.dimse.message)
        if spool is not None:
            spool.discard()
        hang_up(self.association.dul, event, **fields)
