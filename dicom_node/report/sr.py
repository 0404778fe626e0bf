"""Build the TID 1500 Measurement Report that carries the detector's boxes to viewers that
read structured reports (OHIF shows measurements from TID 1500, not presentation states).

One Comprehensive 3D SR per analysed study, in its own series, built with highdicom
(PS3.16 TID 1500 Measurement Report), with the same content as the study's GSPS
(dicom_node.report.gsps):

- the evidence (Current Requested Procedure Evidence) names every image of the study that
  can be referenced, so a PACS files the report with the study, and the Image Library
  (TID 1600) describes those that carry their orientation and pixel spacing;
- per detected mass, a Planar ROI measurement group (TID 1410): tracking identifier, finding
  "Mass" (SCT 4147007), the box as a closed POLYLINE SCOORD on the analysed image (and frame)
  in its pixel coordinates (PS3.3 C.18.6.1.1: 0,0 is the top left corner of the first
  pixel, the detector's convention), finding site the breast of that side, the score as
  Certainty of Finding (DCM 111012) in percent, and the algorithm (name, version, and the
  weights' label, DEMO included);
- per image, a measurement group (TID 1501) referencing it, with the statement the GSPS
  shows on it ("2 masses marked", "analysed, no mass marked" or "not analysed: <reason>";
  dicom_node.report.gsps.image_statement), so that a report always says which images were
  looked at.

Equipment and observer: the manufacturer of ReportConfig, model "dicom-node", the package
version, the host name as serial number (the device observer, TID 1004).
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node import __version__
from dicom_node.config import ReportConfig
from dicom_node.errors import UnsupportedImage
from dicom_node.report.common import (
    MODEL_NAME,
    DetectionLike,
    Mark,
    analysed_frame,
    check_arguments,
    clipped_boxes,
    fit,
    image_statement,
    index_images,
    normalised_copy,
    unreferenceable,
)

ALGORITHM_NAME = "dicom-node mass detection"
SIDES = {"L": codes.SCT.Left, "R": codes.SCT.Right}


def build_sr(
    images: Sequence[Dataset],
    detections: Mapping[str, Sequence[DetectionLike]],
    *,
    report: ReportConfig,
    weights_label: str,
    sop_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    series_description: str,
    skipped: Mapping[str, str] = {},
    frames: Mapping[str, int] = {},
    instance_number: int = 1,
    note: str | None = None,
    predecessors: Sequence[Dataset] = (),
) -> Comprehensive3DSR:
    """Build one Measurement Report for one study: a ROI per detection, a statement per image.

    Arguments as `build_gsps` (every image analysed, possibly with no detection, or
    skipped with a reason); `weights_label` names the weights (the detector's label,
    "DEMO ..." for the demo weights). A report that replaces earlier ones of the study names
    them (`predecessors`: their datasets, PS3.3 C.17.2.3 Predecessor Documents Sequence) and
    says why in a Comment (`note`). Raises ValueError when the arguments contradict each
    other and UnsupportedImage when the study has no image a report can reference.
    """
    by_uid = index_images(images)
    check_arguments(by_uid, detections, skipped)
    study_uid = str(images[0].StudyInstanceUID)
    references = [normalised_copy(ds) for ds in by_uid.values() if unreferenceable(ds) is None]
    if not references:
        raise UnsupportedImage(f"study {study_uid} has no image that a structured report can reference")
    algorithm = AlgorithmIdentification(
        name=ALGORITHM_NAME, version=__version__, parameters=[fit(weights_label, 64)],
        manufacturer=report.manufacturer,
    )
    groups: list = []
    masses = 0
    for ref in references:
        uid = str(ref.SOPInstanceUID)
        if uid in skipped:
            groups.append(_statement_group(ref, image_statement(report.manufacturer, not_analysed=skipped[uid]),
                                           algorithm, sop_instance_uid))
            continue
        frame = analysed_frame(ref, frames)
        boxes = clipped_boxes(detections[uid], ref)
        for mark in boxes:
            masses += 1
            groups.append(_mass_group(ref, mark, frame, algorithm, number=masses, key=sop_instance_uid))
        statement = image_statement(report.manufacturer, marked=len(boxes), frame=frame)
        groups.append(_statement_group(ref, statement, algorithm, sop_instance_uid))
    try:
        content = MeasurementReport(
            observation_context=_observation_context(report),
            procedure_reported=codes.SCT.Mammography,
            imaging_measurements=groups,
            referenced_images=[ref for ref in references if _describable(ref)] or None,
        )
        if note:
            content[0].ContentSequence.append(
                TextContentItem(name=codes.DCM.Comment, value=note, relationship_type=RelationshipTypeValues.CONTAINS)
            )
        return Comprehensive3DSR(
            evidence=references,
            content=content[0],
            previous_versions=list(predecessors) or None,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=report.manufacturer,
            is_complete=True,
            series_description=series_description,
            manufacturer_model_name=MODEL_NAME,
            software_versions=__version__,
            device_serial_number=fit(platform.node() or MODEL_NAME, 64),
        )
    except (ValueError, TypeError) as error:
        raise UnsupportedImage(f"cannot build structured report for study {study_uid}: {error}") from error


def _describable(ref: Dataset) -> bool:
    """Whether highdicom can describe `ref` in the Image Library (TID 1602): a projection
    image (MG, DX...) needs its Patient Orientation (two values) and Imager Pixel Spacing,
    Type 1 in the MG and DX IODs but missing from some senders' objects. One it cannot
    describe is left out of the library; the evidence and its ROIs still reference it."""
    orientation = ref.get("PatientOrientation")
    return ref.get("ImagerPixelSpacing") is not None and orientation is not None and len(orientation) == 2


def _observation_context(report: ReportConfig) -> ObservationContext:
    """The node as the device observer (TID 1004); its UID is derived from the host name."""
    host = platform.node() or MODEL_NAME
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=generate_uid(entropy_srcs=[MODEL_NAME, host]),
                name=MODEL_NAME,
                manufacturer_name=report.manufacturer,
                model_name=MODEL_NAME,
                serial_number=fit(host, 64),
            ),
        )
    )


def _tracking(identifier: str, *, key: str) -> TrackingIdentifier:
    # Derived from the report's UID: the same analysis gives the same identifiers.
    return TrackingIdentifier(uid=generate_uid(entropy_srcs=[key, identifier]), identifier=identifier)


def _mass_group(
    ref: Dataset, mark: Mark, frame: int | None, algorithm: AlgorithmIdentification, *, number: int, key: str,
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    x0, y0, x1, y1 = mark.box
    source = SourceImageForRegion.from_source_image(
        ref, referenced_frame_numbers=None if frame is None else [frame + 1]
    )
    side = SIDES.get(str(ref.get("ImageLaterality") or ref.get("Laterality") or ""))
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(f"mass {number}", key=key),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float),
            source_image=source,
        ),
        finding_type=codes.SCT.Mass,
        algorithm_id=algorithm,
        finding_sites=[FindingSite(anatomic_location=codes.SCT.Breast, laterality=side)] if side else None,
        measurements=[
            Measurement(
                name=codes.DCM.CertaintyOfFinding,
                value=round(100.0 * mark.score, 1),
                unit=codes.UCUM.Percent,
                algorithm_id=algorithm,
            )
        ],
    )


def _statement_group(
    ref: Dataset, statement: str, algorithm: AlgorithmIdentification, key: str
) -> MeasurementsAndQualitativeEvaluations:
    """A measurement group (TID 1501) that references `ref` and says what happened to it."""
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(f"image {ref.SOPInstanceUID}", key=key),
        algorithm_id=algorithm,
        source_images=[SourceImageForMeasurementGroup.from_source_image(ref)],
    )
    group[0].ContentSequence.append(
        TextContentItem(
            name=codes.DCM.Comment,
            value=statement,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )
    return group
