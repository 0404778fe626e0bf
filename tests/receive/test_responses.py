"""C-STORE responses encoded by dicom_node.receive.responses are byte for byte what
pynetdicom would send, and what dcmtk reads."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.receive import handlers, responses
from dicom_node.receive.responses import COMMAND_LAST_FRAGMENT, c_store_response
from dicom_node.receive.spool import OUT_OF_RESOURCES
from tests import synthetic
from tests.receive.helpers import storescu

MG = "1.2.840.10008.5.1.4.1.1.1.2"


def pynetdicom_command(*, message_id, sop_instance_uid, status, error_comment=None) -> bytes:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = MG
    primitive.AffectedSOPInstanceUID = sop_instance_uid
    primitive.Status = status
    if error_comment:
        primitive.ErrorComment = error_comment
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = message.encode_msg(1, 16384)
    ((_, value),) = pdata.presentation_data_value_list
    return value


@pytest.mark.parametrize(
    "message_id, sop_instance_uid, status, error_comment",
    [
        (1, "1.2.3.4", 0x0000, None),  # even-length UID
        (65535, "1.2.3.45", 0x0000, None),  # odd-length UID, the largest message ID
        (7, "1.2.3", OUT_OF_RESOURCES, "disk space low: 765 MB free, node.min_free_megabytes is 1024"),
        (8, "1.2.3", 0xC000, "odd"),  # odd-length comment
    ],
)
def test_the_command_is_byte_for_byte_pynetdicom_s(message_id, sop_instance_uid, status, error_comment):
    ours = COMMAND_LAST_FRAGMENT + c_store_response(
        message_id=message_id, sop_class_uid=MG, sop_instance_uid=sop_instance_uid, status=status,
        error_comment=error_comment,
    )
    assert ours == pynetdicom_command(message_id=message_id, sop_instance_uid=sop_instance_uid, status=status,
                                      error_comment=error_comment)


def _mammograms(folder, count: int) -> list:
    """`count` small synthetic mammograms written under `folder`."""
    files = []
    for seed in range(count):
        path = folder / f"{seed}.dcm"
        synthetic.mammogram(rows=64, columns=48, seed=seed).save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def test_storescu_reads_each_answer_of_an_association(node, tmp_path, monkeypatch):
    encoded = []
    encode = responses.c_store_response
    monkeypatch.setattr(responses, "c_store_response", lambda **values: encoded.append(values) or encode(**values))
    result = storescu(node.port, *_mammograms(tmp_path, 3))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Received Store Response (Success)") == 3
    assert node.queue.stats()["instances"]["total"] == 3
    assert [values["status"] for values in encoded] == [0, 0, 0]  # encoded here, not by pynetdicom


class _RecordingLogger:
    """The handlers' logger, noting the events it is given in `order` before logging them."""

    def __init__(self, logger, order: list[str]):
        self._logger, self._order = logger, order

    def info(self, event, **fields):
        self._order.append(event)
        self._logger.info(event, **fields)

    def __getattr__(self, name):
        return getattr(self._logger, name)


def test_the_answer_goes_out_before_the_instance_is_logged_and_counted(node, tmp_path, monkeypatch):
    # What only reports an answer must not stand between the job table's commit and the
    # sender. Recorded in the one thread that stores, answers and reports.
    order: list[str] = []
    send_now = responses._send_now
    monkeypatch.setattr(responses, "_send_now", lambda *args: order.append("answer") or send_now(*args))
    count_answer = handlers.count_answer
    monkeypatch.setattr(handlers, "count_answer",
                        lambda status, **values: order.append("count") or count_answer(status, **values))
    monkeypatch.setattr(handlers, "log", _RecordingLogger(handlers.log, order))
    result = storescu(node.port, *_mammograms(tmp_path, 2))
    assert result.returncode == 0, result.stderr
    steps = {"answer", "instance_stored", "count"}  # the association's own log lines aside
    assert [step for step in order if step in steps] == ["answer", "instance_stored", "count"] * 2
    assert node.server.activity.stored == 2


def test_work_after_an_answer_runs_at_once_where_no_answer_is_being_made():
    ran = []
    responses.after_answer(lambda: ran.append("reported"))
    assert ran == ["reported"]
