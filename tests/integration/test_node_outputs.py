"""Per-destination outputs against a real Orthanc: a destination that takes the GSPS and the
TID 1500 structured report gets exactly one of each per study, both dciodvfy-clean, showing
the same boxes on the same images; each is its own delivery, recorded in the ledger."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from dicom_node.queue import Queue
from tests.dciodvfy import assert_dciodvfy_clean
from tests.report.test_sr import rois, statements

from .dcmtk import storescu
from .gsps_read import GSPS_SOP_CLASS, boxes_by_image, texts_by_image
from .process import wait_for
from .test_node_roundtrip import RELATIVE_BOX, fixed_boxes_file, gsps_for_study, start_node, study_in_syntaxes

pytestmark = pytest.mark.integration

SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
TIMEOUT_SECONDS = 180


def reports_for_study(orthanc, study_uid: str) -> list[pydicom.Dataset]:
    return gsps_for_study(orthanc, study_uid, SR_SOP_CLASS)


def test_a_destination_taking_gsps_and_sr_gets_one_of_each_showing_the_same_boxes(tmp_path, orthanc):
    boxes = fixed_boxes_file(tmp_path, [RELATIVE_BOX])
    node = start_node(tmp_path, orthanc, {"architecture": "fixed_boxes", "weights": str(boxes), "score_threshold": 0.5},
                      outputs=["gsps", "sr"])
    try:
        files = study_in_syntaxes(tmp_path, ["explicit-little", "explicit-little", "explicit-little"])
        sent = [pydicom.dcmread(f) for f in files]
        study_uid = str(sent[0].StudyInstanceUID)
        assert storescu(files, node.port, "DICOM_NODE").ok

        def both_arrived():
            if node.process.poll() is not None:
                raise RuntimeError(f"dicom-node exited:\n{node.output()}")
            return gsps_for_study(orthanc, study_uid) and reports_for_study(orthanc, study_uid)

        wait_for(both_arrived, TIMEOUT_SECONDS, description="the GSPS and the SR in Orthanc")
        wait_for(lambda: len(node.events("delivery_done")) >= 2, 30, description="both deliveries logged")
        (gsps,) = gsps_for_study(orthanc, study_uid)
        (sr,) = reports_for_study(orthanc, study_uid)
        for ds in (gsps, sr):
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert_dciodvfy_clean(path)

        # The same boxes on the same images, and the same statement on each.
        in_gsps, in_sr, said = boxes_by_image(gsps), rois(sr), statements(sr)
        for ds in sent:
            uid = str(ds.SOPInstanceUID)
            (gsps_box,) = in_gsps[uid]
            ((polyline, certainty, _),) = in_sr[uid]
            x0, y0, x1, y1 = gsps_box
            assert np.allclose(polyline, [x0, y0, x1, y0, x1, y1, x0, y1, x0, y0])
            assert certainty == pytest.approx(100 * RELATIVE_BOX[4], abs=0.05)
            assert said[uid] in texts_by_image(gsps)[uid]
        assert sr.SeriesInstanceUID != gsps.SeriesInstanceUID
        assert "TEST DOUBLE" in json.dumps([str(i.get("TextValue", "")) for i in _items(sr)])

        # Each output is its own delivery, done once; the ledger names both.
        queue = Queue(f"sqlite:///{tmp_path / 'data' / 'dicom-node.sqlite'}")
        try:
            (job,) = queue.list_jobs(state="done")
        finally:
            queue.close()
        assert sorted((d.destination, d.output, d.state) for d in job.deliveries) == [
            ("orthanc", "gsps", "done"), ("orthanc", "sr", "done")]
        ledger = json.loads((tmp_path / "data" / "results" / "delivered" / f"{study_uid}.json").read_text())
        entries = {entry["output"]: entry for entry in ledger["results"]}
        assert set(entries) == {"gsps", "sr"}
        assert entries["sr"]["result_sop_instance_uid"] == sr.SOPInstanceUID
        assert set(entries["sr"]["sop_instance_uids"]) == {str(ds.SOPInstanceUID) for ds in sent}
        assert len(orthanc.client.find_by_sop_class(GSPS_SOP_CLASS)) >= 1
    finally:
        status = node.stop()
        print(node.output())
        assert status == 0


def _items(node):
    for item in node.get("ContentSequence", []):
        yield item
        yield from _items(item)


def test_an_image_that_comes_late_gets_results_that_replace_the_first(tmp_path, orthanc):
    boxes = fixed_boxes_file(tmp_path, [RELATIVE_BOX])
    node = start_node(tmp_path, orthanc, {"architecture": "fixed_boxes", "weights": str(boxes), "score_threshold": 0.5},
                      outputs=["gsps", "sr"])
    try:
        files = study_in_syntaxes(tmp_path, ["explicit-little"] * 3)
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert storescu(files[:2], node.port, "DICOM_NODE").ok
        wait_for(lambda: gsps_for_study(orthanc, study_uid) and reports_for_study(orthanc, study_uid),
                 TIMEOUT_SECONDS, description="the first GSPS and SR")
        (first_gsps,), (first_sr,) = gsps_for_study(orthanc, study_uid), reports_for_study(orthanc, study_uid)

        assert storescu(files[2:], node.port, "DICOM_NODE").ok  # the third image, late
        wait_for(lambda: len(gsps_for_study(orthanc, study_uid)) == 2 and len(reports_for_study(orthanc, study_uid)) == 2,
                 TIMEOUT_SECONDS, description="the second GSPS and SR")
        gsps = next(ds for ds in gsps_for_study(orthanc, study_uid) if ds.SOPInstanceUID != first_gsps.SOPInstanceUID)
        sr = next(ds for ds in reports_for_study(orthanc, study_uid) if ds.SOPInstanceUID != first_sr.SOPInstanceUID)
        for ds in (gsps, sr):
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert_dciodvfy_clean(path)

        # In the earlier result's series, as its next instance, saying what it replaces and why.
        assert (gsps.SeriesInstanceUID, int(gsps.InstanceNumber)) == (first_gsps.SeriesInstanceUID, 2)
        assert (sr.SeriesInstanceUID, int(sr.InstanceNumber)) == (first_sr.SeriesInstanceUID, 2)
        notes = {t for texts in texts_by_image(gsps).values() for t in texts if t.startswith("Replaces")}
        assert len(notes) == 1 and notes.pop().endswith(": 1 image arrived after it")
        (predecessor,) = [image for study in sr.PredecessorDocumentsSequence
                          for series in study.ReferencedSeriesSequence for image in series.ReferencedSOPSequence]
        assert predecessor.ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
        comments = [str(i.TextValue) for i in sr.ContentSequence if i.ValueType == "TEXT"]
        assert any(c.startswith("Replaces") and c.endswith("1 image arrived after it") for c in comments)
        assert len(boxes_by_image(gsps)) == 3  # the new result covers the whole study
    finally:
        status = node.stop()
        print(node.output())
        assert status == 0
