"""Small synthetic mammograms for tests: valid MG DICOM with fake identifiers, no patient data.

These are plain gradients with a bright disc where a test wants a "mass"; the realistic
phantoms for training live in dicom_node.lab.phantom. Transcoding to compressed transfer
syntaxes uses the real dcmtk tools (see `transcode`).
"""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

# Obviously fake identifiers: tests check that none of these reach a log line.
FAKE_PATIENT_NAME = "PHANTOM^JANE^SYNTHETIC"
FAKE_PATIENT_ID = "SYNTH-PID-4711"
FAKE_BIRTH_DATE = "19700101"
FAKE_ACCESSION = "SYNTHACC0815"


# Letters that rarely stand together in any language: a fresh fake name made of them is
# found by a plain substring search, component by component (tests/phi_guard.py).
_RARE_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"


@dataclass(frozen=True)
class FakePatient:
    """Fresh, distinctive fake patient data (``fake_patient()``): every word starts with ZQ."""

    family: str
    given: str
    middle: str
    patient_id: str
    birth_date: str  # DA, YYYYMMDD, in the 1890s (no other date in the tests is)
    accession: str

    @property
    def name(self) -> str:
        """PN with carets, as PS3.5 6.2.1.2 writes it: ``ZQXWVB^ZQKJHG``."""
        return f"{self.family}^{self.given}"

    @property
    def name_without_carets(self) -> str:
        """As many systems write it anyway: ``ZQXWVB ZQKJHG`` (a single-component PN)."""
        return f"{self.family} {self.given}"

    @property
    def name_with_odd_characters(self) -> str:
        """Apostrophe, hyphen, non-ASCII letters, a quote, an ideographic group (UTF-8)."""
        return f"{self.family}-\u00d8'{self.middle}^{self.given} \"\u00dc\"=\u30ba\u30ad"

    @property
    def words(self) -> tuple[str, ...]:
        """The distinctive parts: each must be absent from any output on its own."""
        return (self.family, self.given, self.middle, self.patient_id, self.accession)


# Every FakePatient handed out in this process; tests/phi_guard.py searches all output for them.
ISSUED_PATIENTS: list[FakePatient] = []


def fake_patient(seed: int | None = None) -> FakePatient:
    """A fresh fake patient, different in every test (and recorded in ISSUED_PATIENTS)."""
    rng = random.Random(seed)

    def word(n: int) -> str:
        return "ZQ" + "".join(rng.choice(_RARE_LETTERS) for _ in range(n))

    born = date(1890, 1, 1) + timedelta(days=rng.randrange(3650))
    patient = FakePatient(
        family=word(6), given=word(6), middle=word(5),
        patient_id=f"ZQPID{rng.randrange(10**8):08d}",
        birth_date=born.strftime("%Y%m%d"),
        accession=f"ZQACC{rng.randrange(10**8):08d}",
    )  # fmt: skip
    ISSUED_PATIENTS.append(patient)
    return patient


def with_patient(ds: Dataset, patient: FakePatient, *, name: str | None = None) -> Dataset:
    """``ds`` with ``patient``'s data in its usual attributes and in odd places.

    Odd places, where a careless log line or dump would find them: Other Patient IDs
    Sequence, a private block, Patient Comments, Referring Physician's Name, and a
    sequence nested two levels deep. ``name``: the Patient's Name to use (default
    ``patient.name``), e.g. ``patient.name_without_carets``.
    """
    name = patient.name if name is None else name
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, for the odd characters
    ds.PatientName = name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.AccessionNumber = patient.accession
    ds.ReferringPhysicianName = name
    ds.PatientComments = f"{name}, born {patient.birth_date}, ID {patient.patient_id}, accession {patient.accession}"
    other = Dataset()
    other.PatientID = patient.patient_id
    other.IssuerOfPatientID = patient.name_without_carets
    ds.OtherPatientIDsSequence = Sequence([other])
    block = ds.private_block(0x0029, "DICOM NODE TESTS", create=True)
    block.add_new(0x01, "LO", patient.name_without_carets)
    block.add_new(0x02, "LO", patient.patient_id)
    block.add_new(0x03, "DA", patient.birth_date)
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = f"{name} {patient.accession}"
    request = Dataset()
    request.AccessionNumber = patient.accession
    request.RequestedProcedureID = patient.patient_id[-16:]
    request.IssuerOfAccessionNumberSequence = Sequence([issuer])
    ds.RequestAttributesSequence = Sequence([request])
    return ds


