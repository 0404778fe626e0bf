"""The library settings every process makes (dicom_node.libraries), provoked for real."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass

import pydicom
import pydicom.config
import pytest
from pydicom.uid import generate_uid

from dicom_node.config import ReportConfig
from dicom_node.libraries import configure_libraries
from dicom_node.log import configure_logging
from dicom_node.report.gsps import build_gsps
from tests import synthetic


@dataclass
class Box:
    box: tuple[float, float, float, float]
    score: float = 0.9
    label: str = "mass"


@pytest.fixture
def configured(capsys):
    """This process set up as the node sets up its processes; returns the events logged since."""
    with warnings.catch_warnings():  # pytest's own warning capture comes back afterwards
        configure_logging("info", "json")
        configure_libraries()
        capsys.readouterr()
        yield lambda: [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_highdicom_warning_about_a_name_without_carets_is_a_redacted_event(configured):
    patient = synthetic.fake_patient()
    ds = synthetic.with_patient(synthetic.mammogram(), patient, name=patient.name_without_carets)
    build_gsps([ds], {str(ds.SOPInstanceUID): [Box((10, 10, 50, 50))]}, report=ReportConfig(),
               sop_instance_uid=generate_uid(), series_instance_uid=generate_uid())
    events = configured()
    warned = [e for e in events if e["event"] == "library_warning"]
    assert warned and all(e["at"].startswith("highdicom/") for e in warned), events
    assert {e["category"] for e in warned} == {"UserWarning"}
    assert {e["message"] for e in warned} == {"The string ..."}
    text = json.dumps(events).lower()
    for word in patient.words:
        assert word.lower() not in text


def warn_about(name: str) -> None:
    warnings.warn(f'The string "{name}" is unlikely to represent the intended person name', UserWarning, stacklevel=1)


def test_each_distinct_redacted_warning_is_logged_once_and_not_remembered_per_name(configured):
    names = [synthetic.fake_patient().name_without_carets for _ in range(3)]
    for name in names:
        warn_about(name)
    events = [e for e in configured() if e["event"] == "library_warning"]
    assert len(events) == 1, events
    # Python's registry of shown warnings would hold one entry per patient name.
    registry = globals().get("__warningregistry__", {})
    assert not any(name in str(key) for key in registry for name in names)


def test_pynetdicom_records_are_redacted_for_every_handler(configured, caplog):
    caplog.set_level(logging.WARNING)
    uid = f"1.2.{synthetic.FAKE_PATIENT_NAME}"
    logging.getLogger("pynetdicom.dsutils").error(f"Non-conformant 'Affected SOP Instance UID' value '{uid}'")
    assert caplog.records, "the record did not reach pytest's handler"
    assert synthetic.FAKE_PATIENT_NAME not in caplog.text
    assert caplog.records[-1].getMessage() == "Non-conformant ..."


def test_reading_an_invalid_value_is_quiet(configured, tmp_path):
    ds = synthetic.mammogram()
    with pydicom.config.disable_value_validation():
        ds.PatientBirthDate = synthetic.FAKE_PATIENT_NAME  # no date: pydicom would warn, quoting it
        path = synthetic.write(ds, tmp_path / "invalid.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = pydicom.dcmread(path)
        assert str(read.PatientBirthDate) == synthetic.FAKE_PATIENT_NAME
    assert [str(w.message) for w in caught] == []
