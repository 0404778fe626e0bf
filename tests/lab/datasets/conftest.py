"""Fixtures for the dataset tests: a small phantom set and a fake CBIS-DDSM download."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from synthetic import mammogram, write

from dicom_node.lab.phantom import write_phantoms

PHANTOM_ROWS, PHANTOM_COLUMNS = 208, 160


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory) -> Path:
    """Eight phantoms (two studies) with their annotations.json; returns its path."""
    out = tmp_path_factory.mktemp("phantom_set")
    return write_phantoms(out, n=8, seed=1, rows=PHANTOM_ROWS, columns=PHANTOM_COLUMNS,
                          masses_per_image=(1, 2))


# ---------------------------------------------------------------- fake CBIS-DDSM

CBIS_COLUMNS = [
    "patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
    "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
    "image file path", "cropped image file path", "ROI mask file path",
]


def cbis_uid_path(folder: str, file_name: str) -> str:
    """A CSV-style path: the case folder, two UID folders, the file."""
    return f"{folder}/{generate_uid()}/{generate_uid()}/{file_name}"


def mask_dataset(mask: np.ndarray, *, description: str) -> Dataset:
    """An 8-bit secondary-capture image holding `mask` (0/255), as CBIS-DDSM masks are."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "PHANTOM^CBIS^SYNTHETIC"
    ds.PatientID = "SYNTH-CBIS"
    ds.Modality = "MG"
    ds.SeriesDescription = description
    ds.ConversionType = "WSD"
    ds.Rows, ds.Columns = mask.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = mask.astype(np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


@dataclass
class FakeCbis:
    """A tiny CBIS-DDSM-like download under `root` plus its CSV rows and expected boxes."""

    root: Path
    rows: list[dict] = field(default_factory=list)
    expected_boxes: dict[tuple[str, int], list[float]] = field(default_factory=dict)

    def add_case(
        self,
        *,
        patient: str,
        side: str = "LEFT",
        view: str = "CC",
        shape: tuple[int, int] = (120, 80),
        lesions: list[dict] = (),
        layout: str = "tcia",
        prefix: str = "Mass-Training",
        abnormality_type: str = "mass",
        write_image: bool = True,
        density: int = 2,
    ) -> None:
        """One full mammogram and its lesions.

        Each lesion: {"box": (x0, y0, x1, y1) in mask pixels, "mask_shape": (rows, cols)
        (default: the image's), "pathology": ..., "order": "mask-first"|"crop-first",
        "write": bool, "empty": bool}. ``layout`` "tcia" renames the UID folders as the
        NBIA Data Retriever does; "csv" writes the files exactly where the CSV says.
        """
        case = f"{prefix}_{patient}_{side}_{view}"
        image_csv = cbis_uid_path(case, "000000.dcm")
        if layout == "csv":
            image_file = self.root / image_csv
        else:
            image_file = self.root / "CBIS-DDSM" / case / "07-20-2016-DDSM-12345" / \
                "1.000000-full mammogram images-24515" / "1-1.dcm"
        if write_image:
            write(mammogram(rows=shape[0], columns=shape[1], laterality=side[0], view=view), image_file)
        for number, lesion in enumerate(lesions, start=1):
            lesion_folder = f"{case}_{number}"
            mask_csv = cbis_uid_path(lesion_folder, "000001.dcm")
            crop_csv = cbis_uid_path(lesion_folder, "000000.dcm")
            mask_shape = lesion.get("mask_shape", shape)
            mask = np.zeros(mask_shape, np.uint8)
            x0, y0, x1, y1 = lesion["box"]
            if not lesion.get("empty"):
                mask[y0:y1, x0:x1] = 255
            crop = np.full((max(y1 - y0, 4), max(x1 - x0, 4)), 100, np.uint8)
            if layout == "csv":
                mask_file, crop_file = self.root / mask_csv, self.root / crop_csv
            else:
                series = self.root / "CBIS-DDSM" / lesion_folder / "07-21-2016-DDSM-67890" / \
                    "1.000000-ROI mask images-11111"
                first, second = series / "1-1.dcm", series / "1-2.dcm"
                mask_file, crop_file = (first, second) if lesion.get("order") != "crop-first" else (second, first)
            if lesion.get("write", True):
                # TCIA's series holds both; only the Series Description tells them apart
                # when it is set, so half the cases leave it generic.
                generic = lesion.get("generic_description", False)
                write(mask_dataset(mask, description="ROI" if generic else "ROI mask images"), mask_file)
                write(mask_dataset(crop, description="ROI" if generic else "cropped images"), crop_file)
            self.rows.append({
                "patient_id": patient, "breast_density": str(density), "left or right breast": side,
                "image view": view, "abnormality id": str(number), "abnormality type": abnormality_type,
                "mass shape": "OVAL", "mass margins": "CIRCUMSCRIBED", "assessment": "4",
                "pathology": lesion.get("pathology", "MALIGNANT"), "subtlety": "3",
                "image file path": image_csv, "cropped image file path": crop_csv,
                # Real CBIS-DDSM mask paths often end with a newline inside the quoted field.
                "ROI mask file path": mask_csv + "\n",
            })
            self.expected_boxes[(case, number)] = lesion.get("expected")

    def write_csv(self, path: Path, rows: list[dict] | None = None) -> Path:
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CBIS_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows if rows is None else rows)
        return path


@pytest.fixture
def fake_cbis(tmp_path) -> FakeCbis:
    root = tmp_path / "download"
    root.mkdir()
    return FakeCbis(root=root)
