"""The one pixel pipeline: DICOM pixel data -> display-ready float32 image -> model input.

Used by the node, training and evaluation alike, so a model sees the same pixels
everywhere. The steps follow the grayscale rendering pipeline of PS3.4 N.2.1.1:

1. decode the stored values (pydicom with the pylibjpeg plugins: JPEG, JPEG-LS,
   JPEG 2000, RLE);
2. Modality LUT: Rescale Slope/Intercept or Modality LUT Sequence (PS3.3 C.11.1);
3. VOI LUT: the first Window Center/Width with its VOI LUT Function (LINEAR,
   LINEAR_EXACT, SIGMOID; PS3.3 C.11.2.1.2 and C.11.2.1.3), else the first VOI LUT
   Sequence item, else the image's own min/max;
4. MONOCHROME1 is inverted so that dense tissue is bright (PS3.3 C.7.6.3.1.2).

`resize_longest_side` then scales the image for the model, and
`PreparedImage.boxes_to_original` is the only place where boxes move between the
model's pixel space and the original image's.

Box coordinates are continuous pixel-edge coordinates: x runs from 0 (left edge of
the first column) to Columns (right edge of the last), y likewise to Rows, the
convention of PS3.3 C.10.5.1.2 for graphic annotations in PIXEL units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
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

from dicom_node.errors import PermanentError, UnsupportedImage

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

# Attributes of the Modality LUT and VOI LUT modules; in enhanced multi-frame
# objects (breast tomosynthesis) they sit in functional group macros instead.
_LUT_KEYWORDS = (
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An image resized for the model, and how to map boxes back to the original.

    `scale` is resized/original along the longest side; each axis is rounded to
    whole pixels, so `boxes_to_original` uses the exact per-axis factors.
    """

    pixels: np.ndarray  # float32, HxW, values in [0, 1], already resized for the model
    scale: float  # resized_size = original_size * scale (up to rounding to whole pixels)
    original_shape: tuple[int, int]  # (rows, columns) of the source image

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map Nx4 boxes (x0, y0, x1, y1) from resized to original pixels, clipped to the image."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        rows, columns = self.original_shape
        factor_y = rows / self.pixels.shape[0]
        factor_x = columns / self.pixels.shape[1]
        mapped = boxes * np.array([factor_x, factor_y, factor_x, factor_y])
        np.clip(mapped[:, 0::2], 0, columns, out=mapped[:, 0::2])
        np.clip(mapped[:, 1::2], 0, rows, out=mapped[:, 1::2])
        return mapped


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


def central_frame(ds: Dataset) -> int:
    """Index (0-based) of the central frame of a multi-frame image, e.g. a tomosynthesis slice."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return frames // 2


def declared_pixel_bytes(ds: Dataset) -> int:
    """What decoding all of `ds`'s pixel data would take, by its own attributes (PS3.5 8.1.1)."""
    bits = int(ds.get("BitsAllocated", 16) or 16)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * samples * frames * bits // 8


