"""C-STORE responses encoded by dicom_node.receive.responses are byte for byte what
pynetdicom would send, and what dcmtk reads."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.receive import responses
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


def test_storescu_reads_each_answer_of_an_association(node, tmp_path, monkeypatch):
    encoded = []
    encode = responses.c_store_response
    monkeypatch.setattr(responses, "c_store_response", lambda **values: encoded.append(values) or encode(**values))
    files = []
    for seed in range(3):
        path = tmp_path / f"{seed}.dcm"
        synthetic.mammogram(rows=64, columns=48, seed=seed).save_as(path, enforce_file_format=True)
        files.append(path)
    result = storescu(node.port, *files)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Received Store Response (Success)") == 3
    assert node.queue.stats()["instances"]["total"] == 3
    assert [values["status"] for values in encoded] == [0, 0, 0]  # encoded here, not by pynetdicom
