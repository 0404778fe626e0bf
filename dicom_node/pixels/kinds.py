"""Which kind of image an instance is, for the node's rules (SOP Class, PS3.3 C.8.11.1)."""

from __future__ import annotations

from typing import Literal

from pydicom.dataset import Dataset
from pydicom.uid import (
    BreastProjectionXRayImageStorageForPresentation,
    BreastProjectionXRayImageStorageForProcessing,
    BreastTomosynthesisImageStorage,
    ComputedRadiographyImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from dicom_node.errors import UnsupportedImage

ImageKind = Literal["presentation", "processing", "tomosynthesis", "secondary_capture"]

_PRESENTATION_CLASSES = {
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalXRayImageStorageForPresentation,
}
_PROCESSING_CLASSES = {
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForProcessing,
}
# Multi-frame breast images. Projections (PS3.3 A.89) are the raw tomosynthesis
# exposures; their central frame is the one taken closest to the 0 degree position.
_TOMOSYNTHESIS_CLASSES = {
    BreastTomosynthesisImageStorage,
    BreastProjectionXRayImageStorageForPresentation,
    BreastProjectionXRayImageStorageForProcessing,
}
# Film scans (CBIS-DDSM) and screenshots arrive as grayscale Secondary Capture.
_SECONDARY_CAPTURE_CLASSES = {
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
}


def image_kind(ds: Dataset) -> ImageKind:
    """Classify an image for the node's rules by SOP Class and Presentation Intent Type.

    Raises UnsupportedImage for SOP classes that are not (plausibly) mammograms.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in _TOMOSYNTHESIS_CLASSES:
        return "tomosynthesis"
    if sop_class in _SECONDARY_CAPTURE_CLASSES:
        return "secondary_capture"
    if sop_class in _PRESENTATION_CLASSES | _PROCESSING_CLASSES | {ComputedRadiographyImageStorage}:
        # PS3.3 C.8.11.1: Presentation Intent Type says whether the pixels are
        # meant for display or still need processing; the SOP class says the same
        # for MG and DX, CR has no such attribute (film or plate readouts to display).
        intent = str(ds.get("PresentationIntentType", "")).upper()
        if sop_class in _PROCESSING_CLASSES or intent == "FOR PROCESSING":
            return "processing"
        return "presentation"
    raise UnsupportedImage(f"SOP Class {sop_class or '(missing)'} is not a mammography image")
