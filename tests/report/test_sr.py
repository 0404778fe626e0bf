"""The TID 1500 Measurement Report: dciodvfy-clean, readable by dcmtk's dsrdump, and saying
what the GSPS says: the same boxes on the same images, one statement per image."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from dciodvfy import assert_dciodvfy_clean
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from synthetic import mammogram

from dicom_node.config import ReportConfig
from dicom_node.errors import UnsupportedImage
from dicom_node.lab.phantom import generate_phantom
from dicom_node.report.sr import build_sr
from tests.report.test_gsps import graphics, study, texts, tomosynthesis

MASS = ("4147007", "SCT")
CERTAINTY = ("111012", "DCM")


@pytest.fixture
def build_report():
    def run(images, detections, *, skipped=None, weights_label="test weights", report=None, **kwargs):
        return build_sr(
            images, detections, report=report or ReportConfig(), weights_label=weights_label,
            sop_instance_uid=generate_uid(), series_instance_uid=generate_uid(), series_number=9902,
            series_description="AI mass detection (structured report)", skipped=skipped or {}, **kwargs,
        )

    return run


@pytest.fixture
def written_report(tmp_path):
    """Write the report, check it with dciodvfy and dsrdump, read it back."""

    def run(sr) -> Dataset:
        path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
        sr.save_as(path, enforce_file_format=True)
        assert_dciodvfy_clean(path)
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout, dump.stderr
        return pydicom.dcmread(path)

    return run


def items(node: Dataset):
    """Every content item under `node`, depth first."""
    for item in node.get("ContentSequence", []):
        yield item
        yield from items(item)


def named(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def rois(sr: Dataset) -> dict[str, list[tuple[list[float], float, int | None]]]:
    """Per SOP Instance UID: (polyline, certainty %, referenced frame) of each Mass group."""
    found: dict[str, list] = {}
    for group in items(sr):
        if group.ValueType != "CONTAINER":
            continue
        children = list(group.get("ContentSequence", []))
        finding = [c for c in children if c.ValueType == "CODE" and named(c) == ("121071", "DCM")]
        if not finding or (finding[0].ConceptCodeSequence[0].CodeValue, "SCT") != MASS:
            continue
        (scoord,) = [c for c in children if c.ValueType == "SCOORD"]
        (source,) = scoord.ContentSequence
        reference = source.ReferencedSOPSequence[0]
        (certainty,) = [c for c in children if c.ValueType == "NUM" and named(c) == CERTAINTY]
        frame = reference.get("ReferencedFrameNumber")
        found.setdefault(str(reference.ReferencedSOPInstanceUID), []).append(
            ([float(v) for v in scoord.GraphicData], float(certainty.MeasuredValueSequence[0].NumericValue),
             None if frame is None else int(frame))
        )
    return found


def statements(sr: Dataset) -> dict[str, str]:
    """Per SOP Instance UID: the statement (Comment) of its image group."""
    found = {}
    for group in items(sr):
        children = list(group.get("ContentSequence", []))
        comments = [c for c in children if c.ValueType == "TEXT" and named(c) == ("121106", "DCM")]
        images = [c for c in children if c.ValueType == "IMAGE"]
        if comments and images:
            found[str(images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)] = str(comments[0].TextValue)
    return found


def rectangle(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1, x0, y0]


def test_one_roi_per_detection_on_its_image_with_its_score(build_report, written_report, detection):
    images = study(3)
    a, b, c = (str(ds.SOPInstanceUID) for ds in images)
    sr = written_report(build_report(images, {
        a: [detection(10, 20, 60, 80, score=0.87), detection(100, 30, 150, 90, score=0.42)],
        b: [detection(5, 5, 40, 50, score=0.61)],
        c: [],
    }))  # fmt: skip
    found = rois(sr)
    assert sorted(found) == sorted([a, b])
    assert sorted(found[a]) == sorted([(rectangle(10, 20, 60, 80), 87.0, None),
                                       (rectangle(100, 30, 150, 90), 42.0, None)])
    assert found[b] == [(rectangle(5, 5, 40, 50), 61.0, None)]
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.CompletionFlag == "COMPLETE"


def test_every_image_says_whether_it_was_analysed_and_what_was_found(build_report, written_report, detection):
    images = study(3)
    a, b, c = (str(ds.SOPInstanceUID) for ds in images)
    sr = written_report(build_report(images, {a: [detection(10, 20, 60, 80)], b: []},
                                     skipped={c: "image smaller than the model input"}))
    said = statements(sr)
    assert said == {
        a: "dicom-node: 1 mass marked - AI, not for diagnosis",
        b: "dicom-node: analysed, no mass marked - AI, not for diagnosis",
        c: "dicom-node: not analysed: image smaller than the model input",
    }


def test_the_algorithm_and_its_weights_are_named(build_report, written_report, detection):
    images = study(1)
    sr = written_report(build_report(images, {str(images[0].SOPInstanceUID): [detection(1, 1, 9, 9)]},
                                     weights_label="DEMO: synthetic phantoms only"))
    texts_by_name = {}
    for item in items(sr):
        if item.ValueType == "TEXT":
            texts_by_name.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, set()).add(str(item.TextValue))
    assert texts_by_name["Algorithm Name"] == {"dicom-node mass detection"}
    assert texts_by_name["Algorithm Parameters"] == {"DEMO: synthetic phantoms only"}
    assert sr.ManufacturerModelName == "dicom-node"


def test_the_report_is_filed_with_the_study_in_its_own_series(build_report, written_report):
    images = study(2)
    sr = written_report(build_report(images, {str(ds.SOPInstanceUID): [] for ds in images}))
    assert sr.StudyInstanceUID == images[0].StudyInstanceUID
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in images}
    assert (sr.SeriesNumber, sr.SeriesDescription) == (9902, "AI mass detection (structured report)")
    assert sr.PatientID == images[0].PatientID and sr.PatientName == images[0].PatientName
    evidence = {str(image.ReferencedSOPInstanceUID)
                for study_item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study_item.ReferencedSeriesSequence
                for image in series.ReferencedSOPSequence}
    assert evidence == {str(ds.SOPInstanceUID) for ds in images}


def test_images_that_carry_their_geometry_are_described_in_the_image_library(build_report, written_report):
    phantom = generate_phantom(seed=5, rows=512, columns=400).dataset
    bare = mammogram(study_uid=phantom.StudyInstanceUID)  # no Patient Orientation: left out of the library
    sr = written_report(build_report([phantom, bare], {str(phantom.SOPInstanceUID): [], str(bare.SOPInstanceUID): []}))
    (library,) = [i for i in items(sr) if i.ValueType == "CONTAINER" and named(i) == ("111028", "DCM")]
    described = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                 for i in items(library) if i.ValueType == "IMAGE"}
    assert described == {str(phantom.SOPInstanceUID)}
    assert set(statements(sr)) == {str(phantom.SOPInstanceUID), str(bare.SOPInstanceUID)}


def test_boxes_on_a_tomosynthesis_volume_reference_the_analysed_frame(build_report, written_report, detection):
    volume = tomosynthesis(generate_uid(), frames=5)
    sr = written_report(build_report([volume], {str(volume.SOPInstanceUID): [detection(4, 4, 20, 20)]},
                                     frames={str(volume.SOPInstanceUID): 1}))
    ((_, _, frame),) = rois(sr)[str(volume.SOPInstanceUID)]
    assert frame == 2  # 1-based


def test_the_report_and_the_gsps_show_the_same_boxes_on_the_same_images(build, written, build_report,
                                                                         written_report, detection):
    images = study(3)
    a, b, c = (str(ds.SOPInstanceUID) for ds in images)
    detections = {a: [detection(10, 20, 60, 80, score=0.9), detection(-5, 100, 30, 400, score=0.3)],
                  b: [detection(300, 10, 900, 60, score=0.5)], c: []}  # partly outside: both clip
    gsps = written(build(images, detections))
    sr = written_report(build_report(images, detections))
    for uid in (a, b, c):
        in_gsps = sorted(graphics(gsps, uid))
        in_sr = sorted(polyline for polyline, _, _ in rois(sr).get(uid, []))
        assert np.allclose(in_gsps, in_sr) if in_gsps else in_sr == []
        summary = [t for t in texts(gsps, uid) if t.startswith("dicom-node:")]
        assert summary == [statements(sr)[uid]]


def test_contradictory_arguments_and_unreferenceable_studies_are_refused(build_report, detection):
    images = study(2)
    with pytest.raises(ValueError, match="neither"):
        build_report(images, {str(images[0].SOPInstanceUID): []})
    report = Dataset()
    report.SOPClassUID, report.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.22", generate_uid()
    report.StudyInstanceUID, report.SeriesInstanceUID = images[0].StudyInstanceUID, generate_uid()
    with pytest.raises(UnsupportedImage, match="no image"):
        build_report([report], {}, skipped={str(report.SOPInstanceUID): "not an image"})
