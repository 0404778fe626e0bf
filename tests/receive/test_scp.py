"""The Storage SCP over real associations: dcmtk tools and a pynetdicom SCU on loopback."""

from __future__ import annotations

import contextlib
import errno
import json
import socket
from pathlib import Path

import numpy as np
import pydicom.config
import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import _config
from pynetdicom.sop_class import Verification

from dicom_node import metrics
from dicom_node.receive import access
from dicom_node.receive.access import (
    AssociateDiagnostic,
    AssociateResult,
    AssociateSource,
)
from dicom_node.receive.handlers import StoreStatus
from tests import synthetic
from tests.dciodvfy import dciodvfy_lines
from tests.receive.helpers import (
    NODE_AE,
    SENDER_AE,
    SYNTAXES,
    association,
    echoscu,
    reject_reason,
    stored_files,
    storescu,
    temp_files,
)

MG = DigitalMammographyXRayImageStorageForPresentation
UNCOMPRESSED = [ExplicitVRLittleEndian]


def assert_stored_as_sent(node, sent_path):
    """The stored file is the sent dataset, pixel data bytes unchanged, plus our File Meta."""
    sent = dcmread(sent_path)
    stored_path = node.store.instance_path(
        study_uid=sent.StudyInstanceUID,
        series_uid=sent.SeriesInstanceUID,
        sop_instance_uid=sent.SOPInstanceUID,
    )
    assert stored_files(node.data_dir) == [stored_path]
    assert temp_files(node.data_dir) == []
    stored = dcmread(stored_path)  # a Part 10 file: pydicom refuses anything else here
    meta = stored.file_meta
    assert meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert meta.MediaStorageSOPClassUID == sent.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert meta.SendingApplicationEntityTitle == SENDER_AE
    assert meta.ReceivingApplicationEntityTitle == NODE_AE
    assert stored.PixelData == sent.PixelData  # encapsulated fragments too: never re-encoded
    assert {e.tag: e.value for e in stored} == {e.tag: e.value for e in sent}
    np.testing.assert_array_equal(stored.pixel_array, sent.pixel_array)
    # The node adds no conformance problem that the sent file did not have (the
    # synthetic images are not complete MG objects, so the sent file has some).
    assert set(dciodvfy_lines(stored_path)) <= set(dciodvfy_lines(sent_path))
    (row,) = node.queue.study_instances(sent.StudyInstanceUID)
    assert row.sop_instance_uid == sent.SOPInstanceUID
    assert row.path == str(stored_path)
    assert row.transfer_syntax == sent.file_meta.TransferSyntaxUID
    assert row.size_bytes == stored_path.stat().st_size
    return stored


def raw_part10(path, *, dataset_bytes: bytes, transfer_syntax: str, sop_instance_uid: str):
    """A file whose dataset bytes are sent exactly as given (see send_raw)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    with open(path, "wb") as out:
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(out, meta)
        out.write(dataset_bytes)
    return path


def encode_explicit(ds) -> bytes:
    """The dataset's bytes in Explicit VR Little Endian, without File Meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


@contextlib.contextmanager
def raw_sending(monkeypatch):
    # pynetdicom then sends the file's dataset bytes without decoding them.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    yield


def send(port, path_or_ds, *, transfer_syntax=ExplicitVRLittleEndian, sop_class=MG):
    with association(port, [(sop_class, [transfer_syntax])]) as assoc:
        assert assoc.is_established
        return assoc.send_c_store(path_or_ds)


# --- verification -----------------------------------------------------------------


def test_echo_with_dcmtk(node):
    result = echoscu(node.port)
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr + result.stdout


def test_echo_with_pynetdicom(node):
    with association(node.port, [(Verification, UNCOMPRESSED)]) as assoc:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == StoreStatus.SUCCESS


def test_accepted_connections_have_nagle_off(node):
    with association(node.port, [(Verification, UNCOMPRESSED)]) as assoc:
        assert assoc.is_established
        (acceptor,) = node.server.active_associations
        sock = acceptor.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# --- every transfer syntax, stored as sent -------------------------------------------


