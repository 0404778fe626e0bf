"""What every result of a study (GSPS, structured report, burned-in capture) shares: the
checks of the builders' arguments, normalised copies of the source images, the analysed
frame, the boxes clipped to an image, and the words that say what happened to each image.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from highdicom._standard_utils import (
    does_iod_have_pixel_data,  # pinned highdicom 0.28.2
)
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import DA, TM

from dicom_node.log import get_logger

log = get_logger("dicom_node.report")

MODEL_NAME = "dicom-node"
AI_NOTICE = "AI, not for diagnosis"
# What a result of the demo weights says of itself (series description, burned-in captures).
DEMO_SERIES_DESCRIPTION = "DEMO WEIGHTS, synthetic masses only - NOT FOR DIAGNOSIS"

# Bulk data that the references never need: dropped from the working copies.
_BULK_TAGS = frozenset(
    Tag(keyword)
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "IconImageSequence")
)
# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that
# highdicom reads from the first image whether present or not.
_TYPE2_TEXT = ("PatientName", "PatientID", "AccessionNumber", "StudyID", "ReferringPhysicianName")


class DetectionLike(Protocol):
    """What the builder needs of a detection (dicom_node.model.detector.Detection)."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels
    score: float
    label: str


def index_images(images: Sequence[Dataset]) -> dict[str, Dataset]:
    if not images:
        raise ValueError("images must not be empty")
    by_uid: dict[str, Dataset] = {}
    study_uids = set()
    for ds in images:
        uid = str(ds.SOPInstanceUID)
        if uid in by_uid:
            raise ValueError(f"image {uid} is listed twice")
        by_uid[uid] = ds
        study_uids.add(str(ds.StudyInstanceUID))
    if len(study_uids) > 1:
        raise ValueError(f"images belong to {len(study_uids)} studies; one result covers one study")
    return by_uid


def check_arguments(
    by_uid: Mapping[str, Dataset],
    detections: Mapping[str, Sequence[DetectionLike]],
    skipped: Mapping[str, str],
) -> None:
    unknown = sorted(set(detections) - set(by_uid))
    if unknown:
        raise ValueError(f"detections for images not in images: {unknown}")
    both = sorted(set(detections) & set(skipped))
    if both:
        raise ValueError(f"images both analysed and skipped: {both}")
    # Leaving an image out of both would make "not analysed" look like "nothing found".
    neither = sorted(set(by_uid) - set(detections) - set(skipped))
    if neither:
        raise ValueError(f"images neither in detections nor in skipped: {neither}")


def unreferenceable(ds: Dataset) -> str | None:
    """Why `ds` cannot be referenced by a grayscale presentation state, or None."""
    for keyword in ("SOPClassUID", "SeriesInstanceUID", "Rows", "Columns"):
        if not ds.get(keyword):
            return f"no {keyword}"
    if not does_iod_have_pixel_data(ds.SOPClassUID):
        return "not an image"
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return "not a grayscale image"  # PS3.3 A.33.1: grayscale images only
    return None


def normalised_copy(ds: Dataset) -> Dataset:
    """A copy of `ds` without pixel data, with valid Type 2 patient and study attributes."""
    result = Dataset()
    for tag in ds.keys():
        if tag in _BULK_TAGS or tag.is_private:
            continue
        result[tag] = copy.deepcopy(ds[tag])
    for keyword in _TYPE2_TEXT:
        if keyword not in result:
            setattr(result, keyword, "")
    result.PatientBirthDate = _valid_or_empty(result.get("PatientBirthDate"), DA)
    result.StudyDate = _valid_or_empty(result.get("StudyDate"), DA)
    result.StudyTime = _valid_or_empty(result.get("StudyTime"), TM)
    # PS3.3 C.7.1.1: Patient's Sex is M, F, O or empty; highdicom refuses anything else.
    sex = str(result.get("PatientSex") or "").strip().upper()
    result.PatientSex = sex if sex in ("M", "F", "O") else ""
    return result


def _valid_or_empty(value, parse) -> str:
    if not value:
        return ""
    try:
        parsed = parse(str(value))
    except ValueError:
        return ""
    return str(value) if parsed is not None else ""


def is_multiframe(ds: Dataset) -> bool:
    return int(ds.get("NumberOfFrames") or 1) > 1


