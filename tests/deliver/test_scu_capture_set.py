"""Sending a result of several files (a study's burned-in captures) with send_files: one
association for all, JPEG 2000 Lossless where the peer takes it, decompressed (the same
instance: same SOP Instance UID, same pixels) where it takes only uncompressed, and every
file sent again after a failure. Real peers: pynetdicom SCPs and dcmtk storescp."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dciodvfy import assert_dciodvfy_clean
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom.sop_class import SecondaryCaptureImageStorage
from synthetic import mammogram

from dicom_node.config import ReportConfig
from dicom_node.deliver.scu import send_files
from dicom_node.errors import RetryableError
from dicom_node.model.detector import Detection
from dicom_node.report.capture import build_capture

from .conftest import running_storescp

CALLING_AE = "DICOM_NODE"
OUT_OF_RESOURCES = 0xA700


@pytest.fixture
def capture_files(tmp_path):
    """Two captures of one study as the worker writes them (JPEG 2000 Lossless)."""
    study, series = generate_uid(), generate_uid()
    paths = []
    for number, laterality in enumerate("LR", start=1):
        image = mammogram(study_uid=study, laterality=laterality, seed=number, rows=200, columns=160)
        capture = build_capture(image, [Detection(box=(40, 60, 90, 120), score=0.9)], report=ReportConfig(),
                                sop_instance_uid=generate_uid(), series_instance_uid=series, instance_number=number)
        path = tmp_path / "captures" / f"{capture.SOPInstanceUID}.dcm"
        path.parent.mkdir(exist_ok=True)
        capture.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_all_captures_go_on_one_association_compressed(scp, capture_files):
    associations, syntaxes = set(), []

    def keep(event, _release):
        associations.add(id(event.assoc))
        syntaxes.append(event.context.transfer_syntax)
        return 0x0000

    peer = scp(handler=keep, contexts=(SecondaryCaptureImageStorage,))
    send_files(capture_files, peer.destination, calling_ae_title=CALLING_AE, timeout=10)
    assert peer.received == [pydicom.dcmread(p).SOPInstanceUID for p in capture_files]
    assert len(associations) == 1
    assert syntaxes == [JPEG2000Lossless, JPEG2000Lossless]


@pytest.fixture
def uncompressed_storescp(tmp_path):
    """dcmtk storescp with its default transfer syntaxes: uncompressed only."""
    with running_storescp(tmp_path / "received") as peer:
        yield peer


def test_a_peer_that_takes_only_uncompressed_gets_the_same_instances_decompressed(uncompressed_storescp, capture_files):
    send_files(capture_files, uncompressed_storescp.destination, calling_ae_title=CALLING_AE, timeout=10)

    received = {ds.SOPInstanceUID: (path, ds) for path in uncompressed_storescp.output.iterdir()
                for ds in [pydicom.dcmread(path)]}
    assert len(received) == 2
    for sent_path in capture_files:
        sent = pydicom.dcmread(sent_path)
        path, got = received[sent.SOPInstanceUID]
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert got.PhotometricInterpretation == "RGB"
        np.testing.assert_array_equal(got.pixel_array, sent.pixel_array)  # lossless: the same pixels
        assert (got.SeriesInstanceUID, got.InstanceNumber) == (sent.SeriesInstanceUID, sent.InstanceNumber)
        assert_dciodvfy_clean(path)


def test_a_failure_on_one_capture_fails_the_whole_send_and_the_next_sends_all_again(scp, capture_files):
    refuse_second = [True]

    def second_refused(event, _release):
        if refuse_second[0] and str(event.dataset.SOPInstanceUID) == str(pydicom.dcmread(capture_files[1]).SOPInstanceUID):
            return OUT_OF_RESOURCES
        return 0x0000

    peer = scp(handler=second_refused, contexts=(SecondaryCaptureImageStorage,))
    with pytest.raises(RetryableError, match="0xA700"):
        send_files(capture_files, peer.destination, calling_ae_title=CALLING_AE, timeout=10)
    refuse_second[0] = False
    send_files(capture_files, peer.destination, calling_ae_title=CALLING_AE, timeout=10)
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in capture_files]
    assert peer.received == [*uids, *uids]