@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_storescu_each_transfer_syntax_stored_as_sent(node, encoded_files, syntax):
    sent_path = encoded_files[syntax]
    assert dcmread(sent_path).file_meta.TransferSyntaxUID == SYNTAXES[syntax]
    result = storescu(node.port, sent_path, options=(synthetic.STORESCU_PROPOSE[syntax],))
    assert result.returncode == 0, result.stderr
    stored = assert_stored_as_sent(node, sent_path)
    assert stored.file_meta.TransferSyntaxUID == SYNTAXES[syntax]


@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_pynetdicom_each_transfer_syntax_stored_as_sent(node, encoded_files, syntax):
    sent_path = encoded_files[syntax]
    status = send(node.port, sent_path, transfer_syntax=SYNTAXES[syntax])
    assert status.Status == StoreStatus.SUCCESS
    assert_stored_as_sent(node, sent_path)


def test_several_instances_in_one_association(node, tmp_path):
    paths = synthetic.study(tmp_path / "study", n_images=4)
    result = storescu(node.port, *paths)
    assert result.returncode == 0, result.stderr
    study_uid = dcmread(paths[0]).StudyInstanceUID
    assert len(node.queue.study_instances(study_uid)) == 4
    assert len(stored_files(node.data_dir)) == 4


def test_storing_is_timed_for_each_instance_answered_success(node, tmp_path):
    def store_timings():
        return metrics.count_and_sum(metrics.get().instance_store)

    count, seconds = store_timings()
    paths = synthetic.study(tmp_path / "study", n_images=3)
    assert storescu(node.port, *paths).returncode == 0
    refused = synthetic.mammogram(sop_class_uid=SecondaryCaptureImageStorage)
    refused.Modality = "OT"
    assert send(node.port, refused, sop_class=SecondaryCaptureImageStorage).Status != StoreStatus.SUCCESS
    now_count, now_seconds = store_timings()
    assert now_count - count == 3
    assert now_seconds > seconds


def test_secondary_capture_mammogram_is_stored(node, tmp_path):
    ds = synthetic.mammogram(sop_class_uid=SecondaryCaptureImageStorage)
    status = send(node.port, ds, sop_class=SecondaryCaptureImageStorage)
    assert status.Status == StoreStatus.SUCCESS
    assert len(node.queue.study_instances(ds.StudyInstanceUID)) == 1


# --- duplicates ------------------------------------------------------------------


def test_duplicate_send_keeps_one_file_and_one_row(node, encoded_files):
    sent_path = encoded_files["explicit-little"]
    assert storescu(node.port, sent_path).returncode == 0
    (first,) = stored_files(node.data_dir)
    inode = first.stat().st_ino
    result = storescu(node.port, sent_path)
    assert result.returncode == 0, result.stderr
    assert "Received Store Response (Success)" in result.stderr + result.stdout
    assert stored_files(node.data_dir) == [first]
    assert first.stat().st_ino == inode  # the existing file was kept, not replaced
    assert len(node.queue.study_instances(dcmread(sent_path).StudyInstanceUID)) == 1
    assert temp_files(node.data_dir) == []


# --- refused instances: failure status, nothing left behind ------------------------


def assert_nothing_stored(node):
    assert stored_files(node.data_dir) == []
    assert temp_files(node.data_dir) == []


