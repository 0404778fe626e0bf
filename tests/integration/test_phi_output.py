"""No patient data in anything a running node prints, and every line is JSON (issue #8, point 5).

A real `dicom-node serve` (the fixed-boxes detector, so that every GSPS has graphics)
receives studies from dcmtk storescu whose patient data sits in the usual attributes and in
odd ones (tests/synthetic.with_patient), with the name written with carets, without carets
(highdicom then warns, quoting it) and with odd characters. Each study is received,
analysed, reported (GSPS) and delivered to a real Orthanc. Then every line the node printed,
from its main process and its worker, on stdout and stderr, must be one JSON object, and
none may hold any of the patient values, in any case, nor a part of one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from tests import phi_guard, synthetic

from .dcmtk import storescu
from .gsps_read import GSPS_SOP_CLASS, boxes_by_image, referenced_images
from .node_process import NodeProcess, write_config
from .process import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RELATIVE_BOX = (0.25, 0.30, 0.50, 0.55, 0.91)
TIMEOUT_SECONDS = 240


def start_node(tmp_path: Path, orthanc) -> NodeProcess:
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"label": "TEST DOUBLE: fixed boxes", "boxes": [list(RELATIVE_BOX)]}))
    config = write_config(
        tmp_path / "node.toml",
        {
            "node": {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": 0, "data_dir": str(tmp_path / "data")},
            "study": {"stable_seconds": 1},
            "workers": {"count": 1, "device": "cpu"},
            "detector": {"architecture": "fixed_boxes", "weights": str(boxes), "score_threshold": 0.5},
            "delivery": {"retry_backoff_seconds": 1, "max_backoff_seconds": 5},
        },
        destinations=[{"name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                       "port": orthanc.dicom_port}],
    )
    return NodeProcess(config).start()


def study_of(patient: synthetic.FakePatient, name: str, folder: Path) -> list[Path]:
    """Two images (L and R CC) of one study, carrying `patient` with this Patient's Name."""
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = []
    for index, laterality in enumerate("LR"):
        ds = synthetic.mammogram(study_uid=study_uid, series_uid=series_uid, laterality=laterality,
                                 seed=index, rows=160, columns=128)
        ds.InstanceNumber = index + 1
        synthetic.with_patient(ds, patient, name=name)
        paths.append(synthetic.write(ds, folder / f"{ds.SOPInstanceUID}.dcm"))
    return paths


def delivered_gsps(orthanc, study_uid: str) -> list[pydicom.Dataset]:
    return [
        ds for ds in map(orthanc.client.instance_dataset, orthanc.client.find_by_sop_class(GSPS_SOP_CLASS))
        if ds.StudyInstanceUID == study_uid
    ]


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_nothing_the_node_prints_holds_patient_data_and_every_line_is_json(tmp_path, orthanc):
    patients = [synthetic.fake_patient() for _ in range(3)]
    names = [patients[0].name, patients[1].name_without_carets, patients[2].name_with_odd_characters]
    studies = [study_of(p, name, tmp_path / f"study-{i}") for i, (p, name) in enumerate(zip(patients, names))]

    node = start_node(tmp_path, orthanc)
    try:
        for files in studies:
            result = storescu(files, node.port, "DICOM_NODE")
            assert result.ok, result.output
        for files, name in zip(studies, names, strict=True):
            sent = [pydicom.dcmread(f) for f in files]
            study_uid = str(sent[0].StudyInstanceUID)

            def arrived(study_uid=study_uid):
                if node.process.poll() is not None:
                    raise RuntimeError(f"dicom-node exited:\n{node.output()}")
                return delivered_gsps(orthanc, study_uid)

            (gsps,) = wait_for(arrived, TIMEOUT_SECONDS, description=f"the GSPS of study {study_uid}")
            # Received, analysed, reported with graphics and delivered, for this patient.
            assert referenced_images(gsps) == {str(ds.SOPInstanceUID) for ds in sent}
            assert all(boxes_by_image(gsps).get(str(ds.SOPInstanceUID)) for ds in sent)
            assert str(gsps.PatientName) == name
        wait_for(lambda: len(node.events("delivery_done")) >= len(studies), 60, description="deliveries logged")
    finally:
        status = node.stop()
        print(node.output())  # shown by pytest when the test failed
    assert status == 0, "dicom-node did not exit 0 on SIGTERM"

    # The name without carets made highdicom warn, quoting it: the warning is a JSON event.
    assert any(e.get("at", "").startswith("highdicom/") for e in node.events("library_warning")), node.output()
    assert len(node.events("job_done")) == len(studies)
    # The test reads stdout and stderr as one stream: the one human line serve prints on
    # stdout at start (its own words, no received value) is the only line not JSON.
    not_json = [line for line in node.lines if not is_json_object(line)]
    start_lines = [line for line in not_json if line.startswith("dicom-node: receiving as DICOM_NODE on ")]
    assert len(start_lines) == 1, not_json
    assert [line for line in not_json if line not in start_lines] == [], (
        "lines that are not one JSON object:\n" + "\n".join(not_json[:20]))
    found = phi_guard.find_phi([("dicom-node serve", node.output())])
    assert found == [], "patient data in the node's output:\n" + "\n".join(
        f"{f.needle!r}: {f.line[:300]}" for f in found[:20]
    )
