"""The C-STORE SCU and C-ECHO against real peers: dcmtk storescp and in-process pynetdicom SCPs."""

from __future__ import annotations

import socket

import pydicom
import pytest
from dciodvfy import assert_dciodvfy_clean
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from synthetic import FAKE_PATIENT_ID, FAKE_PATIENT_NAME

from dicom_node.deliver.scu import echo, send_file
from dicom_node.errors import PermanentError, RetryableError

CALLING_AE = "DICOM_NODE"

# Status codes as a PACS sends them (PS3.4 B.2.3, PS3.7 C.4.1), named for readability here.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORISED = 0x0124
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006
DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
DUPLICATE_SOP_INSTANCE = 0x0111


def test_storescp_receives_the_file_unchanged(storescp, gsps_file):
    send_file(gsps_file, storescp.destination, calling_ae_title=CALLING_AE, timeout=10)

    (received,) = list(storescp.output.iterdir())
    sent = pydicom.dcmread(gsps_file)
    got = pydicom.dcmread(received)
    assert got.SOPInstanceUID == sent.SOPInstanceUID
    assert got == sent  # every element of the data set, sequences and graphics included
    assert_dciodvfy_clean(received)


def test_echo_against_storescp_is_one_line(storescp):
    result = echo(storescp.destination, calling_ae_title=CALLING_AE, timeout=10)
    assert "OK" in result and "STORESCP" in result and "\n" not in result


def test_closed_port_is_retryable(gsps_file, closed_destination):
    with pytest.raises(RetryableError, match="offline-pacs"):
        send_file(gsps_file, closed_destination, calling_ae_title=CALLING_AE, timeout=5)
    with pytest.raises(RetryableError, match="offline-pacs"):
        echo(closed_destination, calling_ae_title=CALLING_AE, timeout=5)


def test_unresolvable_host_is_retryable(gsps_file, closed_destination):
    nowhere = closed_destination.model_copy(update={"host": "no-such-host.invalid"})  # RFC 2606
    with pytest.raises(RetryableError, match="cannot reach offline-pacs"):
        send_file(gsps_file, nowhere, calling_ae_title=CALLING_AE, timeout=5)
    with pytest.raises(RetryableError, match="cannot reach offline-pacs"):
        echo(nowhere, calling_ae_title=CALLING_AE, timeout=5)


@pytest.mark.parametrize(
    ("status", "error", "name"),
    [
        (OUT_OF_RESOURCES, RetryableError, "0xA700 Refused: Out of Resources"),
        (CANNOT_UNDERSTAND, RetryableError, "0xC000 Cannot Understand"),
        (PROCESSING_FAILURE, RetryableError, "0x0110 Processing Failure"),
        (DATA_SET_DOES_NOT_MATCH_SOP_CLASS, PermanentError, "0xA900 Data Set Does Not Match SOP Class"),
        (SOP_CLASS_NOT_SUPPORTED, PermanentError, "0x0122 Refused: SOP Class Not Supported"),
        (NOT_AUTHORISED, PermanentError, "0x0124 Refused: Not Authorised"),
    ],
)
def test_failure_statuses_map_to_error_classes(scp, gsps_file, status, error, name):
    peer = scp(status=status)
    with pytest.raises(error) as raised:
        send_file(gsps_file, peer.destination, calling_ae_title=CALLING_AE, timeout=10)
    message = str(raised.value)
    assert name in message and "pacs (TESTSCP@127.0.0.1:" in message
    assert FAKE_PATIENT_NAME not in message and FAKE_PATIENT_ID not in message
    assert peer.received == [pydicom.dcmread(gsps_file).SOPInstanceUID]
    if error is RetryableError:
        assert not isinstance(raised.value, PermanentError)


@pytest.mark.parametrize(
    "status",
    [
        SUCCESS,
        COERCION_OF_DATA_ELEMENTS,
        ELEMENTS_DISCARDED,
        DOES_NOT_MATCH_SOP_CLASS_WARNING,
        DUPLICATE_SOP_INSTANCE,
    ],
)
def test_success_and_warning_statuses_mean_stored(scp, gsps_file, status):
    peer = scp(status=status)
    send_file(gsps_file, peer.destination, calling_ae_title=CALLING_AE, timeout=10)
    assert peer.received == [pydicom.dcmread(gsps_file).SOPInstanceUID]


def test_permanent_rejection_is_permanent_and_echo_still_retryable(scp, gsps_file):
    peer = scp(require_called_aet=True)
    wrong_title = peer.destination.model_copy(update={"ae_title": "SOMEONE_ELSE"})
    with pytest.raises(PermanentError, match="Called AE title not recognised"):
        send_file(gsps_file, wrong_title, calling_ae_title=CALLING_AE, timeout=10)
    with pytest.raises(RetryableError, match="Rejected Permanent"):
        echo(wrong_title, calling_ae_title=CALLING_AE, timeout=10)
    assert peer.received == []


def test_transient_rejection_is_retryable(scp, gsps_file):
    peer = scp(maximum_associations=1)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", peer.destination.port, ae_title="TESTSCP")
    assert held.is_established
    try:
        with pytest.raises(RetryableError, match="Rejected Transient"):
            send_file(gsps_file, peer.destination, calling_ae_title=CALLING_AE, timeout=10)
    finally:
        held.release()
    assert peer.received == []


def test_peer_that_does_not_accept_the_sop_class_is_permanent(scp, gsps_file):
    peer = scp(contexts=(CTImageStorage,))
    with pytest.raises(PermanentError, match="does not accept Grayscale Softcopy Presentation State"):
        send_file(gsps_file, peer.destination, calling_ae_title=CALLING_AE, timeout=10)


def test_abort_during_the_store_is_retryable(scp, gsps_file):
    def abort(event, _release):
        event.assoc.abort()
        return 0x0000

    peer = scp(handler=abort)
    with pytest.raises(RetryableError, match="no C-STORE response"):
        send_file(gsps_file, peer.destination, calling_ae_title=CALLING_AE, timeout=10)
    assert len(peer.received) == 1


def test_no_response_within_the_timeout_is_retryable(scp, gsps_file):
    def stall(_event, release):
        release.wait(30)  # released at teardown
        return 0x0000

    peer = scp(handler=stall)
    with pytest.raises(RetryableError, match="no C-STORE response"):
        send_file(gsps_file, peer.destination, calling_ae_title=CALLING_AE, timeout=1)


def test_missing_or_non_dicom_file_is_permanent(tmp_path, scp):
    peer = scp()
    with pytest.raises(PermanentError, match="cannot send"):
        send_file(tmp_path / "missing.dcm", peer.destination, calling_ae_title=CALLING_AE)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(PermanentError, match="cannot send"):
        send_file(junk, peer.destination, calling_ae_title=CALLING_AE)
    assert peer.received == []


def test_peer_that_never_answers_the_association_request_is_retryable(gsps_file, closed_destination):
    with socket.socket() as silent:  # the kernel accepts the connection; nobody speaks DICOM
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        mute = closed_destination.model_copy(update={"port": silent.getsockname()[1]})
        with pytest.raises(RetryableError, match="did not answer the association request"):
            send_file(gsps_file, mute, calling_ae_title=CALLING_AE, timeout=1)