def analysed_frame(ds: Dataset, frames: Mapping[str, int]) -> int | None:
    """The 0-based frame the detector saw: from `frames`, else the central frame."""
    if not is_multiframe(ds):
        return None
    count = int(ds.NumberOfFrames)
    frame = frames.get(str(ds.SOPInstanceUID), count // 2)
    if not 0 <= frame < count:
        raise ValueError(f"frame {frame} of {ds.SOPInstanceUID} is not in 0..{count - 1}")
    return frame


def image_statement(
    prefix: str, *, marked: int = 0, frame: int | None = None, not_analysed: str | None = None
) -> str:
    """What a result says of one image, the same in every output (GSPS, SR, capture):
    ``<prefix>: 2 masses marked - AI, not for diagnosis``, ``<prefix>: analysed, no mass
    marked - ...`` or ``<prefix>: not analysed: <reason>``, so that "nothing found" can
    always be told from "not analysed". `frame`: the 0-based analysed frame of a
    multi-frame image."""
    if not_analysed is not None:
        return f"{prefix}: not analysed: {fit(not_analysed, 80)}"
    found = f"{count(marked, 'mass', 'masses')} marked" if marked else "analysed, no mass marked"
    on_frame = f" on frame {frame + 1}" if frame is not None else ""
    return f"{prefix}: {found}{on_frame} - {AI_NOTICE}"


@dataclass(frozen=True)
class Mark:
    """A detection as a result shows it: its box clipped to the image, its score, its label."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, inside the image
    score: float
    label: str

    @property
    def text(self) -> str:
        return f"{self.label} {self.score:.2f}"


def clipped_boxes(detections: Sequence[DetectionLike], image: Dataset) -> list[Mark]:
    """`_clipped_boxes` for `image`'s size, logging the detections it drops (by UID)."""
    boxes = _clipped_boxes(detections, rows=int(image.Rows), columns=int(image.Columns))
    if len(boxes) != len(detections):
        log.warning(
            "detections_outside_image", sop_instance_uid=str(image.SOPInstanceUID),
            dropped=len(detections) - len(boxes),
        )
    return boxes


def _clipped_boxes(detections: Sequence[DetectionLike], *, rows: int, columns: int) -> list[Mark]:
    """One Mark per detection, highest score first, boxes clipped to the image; empty boxes
    dropped.

    PIXEL units put 0.0 at the top left corner of the first pixel and Columns\\Rows at the
    bottom right corner of the last (PS3.3 C.10.5.1.2): the detector's convention, so the
    boxes go in unchanged, only clipped.
    """
    result = []
    for detection in sorted(detections, key=lambda d: -float(d.score)):
        x0, y0, x1, y1 = (float(v) for v in detection.box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            continue
        x0, x1 = sorted((min(max(x0, 0.0), columns), min(max(x1, 0.0), columns)))
        y0, y1 = sorted((min(max(y0, 0.0), rows), min(max(y1, 0.0), rows)))
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            continue
        result.append(Mark((x0, y0, x1, y1), float(detection.score), str(getattr(detection, "label", "mass"))))
    return result


def label_box(
    box: tuple[float, float, float, float], text: str, *, rows: int, columns: int
) -> tuple[float, float, float, float]:
    """Where a box's label goes: a text box just above `box` (below it at the top edge),
    inside the image."""
    x0, y0, x1, y1 = box
    height = min(max(rows * 0.02, 8.0), float(rows))
    width = min(max(x1 - x0, 0.6 * height * len(text)), float(columns))
    left = min(x0, columns - width)
    if y0 - height >= 0:
        top = y0 - height
    elif y1 + height <= rows:
        top = y1
    else:
        top = y0
    return (left, top, left + width, min(top + height, float(rows)))


@dataclass(frozen=True)
class Predecessor:
    """The earlier result of the same study that a new one replaces (an image came late,
    or an operator reran the study): the new one goes in its series as the next instance,
    and says which it replaces and why, so that a viewer shows the current one."""

    dataset: Dataset  # the earlier result, without bulk data
    reason: str  # "1 image arrived after it", "analysed again"

    @property
    def series_instance_uid(self) -> str:
        return str(self.dataset.SeriesInstanceUID)

    @property
    def next_instance_number(self) -> int:
        return int(self.dataset.get("InstanceNumber") or 1) + 1

    @property
    def note(self) -> str:
        day, time = str(self.dataset.get("ContentDate") or ""), str(self.dataset.get("ContentTime") or "")
        when = f" of {day[:4]}-{day[4:6]}-{day[6:8]} {time[:2]}:{time[2:4]}" if len(day) == 8 and len(time) >= 4 else ""
        return fit(f"Replaces the result{when}: {self.reason}", 120)


def count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
