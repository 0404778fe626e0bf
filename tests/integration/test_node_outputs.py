"""Per-destination outputs against a real Orthanc: a destination that takes the GSPS, the
TID 1500 structured report and the burned-in captures gets exactly one GSPS and one report
per study and one capture per analysed image, all dciodvfy-clean, showing the same boxes on
the same images (in the captures: the rectangle found in the pixels); each output is its own
delivery, recorded in the ledger."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest

from dicom_node.queue import Queue
from tests.dciodvfy import assert_dciodvfy_clean
from tests.report.test_sr import rois, statements

from .capture_read import SC_SOP_CLASS, drawn_box
from .dcmtk import storescu
from .gsps_read import GSPS_SOP_CLASS, boxes_by_image, texts_by_image
from .process import wait_for
from .test_node_roundtrip import RELATIVE_BOX, fixed_boxes_file, gsps_for_study, start_node, study_in_syntaxes

pytestmark = pytest.mark.integration

SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
TIMEOUT_SECONDS = 180


def reports_for_study(orthanc, study_uid: str) -> list[pydicom.Dataset]:
    return gsps_for_study(orthanc, study_uid, SR_SOP_CLASS)


def captures_for_study(orthanc, study_uid: str) -> list[pydicom.Dataset]:
    return gsps_for_study(orthanc, study_uid, SC_SOP_CLASS)


def captured_image(capture: pydicom.Dataset) -> str:
    (source,) = capture.SourceImageSequence
    return str(source.ReferencedSOPInstanceUID)


def test_a_destination_taking_every_output_gets_one_of_each_showing_the_same_boxes(tmp_path, orthanc):
    boxes = fixed_boxes_file(tmp_path, [RELATIVE_BOX])
    node = start_node(tmp_path, orthanc, {"architecture": "fixed_boxes", "weights": str(boxes), "score_threshold": 0.5},
                      outputs=["gsps", "sr", "sc"])
    try:
        files = study_in_syntaxes(tmp_path, ["explicit-little", "explicit-little", "explicit-little"])
        sent = [pydicom.dcmread(f) for f in files]
        study_uid = str(sent[0].StudyInstanceUID)
        assert storescu(files, node.port, "DICOM_NODE").ok

        def all_arrived():
            if node.process.poll() is not None:
                raise RuntimeError(f"dicom-node exited:\n{node.output()}")
            return len(node.events("delivery_done")) >= 3

        wait_for(all_arrived, TIMEOUT_SECONDS, description="the GSPS, the SR and the captures delivered")
        (gsps,) = gsps_for_study(orthanc, study_uid)
        (sr,) = reports_for_study(orthanc, study_uid)
        captures = captures_for_study(orthanc, study_uid)
        for ds in (gsps, sr, *captures):
            path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            assert_dciodvfy_clean(path)
        # One capture per analysed image, burned in, in a series of its own.
        assert sorted(captured_image(ds) for ds in captures) == sorted(str(ds.SOPInstanceUID) for ds in sent)
        assert len({ds.SeriesInstanceUID for ds in captures}) == 1
        assert {ds.SeriesInstanceUID for ds in captures}.isdisjoint({gsps.SeriesInstanceUID, sr.SeriesInstanceUID})
        assert all(ds.BurnedInAnnotation == "YES" for ds in captures)
        in_captures = {captured_image(ds): drawn_box(ds) for ds in captures}

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
            assert in_captures[uid] == tuple(round(v) for v in gsps_box)  # drawn on the same pixels
        assert sr.SeriesInstanceUID != gsps.SeriesInstanceUID
        assert "TEST DOUBLE" in json.dumps([str(i.get("TextValue", "")) for i in _items(sr)])

        # Each output is its own delivery, done once; the ledger names both.
        queue = Queue(f"sqlite:///{tmp_path / 'data' / 'dicom-node.sqlite'}")
        try:
            (job,) = queue.list_jobs(state="done")
        finally:
            queue.close()
        assert sorted((d.destination, d.output, d.state) for d in job.deliveries) == [
            ("orthanc", "gsps", "done"), ("orthanc", "sc", "done"), ("orthanc", "sr", "done")]
        ledger = json.loads((tmp_path / "data" / "results" / "delivered" / f"{study_uid}.json").read_text())
        entries = {entry["output"]: entry for entry in ledger["results"]}
        assert set(entries) == {"gsps", "sr", "sc"}
        assert entries["sr"]["result_sop_instance_uid"] == sr.SOPInstanceUID
        for output in ("sr", "sc"):
            assert set(entries[output]["sop_instance_uids"]) == {str(ds.SOPInstanceUID) for ds in sent}
        assert len(orthanc.client.find_by_sop_class(GSPS_SOP_CLASS)) >= 1
    finally:
        status = node.stop()
        print(node.output())
        assert status == 0


def _items(node):
    for item in node.get("ContentSequence", []):
        yield item
        yield from _items(item)


@pytest.mark.slow  # two analyses and six deliveries: 11-14 s on 2 loaded cores
def test_an_image_that_comes_late_gets_results_that_replace_the_first(tmp_path, orthanc):
    boxes = fixed_boxes_file(tmp_path, [RELATIVE_BOX])
    node = start_node(tmp_path, orthanc, {"architecture": "fixed_boxes", "weights": str(boxes), "score_threshold": 0.5},
                      outputs=["gsps", "sr", "sc"])
    try:
        files = study_in_syntaxes(tmp_path, ["explicit-little"] * 3)
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert storescu(files[:2], node.port, "DICOM_NODE").ok
        wait_for(lambda: len(node.events("delivery_done")) >= 3, TIMEOUT_SECONDS,
                 description="the first GSPS, SR and captures")
        (first_gsps,), (first_sr,) = gsps_for_study(orthanc, study_uid), reports_for_study(orthanc, study_uid)
        first_captures = captures_for_study(orthanc, study_uid)
        assert len(first_captures) == 2

        assert storescu(files[2:], node.port, "DICOM_NODE").ok  # the third image, late
        wait_for(lambda: len(node.events("delivery_done")) >= 6, TIMEOUT_SECONDS,
                 description="the second GSPS, SR and captures")
        gsps = next(ds for ds in gsps_for_study(orthanc, study_uid) if ds.SOPInstanceUID != first_gsps.SOPInstanceUID)
        sr = next(ds for ds in reports_for_study(orthanc, study_uid) if ds.SOPInstanceUID != first_sr.SOPInstanceUID)
        earlier = {ds.SOPInstanceUID for ds in first_captures}
        captures = [ds for ds in captures_for_study(orthanc, study_uid) if ds.SOPInstanceUID not in earlier]
        for ds in (gsps, sr, *captures):
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
        # The captures: the whole study again, in the earlier captures' series, numbered on.
        assert len(captures) == 3 and len(captures_for_study(orthanc, study_uid)) == 5
        assert {ds.SeriesInstanceUID for ds in captures} == {first_captures[0].SeriesInstanceUID}
        assert sorted(int(ds.InstanceNumber) for ds in captures) == [3, 4, 5]
        assert all(ds.ImageComments.startswith("Replaces") and ds.ImageComments.endswith(": 1 image arrived after it")
                   for ds in captures)
    finally:
        status = node.stop()
        print(node.output())
        assert status == 0