def display_pixels(ds: Dataset, *, frame: int | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Decode `ds` and apply Modality LUT, VOI LUT and MONOCHROME1 inversion.

    Returns float32 HxW in [0, 1] at the original size, dense tissue bright.
    `frame` (0-based) selects one frame of a multi-frame image. Errors name the SOP
    Instance UID: UnsupportedImage for images this pipeline does not handle (colour,
    multi-frame without a frame, larger than `max_bytes` decoded), PermanentError for
    pixel data that cannot be decoded.
    """
    uid = str(ds.get("SOPInstanceUID", "(no SOP Instance UID)"))
    if max_bytes is not None and (declared := declared_pixel_bytes(ds)) > max_bytes:
        # Checked before decoding: a few kB of JPEG 2000 may declare 65535 x 65535 pixels.
        raise UnsupportedImage(
            f"{uid}: the image declares {declared // 2**20} MB of pixels, more than "
            f"node.max_dataset_megabytes ({max_bytes // 2**20} MB)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsupportedImage(
            f"{uid}: Photometric Interpretation {photometric or '(missing)'} is not grayscale"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame is None and frames > 1:
        raise UnsupportedImage(f"{uid}: multi-frame image ({frames} frames) and no frame selected")
    if frame is not None and not 0 <= frame < frames:
        raise ValueError(f"{uid}: frame {frame} is out of range (0..{frames - 1})")

    try:
        stored = pixel_array(ds, index=frame if frames > 1 else None)
    except Exception as error:  # any decoder failure means the same thing to the caller
        raise PermanentError(f"{uid}: cannot decode pixel data ({error})") from error
    if stored.ndim != 2:
        raise PermanentError(
            f"{uid}: decoded pixel data has shape {stored.shape}, not rows x columns"
        )

    attributes = _lut_attributes(ds, frame)
    values = _modality_lut(stored, attributes, ds)
    image = _voi_lut(values, attributes, ds)
    if photometric == "MONOCHROME1":
        # PS3.3 C.7.6.3.1.2: in MONOCHROME1 the minimum value is white. The MG and
        # DX Presentation LUT Shape INVERSE states this same inversion, not a second one.
        image = 1.0 - image
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def resize_longest_side(image: np.ndarray, size: int) -> PreparedImage:
    """Scale `image` (HxW float) so that its longest side is `size`, keeping the aspect ratio.

    Uses bilinear interpolation with antialiasing, whose weights are non-negative,
    so values stay within the input's range.
    """
    if image.ndim != 2:
        raise ValueError(f"expected an HxW image, got shape {image.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    rows, columns = image.shape
    scale = size / max(rows, columns)
    target = (max(1, round(rows * scale)), max(1, round(columns * scale)))
    pixels = np.asarray(image, dtype=np.float32)
    if target != (rows, columns):
        with torch.no_grad():
            tensor = torch.from_numpy(np.ascontiguousarray(pixels))[None, None]
            resized = F.interpolate(
                tensor, size=target, mode="bilinear", align_corners=False, antialias=True
            )
        pixels = resized[0, 0].numpy()
    return PreparedImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        scale=scale,
        original_shape=(rows, columns),
    )


def prepare(
    ds: Dataset, *, input_size: int, frame: int | None = None, max_bytes: int | None = None
) -> PreparedImage:
    """Display pixels of `ds` resized so that the longest side is `input_size`."""
    return resize_longest_side(display_pixels(ds, frame=frame, max_bytes=max_bytes), input_size)


def _lut_attributes(ds: Dataset, frame: int | None) -> Dataset:
    """The Modality/VOI LUT attributes that apply to `frame`.

    Enhanced multi-frame objects (breast tomosynthesis) carry them in the Pixel
    Value Transformation and Frame VOI LUT functional groups (PS3.3 C.7.6.16.2.9,
    C.7.6.16.2.10), shared or per frame; per-frame values win.
    """
    view = Dataset()
    for keyword in _LUT_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]
    groups = []
    if "SharedFunctionalGroupsSequence" in ds and ds.SharedFunctionalGroupsSequence:
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if frame is not None and per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    for group in groups:
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if macro in group and group[macro].value:
                item = group[macro].value[0]
                for keyword in _LUT_KEYWORDS:
                    if keyword in item:
                        view[keyword] = item[keyword]
    return view


def _modality_lut(stored: np.ndarray, attributes: Dataset, ds: Dataset) -> np.ndarray:
    # PS3.3 C.11.1: either a Modality LUT Sequence or a linear rescale, not both.
    if attributes.get("ModalityLUTSequence"):
        return _apply_lut(stored, attributes.ModalityLUTSequence[0], ds).astype(np.float32)
    slope = float(attributes.get("RescaleSlope", 1) or 1)
    intercept = float(attributes.get("RescaleIntercept", 0) or 0)
    return stored.astype(np.float32) * slope + intercept


def _voi_lut(values: np.ndarray, attributes: Dataset, ds: Dataset) -> np.ndarray:
    # PS3.3 C.11.2: an image may offer a window and a VOI LUT; which one applies is
    # the application's choice. The first window is the vendor's default view and
    # carries the VOI LUT Function (GE writes SIGMOID), so it goes first.
    window = _first_window(attributes)
    if window is not None:
        center, width = window
        function = str(attributes.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        return _apply_window(values, center=center, width=width, function=function)
    if attributes.get("VOILUTSequence"):
        lut_values = _apply_lut(np.rint(values).astype(np.int64), attributes.VOILUTSequence[0], ds)
        # Normalised by the LUT's own output range rather than 0..2^n-1 (n: the
        # descriptor's third value, PS3.3 C.11.6.1 note 3): some vendors declare
        # 16-bit entries but fill only 12 bits, which would render nearly black.
        return _rescale_to_unit(lut_values.astype(np.float32), lut_values.min(), lut_values.max())
    return _rescale_to_unit(values, values.min(), values.max())


def _first_window(attributes: Dataset) -> tuple[float, float] | None:
    if "WindowCenter" not in attributes or "WindowWidth" not in attributes:
        return None
    center, width = attributes.WindowCenter, attributes.WindowWidth
    if isinstance(center, MultiValue):
        center = center[0] if len(center) else None
    if isinstance(width, MultiValue):
        width = width[0] if len(width) else None
    if center is None or width is None or center == "" or width == "":
        return None
    if float(width) <= 0:
        return None  # invalid window (PS3.3 C.11.2.1.2 requires width > 0): fall back
    return float(center), float(width)


def _apply_window(values: np.ndarray, *, center: float, width: float, function: str) -> np.ndarray:
    """Window to [0, 1]: LINEAR per PS3.3 C.11.2.1.2.1, SIGMOID and LINEAR_EXACT per C.11.2.1.3."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    # LINEAR (and unknown functions, which PS3.3 defines none of): the width-1 and
    # center-0.5 terms make integer windows map to whole output levels.
    if width <= 1:
        return (values > center - 0.5).astype(np.float32)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _apply_lut(values: np.ndarray, item: Dataset, ds: Dataset) -> np.ndarray:
    """Look `values` up in a Modality or VOI LUT item (PS3.3 C.11.1.1.1, C.11.2.1.1).

    Values below the first mapped value take the first entry, values past the
    end take the last one.
    """
    entries, first_mapped, _bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536  # PS3.3 C.11.1.1.1: 0 means 2^16 entries
    if int(ds.get("PixelRepresentation", 0)) == 1 and first_mapped >= 32768:
        first_mapped -= 65536  # the descriptor's second value is SS for signed pixels
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the dataset's byte order
        little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
        lut = np.frombuffer(data, dtype="<u2" if little else ">u2")
    else:
        lut = np.asarray(data if isinstance(data, (list, tuple, MultiValue)) else [data])
    lut = lut.astype(np.int64)[:entries]
    index = np.clip(np.asarray(values, dtype=np.int64) - first_mapped, 0, len(lut) - 1)
    return lut[index]


def _rescale_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return (values - low) / (high - low)
