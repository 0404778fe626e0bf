"""Raw DICOM upper-layer PDUs and DIMSE messages, built byte by byte, and a raw client.

Written from the standard rather than with pynetdicom, so that a benchmark or a test can
send what no DICOM library would: wrong lengths, unknown items, truncated messages, the
attacks of dicom_node.bench.hostile. References:
PS3.8 9.3 (PDU structure), PS3.8 Annex E (PDV message control header), PS3.7 9.3.1
(C-STORE-RQ command set), PS3.7 E.1 (command set encoding: Implicit VR Little Endian).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom.config
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1: the DICOM application context
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1"

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
# Message control header bits (PS3.8 E.2): bit 0 command/data set, bit 1 last fragment.
DATASET_FRAGMENT, COMMAND_FRAGMENT, DATASET_LAST, COMMAND_LAST = 0, 1, 2, 3


def _uid(value: str) -> bytes:
    """A UI value: padded with NUL to an even length (PS3.5 6.2)."""
    data = value.encode("ascii", "replace")
    return data + b"\x00" * (len(data) % 2)


def item(item_type: int, payload: bytes, *, length: int | None = None) -> bytes:
    """A variable item (PS3.8 9.3.2.2): type, reserved, 16-bit length, payload."""
    return struct.pack(">BBH", item_type, 0, len(payload) if length is None else length) + payload


def pdu(pdu_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A PDU: type, reserved, 32-bit big-endian length, body."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def presentation_context(context_id: int, abstract_syntax: str, transfer_syntaxes: Sequence[str]) -> bytes:
    sub_items = item(0x30, _uid(abstract_syntax)) + b"".join(item(0x40, _uid(ts)) for ts in transfer_syntaxes)
    return item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub_items)


def user_information(max_pdu_length: int = 16384) -> bytes:
    return item(0x50, item(0x51, struct.pack(">L", max_pdu_length)) + item(0x52, _uid(IMPLEMENTATION_CLASS_UID)))


def associate_rq(
    *,
    called: str,
    calling: str,
    contexts: Sequence[tuple[int, str, Sequence[str]]],
    user_info: bytes | None = None,
    extra_items: bytes = b"",
) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2)."""
    header = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + b"\x00" * 32
    items = item(0x10, APPLICATION_CONTEXT.encode())
    items += b"".join(presentation_context(*context) for context in contexts)
    items += extra_items + (user_information() if user_info is None else user_info)
    return pdu(ASSOCIATE_RQ, header + items)


def p_data(pdvs: Sequence[tuple[int, int, bytes]]) -> bytes:
    """P-DATA-TF (PS3.8 9.3.5) with PDVs (context id, message control header, fragment)."""
    body = b"".join(struct.pack(">LBB", len(data) + 2, context_id, control) + data for context_id, control, data in pdvs)
    return pdu(P_DATA_TF, body)


def release_rq() -> bytes:
    return pdu(RELEASE_RQ, b"\x00" * 4)


def abort_pdu() -> bytes:
    return pdu(ABORT, b"\x00\x00\x00\x00")


def encode(ds: Dataset, *, implicit: bool) -> bytes:
    """A dataset as it travels on the wire (no preamble, no File Meta)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def command_set(**elements) -> bytes:
    """A command set (PS3.7 E.1): Implicit VR Little Endian with its group length first.

    Values are set as given, valid or not, without pydicom warning about them in the
    caller's output (a fuzzed UID holds fake patient data: tests/phi_guard.py counts it).
    """
    ds = Dataset()
    with pydicom.config.disable_value_validation():
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
    body = encode(ds, implicit=True)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def c_store_rq(*, message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """C-STORE-RQ command (PS3.7 9.3.1.1), announcing a data set."""
    return command_set(
        AffectedSOPClassUID=sop_class_uid,
        CommandField=0x0001,
        MessageID=message_id,
        Priority=0,
        CommandDataSetType=0x0000,
        AffectedSOPInstanceUID=sop_instance_uid,
    )


def c_echo_rq(*, message_id: int) -> bytes:
    """C-ECHO-RQ command (PS3.7 9.3.5.1), no data set."""
    return command_set(
        AffectedSOPClassUID="1.2.840.10008.1.1", CommandField=0x0030, MessageID=message_id,
        CommandDataSetType=0x0101,
    )


# --------------------------------------------------------------------------- a client


@dataclass
class Reply:
    """What the node answered: PDU types in order, and a C-STORE/C-ECHO status if one came."""

    pdu_types: list[int]
    status: int | None = None
    closed: bool = False  # the node closed (or reset) the connection
    timed_out: bool = False  # the node said nothing more, and kept the connection open


class RawClient:
    """One TCP connection speaking raw PDUs."""

    def __init__(self, port: int, *, timeout: float):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> bool:
        """False if the node had already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _recv_exactly(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(min(count - len(data), 1 << 16))
            if not chunk:
                return None
            data += chunk
        return data

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU; None when the node closed or reset the connection.

        Raises TimeoutError when the node sends nothing for the client's timeout.
        """
        try:
            header = self._recv_exactly(6)
            if header is None:
                return None
            pdu_type, _, length = struct.unpack(">BBL", header)
            body = self._recv_exactly(length)
            return None if body is None else (pdu_type, body)
        except TimeoutError:
            raise
        except OSError:  # reset by the node
            return None

    def read_reply(self, *, until: Sequence[int] = (ASSOCIATE_AC, ASSOCIATE_RJ, ABORT, RELEASE_RP)) -> Reply:
        """Read PDUs until one of `until`, a status, or the end of the connection."""
        reply = Reply([])
        while True:
            try:
                received = self.read_pdu()
            except TimeoutError:
                reply.timed_out = True
                return reply
            if received is None:
                reply.closed = True
                return reply
            pdu_type, body = received
            reply.pdu_types.append(pdu_type)
            if pdu_type == P_DATA_TF:
                reply.status = command_status(body)
                if reply.status is not None:
                    return reply
            if pdu_type in until:
                return reply

    def close(self) -> None:
        self.sock.close()


def command_status(p_data_body: bytes) -> int | None:
    """The Status (0000,0900) of a single-PDV command P-DATA-TF body, if it is one."""
    if len(p_data_body) < 6:
        return None
    length, _context, control = struct.unpack(">LBB", p_data_body[:6])
    if not control & 1:
        return None
    data = p_data_body[6 : 4 + length]
    offset = 0
    while offset + 8 <= len(data):
        group, element, value_length = struct.unpack("<HHL", data[offset : offset + 8])
        if (group, element) == (0x0000, 0x0900):
            return struct.unpack("<H", data[offset + 8 : offset + 10])[0]
        offset += 8 + value_length
    return None
