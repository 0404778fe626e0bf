"""C-STORE requests served, and their responses encoded, here instead of by pynetdicom.

pynetdicom turns every response primitive into a DIMSE message, builds a pydicom command
set, encodes it and fragments it: 0.47 ms in front of every C-STORE answer, for about a
hundred bytes that differ between answers only in four values. `c_store_response`
encodes a C-STORE response's command set itself (byte for byte what pynetdicom sends:
tested). `answer_stores_directly` hands the DUL the one P-DATA it makes for the responses
pynetdicom's service classes send; any other message, and a response carrying anything but
those values and an Error Comment, still goes through pynetdicom.

`serve_c_store` serves a C-STORE request in the DUL thread that decoded it (see
dicom_node.receive.reactor), as pynetdicom's StorageServiceClass.SCP does, minus what
stands between the handler's status and the sender: the response is written to the socket
at once, and the spool is closed and removed after it, not before.

What only reports a stored instance (its log line, its counts) waits until the answer is
on the wire (`after_answer`): between the job table's commit and the sender it took 0.2 ms
of every answer.

These responses skip pynetdicom's EVT_DIMSE_SENT and EVT_PDU_SENT, which nothing here binds.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from dicom_node.log import describe_error, get_logger
from dicom_node.receive.limits import P_DATA_TF, PDU_HEADER, PDV_ITEM_HEADER
from dicom_node.receive.spool import spool_of, text_value, uid_value

log = get_logger("dicom_node.receive")

C_STORE_RSP = 0x8001  # PS3.7 9.3.1.2, Command Field
NO_DATA_SET = 0x0101  # PS3.7 E.1, Command Data Set Type: no data set follows
# PS3.8 E.2, the message control header: a command fragment, the last one.
COMMAND_LAST_FRAGMENT = b"\x03"
# The status pynetdicom answers when a C-STORE handler raises (StorageServiceClass.SCP).
HANDLER_FAILED = 0xC211

_ELEMENT_HEADER = struct.Struct("<HHL")  # PS3.5 7.1.3, Implicit VR Little Endian: tag, length
_US = struct.Struct("<H")
_UL = struct.Struct("<L")


def _element(element: int, value: bytes) -> bytes:
    """An element of the command group (0000,eeee), Implicit VR Little Endian (PS3.7 6.3.1)."""
    return _ELEMENT_HEADER.pack(0x0000, element, len(value)) + value


def c_store_response(
    *, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int, error_comment: str | None = None
) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2), its elements in tag order."""
    elements = [
        _element(0x0002, uid_value(sop_class_uid)),  # Affected SOP Class UID
        _element(0x0100, _US.pack(C_STORE_RSP)),  # Command Field
        _element(0x0120, _US.pack(message_id)),  # Message ID Being Responded To
        _element(0x0800, _US.pack(NO_DATA_SET)),  # Command Data Set Type
        _element(0x0900, _US.pack(status)),  # Status
    ]
    if error_comment:
        elements.append(_element(0x0902, text_value(error_comment)))  # Error Comment
    elements.append(_element(0x1000, uid_value(sop_instance_uid)))  # Affected SOP Instance UID
    body = b"".join(elements)
    return _element(0x0000, _UL.pack(len(body))) + body  # Command Group Length


def _encodable(primitive) -> bool:
    """A C-STORE response holding only what c_store_response encodes."""
    return (
        isinstance(primitive, C_STORE)
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status is not None
        and primitive.OffendingElement is None
        and primitive.AffectedSOPClassUID is not None
        and primitive.AffectedSOPInstanceUID is not None
        and (primitive.ErrorComment is None or primitive.ErrorComment.isascii())
    )