def mammogram(
    *,
    rows: int = 256,
    columns: int = 192,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    laterality: str = "L",
    view: str = "CC",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    sop_class_uid: str = DigitalMammographyXRayImageStorageForPresentation,
    masses: tuple[tuple[float, float, float], ...] = (),
    seed: int = 0,
) -> Dataset:
    """One MG For Presentation image; `masses` are (row, col, radius) in pixels."""
    rng = np.random.default_rng(seed)
    max_value = (1 << bits_stored) - 1
    yy, xx = np.mgrid[0:rows, 0:columns]
    image = 0.25 + 0.2 * (xx / columns) + 0.02 * rng.standard_normal((rows, columns))
    for r, c, radius in masses:
        image[(yy - r) ** 2 + (xx - c) ** 2 <= radius**2] += 0.4
    pixels = np.clip(image * max_value, 0, max_value).astype(np.uint16)
    if photometric == "MONOCHROME1":
        pixels = (max_value - pixels).astype(np.uint16)

    now = datetime(2026, 1, 2, 3, 4, 5)
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = FAKE_PATIENT_NAME
    ds.PatientID = FAKE_PATIENT_ID
    ds.PatientBirthDate = FAKE_BIRTH_DATE
    ds.PatientSex = "F"
    ds.AccessionNumber = FAKE_ACCESSION
    ds.StudyID = "1"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.Modality = "MG"
    ds.Manufacturer = "dicom-node tests"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.BurnedInAnnotation = "NO"
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.1, 0.1]
    ds.WindowCenter = max_value // 2
    ds.WindowWidth = max_value
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelData = pixels.tobytes()

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def study(
    folder: Path, *, n_images: int = 2, study_uid: str | None = None, **kwargs
) -> list[Path]:
    """Write one study of `n_images` (L/R CC) into `folder`; returns the file paths."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for index in range(n_images):
        ds = mammogram(
            study_uid=study_uid,
            series_uid=series_uid,
            laterality="LR"[index % 2],
            seed=index,
            **kwargs,
        )
        ds.InstanceNumber = index + 1
        paths.append(write(ds, folder / f"{ds.SOPInstanceUID}.dcm"))
    return paths


# dcmtk converters and their options for each compressed transfer syntax.
DCMTK_TRANSCODERS = {
    "jpeg-lossless-sv1": ["dcmcjpeg", "+e1"],  # JPEG Lossless, First-Order Prediction (SV1)
    "jpeg-extended": ["dcmcjpeg", "+ee"],  # JPEG Extended (Process 2 & 4), 12-bit
    "jpeg-baseline": ["dcmcjpeg", "+eb"],  # JPEG Baseline (8-bit only)
    "jpeg-ls-lossless": ["dcmcjpls", "+el"],
    "jpeg-ls-near-lossless": ["dcmcjpls", "+en"],
    "rle": ["dcmcrle"],
    "deflated": ["dcmconv", "+td"],
    "implicit-little": ["dcmconv", "+ti"],
    "explicit-little": ["dcmconv", "+te"],
}


def transcode(source: Path, target: Path, syntax: str) -> Path:
    """Re-encode `source` into `syntax` with the dcmtk tool for it (real encoder)."""
    command = [*DCMTK_TRANSCODERS[syntax], str(source), str(target)]
    subprocess.run(command, check=True, capture_output=True)
    return target


def compress_jpeg2000(source: Path, target: Path, *, lossless: bool = True) -> Path:
    """Re-encode `source` as JPEG 2000 (lossless, or lossy at 10:1) with pydicom + OpenJPEG."""
    from pydicom import dcmread
    from pydicom.uid import JPEG2000, JPEG2000Lossless

    ds = dcmread(source)
    if lossless:
        ds.compress(JPEG2000Lossless)
    else:
        ds.compress(JPEG2000, j2k_cr=[10])
    ds.save_as(target, enforce_file_format=True)
    return target
# storescu proposes uncompressed syntaxes only, unless told which compressed one
# to put first (it then sends the file as it is instead of decompressing it).
STORESCU_PROPOSE = {
    "implicit-little": "--propose-implicit",
    "explicit-little": "--propose-little",
    "deflated": "--propose-deflated",
    "jpeg-baseline": "--propose-jpeg8",
    "jpeg-extended": "--propose-jpeg12",
    "jpeg-lossless-sv1": "--propose-lossless",
    "jpeg-ls-lossless": "--propose-jls-lossless",
    "jpeg-ls-near-lossless": "--propose-jls-lossy",
    "jpeg2000-lossless": "--propose-j2k-lossless",
    "jpeg2000": "--propose-j2k-lossy",
    "rle": "--propose-rle",
}


