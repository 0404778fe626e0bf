"""Fixtures for the GSPS tests: detections, a builder with test UIDs, a write-verify-read helper."""

from __future__ import annotations

import pydicom
import pytest
from dciodvfy import assert_dciodvfy_clean
from pydicom.uid import generate_uid

from dicom_node.config import ReportConfig
from dicom_node.model.detector import Detection
from dicom_node.report.gsps import build_gsps


@pytest.fixture
def detection():
    """Detection(box, score, label="mass") with box = x0, y0, x1, y1 in original pixels."""

    def make(x0, y0, x1, y1, score=0.87, label="mass"):
        return Detection(box=(x0, y0, x1, y1), score=score, label=label)

    return make


@pytest.fixture
def build():
    """build_gsps with fresh UIDs and the default ReportConfig unless given."""

    def run(images, detections, *, report=None, skipped=None, **kwargs):
        return build_gsps(
            images,
            detections,
            report=report or ReportConfig(),
            sop_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            skipped=skipped or {},
            **kwargs,
        )

    return run


@pytest.fixture
def written(tmp_path):
    """Write a GSPS to a file, check it with dciodvfy, read it back with pydicom."""

    def run(gsps) -> pydicom.Dataset:
        path = tmp_path / f"{gsps.SOPInstanceUID}.dcm"
        gsps.save_as(path, enforce_file_format=True)
        assert_dciodvfy_clean(path)
        return pydicom.dcmread(path)

    return run