def answer_stores_directly(association) -> None:
    """Send `association`'s C-STORE responses as one hand-encoded P-DATA each; call before
    its threads start."""
    dimse = association.dimse
    send_through_pynetdicom = dimse.send_msg

    def send_msg(primitive, context_id: int) -> None:
        if not _encodable(primitive):
            send_through_pynetdicom(primitive, context_id)
            return
        command = c_store_response(
            message_id=primitive.MessageIDBeingRespondedTo,
            sop_class_uid=str(primitive.AffectedSOPClassUID),
            sop_instance_uid=str(primitive.AffectedSOPInstanceUID),
            status=primitive.Status,
            error_comment=primitive.ErrorComment,
        )
        _queue_for_dul(dimse.dul, context_id, command)

    dimse.send_msg = send_msg


_answering = threading.local()  # .pending: the work after the answer serve_c_store is making


def after_answer(work: Callable[[], object]) -> None:
    """Run `work` once the C-STORE answer being made in this thread is sent, or now if no
    answer is being made here (pynetdicom's own dispatch, which sends after the handler
    returns). For what only reports an answer: it must not delay it, and may be lost with
    the process between the answer and itself."""
    pending = getattr(_answering, "pending", None)
    if pending is None:
        work()
    else:
        pending.append(work)


def _run_after_answer(pending: list[Callable[[], object]]) -> None:
    for work in pending:
        try:
            work()
        except Exception as error:  # noqa: BLE001 - a report that failed must not end the association
            log.error("after_answer_failed", error=describe_error(error))


def _queue_for_dul(dul, context_id: int, command: bytes) -> None:
    """Hand the DUL the one P-DATA of a response command set (the last command fragment),
    for its next turn to send."""
    pdata = P_DATA()
    pdata.presentation_data_value_list = [[context_id, COMMAND_LAST_FRAGMENT + command]]
    dul.send_pdu(pdata)


def serve_c_store(association, request: C_STORE, context_id: int) -> None:
    """Serve `request` as pynetdicom would (its EVT_C_STORE handler gives the status), in
    the calling thread, the association's DUL thread: the response goes out on the socket
    at once, then the request's spool is closed and removed.

    A request pynetdicom would not hand to its storage service (invalid, on a context not
    accepted, after our release request, or of a SOP class another service serves) goes
    to pynetdicom's own dispatch, with its logging and refusals.
    """
    if (not request.is_valid_request or context_id not in association._accepted_cx
            or association._sent_release
            or uid_to_service_class(request.AffectedSOPClassUID) is not StorageServiceClass):
        association._serve_request(request, context_id)
        return
    context = association._accepted_cx[context_id]
    _answering.pending = pending = []
    try:
        try:
            result = evt.trigger(association, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
        except Exception as error:  # noqa: BLE001 - the sender gets a status, as from pynetdicom
            log.error("c_store_handler_failed", error=describe_error(error))
            result = HANDLER_FAILED
        status, comment = (result, None) if isinstance(result, int) else _status_of(result)
        if association.is_established:
            _send_now(association.dul, context_id, c_store_response(
                message_id=request.MessageID,
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                status=status,
                error_comment=comment,
            ))
    finally:
        _answering.pending = None
        spool = spool_of(request)
        if spool is not None:
            spool.discard()
        _run_after_answer(pending)


def _status_of(result: Dataset) -> tuple[int, str | None]:
    return int(result.Status), result.get("ErrorComment")


def _send_now(dul, context_id: int, command: bytes) -> None:
    """Send the P-DATA-TF of a response command set, written to the socket here unless
    the DUL has something queued to send first (then after it, by the DUL)."""
    if dul.state_machine.current_state != "Sta6" or not dul.to_provider_queue.empty():
        _queue_for_dul(dul, context_id, command)
        return
    # PS3.8 9.3.5: the PDU header, then one PDV item: its length (context ID, message
    # control header and fragment), the context ID, the control header, the fragment.
    item = PDV_ITEM_HEADER.pack(len(command) + 2, context_id, COMMAND_LAST_FRAGMENT[0]) + command
    dul.socket.send(PDU_HEADER.pack(P_DATA_TF, 0, len(item)) + item)  # on failure: Evt17