def test_unparseable_dataset_is_refused(node, tmp_path, monkeypatch):
    path = raw_part10(
        tmp_path / "garbage.dcm",
        dataset_bytes=b"this is not a deflate stream" * 10,
        transfer_syntax=DeflatedExplicitVRLittleEndian,
        sop_instance_uid=generate_uid(),
    )
    with raw_sending(monkeypatch):
        status = send(node.port, path, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert status.Status == StoreStatus.CANNOT_UNDERSTAND
    assert "cannot be parsed" in status.ErrorComment
    assert_nothing_stored(node)


def test_missing_sop_instance_uid_is_refused(node, tmp_path, monkeypatch):
    ds = synthetic.mammogram()
    sop_instance_uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    path = raw_part10(
        tmp_path / "no-uid.dcm",
        dataset_bytes=encode_explicit(ds),
        transfer_syntax=ExplicitVRLittleEndian,
        sop_instance_uid=sop_instance_uid,
    )
    with raw_sending(monkeypatch):
        status = send(node.port, path)
    assert status.Status == StoreStatus.CANNOT_UNDERSTAND
    assert status.ErrorComment == "SOP Instance UID is missing"
    assert_nothing_stored(node)
    assert node.queue.study_instances(ds.StudyInstanceUID) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("hostile", ["../../../../tmp/escaped", "1.2\\..\\x", "1.2.3\x01/.."])
def test_uid_that_would_escape_data_dir_is_refused(node, tmp_path, monkeypatch, hostile):
    ds = synthetic.mammogram()
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    ds.StudyInstanceUID = hostile
    path = raw_part10(
        tmp_path / "hostile.dcm",
        dataset_bytes=encode_explicit(ds),
        transfer_syntax=ExplicitVRLittleEndian,
        sop_instance_uid=ds.SOPInstanceUID,
    )
    with raw_sending(monkeypatch):
        status = send(node.port, path)
    assert status.Status == StoreStatus.CANNOT_UNDERSTAND
    assert "Study Instance UID" in status.ErrorComment
    assert_nothing_stored(node)
    assert sorted(p.name for p in node.data_dir.iterdir()) == sorted(
        ["instances", "results", "tmp", "dicom-node.sqlite", "dicom-node.sqlite-wal",
         "dicom-node.sqlite-shm"]
    )  # fmt: skip


def test_dataset_not_matching_request_is_refused(node, tmp_path, monkeypatch):
    ds = synthetic.mammogram()
    path = raw_part10(
        tmp_path / "mismatch.dcm",
        dataset_bytes=encode_explicit(ds),
        transfer_syntax=ExplicitVRLittleEndian,
        sop_instance_uid=generate_uid(),  # the C-STORE request names another instance
    )
    with raw_sending(monkeypatch):
        status = send(node.port, path)
    assert status.Status == StoreStatus.CANNOT_UNDERSTAND
    assert status.ErrorComment.startswith("SOP Instance UID differs from the C-STORE request")
    assert_nothing_stored(node)


def test_secondary_capture_that_is_not_mg_is_refused(node):
    ds = synthetic.mammogram(sop_class_uid=SecondaryCaptureImageStorage)
    ds.Modality = "OT"
    status = send(node.port, ds, sop_class=SecondaryCaptureImageStorage)
    assert status.Status == StoreStatus.SOP_CLASS_NOT_SUPPORTED
    assert "Modality OT" in status.ErrorComment
    assert_nothing_stored(node)
    assert node.queue.study_instances(ds.StudyInstanceUID) == []


def test_ct_is_refused_at_negotiation(node, tmp_path):
    ds = synthetic.mammogram(sop_class_uid=CTImageStorage)
    ds.Modality = "CT"
    with association(node.port, [(CTImageStorage, UNCOMPRESSED), (MG, UNCOMPRESSED)]) as assoc:
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [MG]
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [CTImageStorage]
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(ds)
    result = storescu(node.port, synthetic.write(ds, tmp_path / "ct.dcm"))
    assert result.returncode != 0
    assert "No presentation context" in result.stderr + result.stdout
    assert_nothing_stored(node)


def test_unexpected_error_gives_failure_status_and_association_goes_on(node, monkeypatch):
    def broken(**_kwargs):
        raise RuntimeError("database exploded")

    monkeypatch.setattr(node.queue, "record_instance", broken)
    first, second = synthetic.mammogram(seed=1), synthetic.mammogram(seed=2)
    with association(node.port, [(MG, UNCOMPRESSED)]) as assoc:
        assert assoc.send_c_store(first).Status == StoreStatus.PROCESSING_FAILURE
        monkeypatch.undo()
        assert assoc.send_c_store(second).Status == StoreStatus.SUCCESS
    assert temp_files(node.data_dir) == []
    assert node.queue.study_instances(first.StudyInstanceUID) == []


def test_disk_error_gives_out_of_resources(node, monkeypatch):
    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(node.store, "persist_instance", disk_full)
    status = send(node.port, synthetic.mammogram())
    assert status.Status == StoreStatus.OUT_OF_RESOURCES
    assert_nothing_stored(node)


# --- access control ----------------------------------------------------------------


def test_wrong_called_ae_title_is_rejected(node):
    result = echoscu(node.port, called="NOT_THE_NODE")
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr + result.stdout
    with association(node.port, [(Verification, UNCOMPRESSED)], called="NOT_THE_NODE") as assoc:
        assert assoc.is_rejected
        assert reject_reason(assoc) == (
            AssociateResult.REJECTED_PERMANENT,
            AssociateSource.SERVICE_USER,
            AssociateDiagnostic.CALLED_AE_TITLE_NOT_RECOGNIZED,
        )


def test_any_called_ae_title_when_not_required(make_node):
    node = make_node(security={"require_called_ae_title": False})
    assert echoscu(node.port, called="ANY_TITLE").returncode == 0


def test_calling_ae_title_not_allowed_is_rejected(make_node, tmp_path):
    node = make_node(security={"allowed_callers": [{"ae_title": "PACS"}]})
    with association(node.port, [(Verification, UNCOMPRESSED)], calling="INTRUDER") as assoc:
        assert assoc.is_rejected
        assert reject_reason(assoc) == (
            AssociateResult.REJECTED_PERMANENT,
            AssociateSource.SERVICE_USER,
            AssociateDiagnostic.CALLING_AE_TITLE_NOT_RECOGNIZED,
        )
    paths = synthetic.study(tmp_path / "s", n_images=1)
    result = storescu(node.port, *paths, calling="INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
    assert storescu(node.port, *paths, calling="PACS").returncode == 0
    assert len(stored_files(node.data_dir)) == 1


def test_allowed_caller_from_other_host_is_rejected(make_node):
    node = make_node(security={"allowed_callers": [{"ae_title": "PACS", "host": "192.0.2.7"}]})
    with association(node.port, [(Verification, UNCOMPRESSED)], calling="PACS") as assoc:
        assert assoc.is_rejected
        assert reject_reason(assoc)[2] == AssociateDiagnostic.CALLING_AE_TITLE_NOT_RECOGNIZED
    other = make_node(security={"allowed_callers": [{"ae_title": "PACS", "host": "127.0.0.0/8"}]})
    with association(other.port, [(Verification, UNCOMPRESSED)], calling="PACS") as assoc:
        assert assoc.is_established


def test_access_check_error_rejects_instead_of_accepting(node, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("access check broke")

    monkeypatch.setattr(access, "check_association_request", broken)
    with association(node.port, [(Verification, UNCOMPRESSED)]) as assoc:
        assert assoc.is_rejected
        assert reject_reason(assoc)[0] == AssociateResult.REJECTED_TRANSIENT


def test_association_limit(make_node):
    node = make_node(node={"max_associations": 1})
    contexts = [(Verification, UNCOMPRESSED)]
    with association(node.port, contexts) as first:
        assert first.is_established
        with association(node.port, contexts, calling="SECOND") as second:
            assert second.is_rejected
            assert reject_reason(second) == (
                AssociateResult.REJECTED_TRANSIENT,
                AssociateSource.SERVICE_PROVIDER_PRESENTATION,
                AssociateDiagnostic.LOCAL_LIMIT_EXCEEDED,
            )


# --- logs --------------------------------------------------------------------------


def test_logs_name_uids_and_never_patient_data(node, tmp_path, log_output, monkeypatch):
    stored = synthetic.mammogram()
    not_mg = synthetic.mammogram(sop_class_uid=SecondaryCaptureImageStorage)
    not_mg.Modality = "OT"
    no_uid = synthetic.mammogram()
    no_uid_sop = no_uid.SOPInstanceUID
    del no_uid.SOPInstanceUID
    no_uid_path = raw_part10(
        tmp_path / "no-uid.dcm",
        dataset_bytes=encode_explicit(no_uid),
        transfer_syntax=ExplicitVRLittleEndian,
        sop_instance_uid=no_uid_sop,
    )
    contexts = [(MG, UNCOMPRESSED), (SecondaryCaptureImageStorage, UNCOMPRESSED)]
    with association(node.port, contexts) as assoc:
        assert assoc.send_c_store(stored).Status == StoreStatus.SUCCESS
        assert assoc.send_c_store(stored).Status == StoreStatus.SUCCESS  # duplicate
        assert assoc.send_c_store(not_mg).Status == StoreStatus.SOP_CLASS_NOT_SUPPORTED
    with raw_sending(monkeypatch):
        assert send(node.port, no_uid_path).Status == StoreStatus.CANNOT_UNDERSTAND
    assert echoscu(node.port, called="WRONG").returncode != 0

    output = log_output()
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    names = {event["event"] for event in events}
    expected = {"instance_stored", "instance_duplicate", "instance_refused", "association_rejected"}
    assert expected <= names
    (stored_event,) = [e for e in events if e["event"] == "instance_stored"]
    assert stored_event["sop_instance_uid"] == stored.SOPInstanceUID
    assert stored_event["study_uid"] == stored.StudyInstanceUID
    assert stored_event["calling_ae"] == SENDER_AE
    assert stored_event["assoc_id"]
    assert stored_event["bytes"] > 0
    for phi in (
        synthetic.FAKE_PATIENT_NAME,
        "PHANTOM",
        synthetic.FAKE_PATIENT_ID,
        synthetic.FAKE_BIRTH_DATE,
        synthetic.FAKE_ACCESSION,
    ):
        assert phi not in output


def test_refused_image_types_are_logged_with_sop_class_and_caller(node, log_output):
    """A PACS administrator who routes CT here can read in the node's log why nothing came."""
    with association(node.port, [(CTImageStorage, UNCOMPRESSED), (MG, UNCOMPRESSED)], calling="ROUTER") as assoc:
        assert assoc.is_established
    ds = synthetic.mammogram(sop_class_uid=SecondaryCaptureImageStorage)
    ds.Modality = "CT"
    assert send(node.port, ds, sop_class=SecondaryCaptureImageStorage).Status == StoreStatus.SOP_CLASS_NOT_SUPPORTED
    events = [json.loads(line) for line in log_output().splitlines() if line.startswith("{")]
    (negotiation,) = [e for e in events if e["event"] == "sop_classes_refused"]
    assert negotiation["sop_class_uids"] == [CTImageStorage] and negotiation["sop_classes"] == ["CT Image Storage"]
    assert negotiation["calling_ae"] == "ROUTER" and negotiation["peer"] == "127.0.0.1"
    (refused,) = [e for e in events if e["event"] == "instance_refused"]
    assert refused["sop_class_uid"] == SecondaryCaptureImageStorage and "Modality CT" in refused["reason"]
    assert refused["calling_ae"] == SENDER_AE


def test_a_file_removed_between_its_rename_and_its_row_is_written_again(node, monkeypatch):
    """Retention may remove a delivered study's files in the moment between persist_instance
    finding an instance's file already there (a resend) and the new row's commit; the row is
    then the only record of an acknowledged instance, so its file must exist again."""
    record = node.queue.record_instance

    def purge_then_record(**row):
        Path(row["path"]).unlink()  # what Queue.purge_study's transaction does to the file
        return record(**row)

    monkeypatch.setattr(node.queue, "record_instance", purge_then_record)
    ds = synthetic.mammogram()
    assert send(node.port, ds).Status == StoreStatus.SUCCESS
    (stored,) = stored_files(node.data_dir)
    assert stored.name == f"{ds.SOPInstanceUID}.dcm"
    assert dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
