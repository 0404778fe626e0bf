"""Build the burned-in capture: one derived image per analysed image, boxes drawn into the pixels.

For a PACS or viewer that shows neither presentation states nor SR, only images: a Secondary
Capture Image (PS3.3 A.8.1) in its own series of the source's study, whose pixels are

- the source image as the model saw it: decoded and rendered by the one grayscale pipeline
  (``dicom_node.pixels.display_pixels``: Modality LUT, VOI LUT or window incl. SIGMOID and
  LUT tables, MONOCHROME1 inverted), at the original size, as 8-bit grey in RGB;
- per detection (clipped to the image as the GSPS clips it): a yellow rectangle hugging the
  box from outside, so the marked tissue itself stays untouched, and its label
  (``mass 0.87``) just above it;
- at the top, the line the GSPS puts on every image (report.common.image_statement, the same words):
  ``<manufacturer>: 2 masses marked - AI, not for diagnosis``, ``... analysed, no mass
  marked - ...`` or ``<manufacturer>: not analysed: <reason>``;
- when it replaces an earlier capture of the study (report.common.Predecessor), a second line
  saying which and why (``Replaces the result of ...: 1 image arrived after it``), also in
  Image Comments;
- with the demo weights, the warning (report.common.DEMO_SERIES_DESCRIPTION) in white on a red band
  below those lines; the Series Description is then the warning too.

The object says what it is: Burned In Annotation YES (PS3.3 C.7.6.1.1.11: the pixels carry
text, and the boxes), Image Type DERIVED\\SECONDARY, a Source Image Sequence referencing the
source image (and its analysed frame) with Spatial Locations Preserved YES (same pixel grid,
C.7.6.1.1.4), and a Derivation Description. Patient and study attributes come from a
normalised copy of the source (report.common.normalised_copy: missing or invalid Type 2 values
become empty); Laterality (General Series, C.7.3.1, Type 2C) from the source's Image
Laterality or Laterality, Patient Orientation and Pixel Spacing copied as they are (the
geometry is the source's). The view (View Code Sequence, View Position) has no place in the
SC IOD; it is named in the Derivation Description.

Pixel data: JPEG 2000 Lossless (PS3.5 A.4.4) by default. The RGB pixels are grey apart from
the drawings, so after the reversible colour transform (YBR_RCT, PS3.5 8.2.4) the two chroma
components are almost all zero and cost almost nothing: a 3328 x 2560 phantom's capture
takes 0.12 of its 25.6 MB uncompressed, where JPEG-LS Lossless (which codes the three equal
components separately) takes 0.33 and RLE 0.96, for 0.15 to 0.25 s more encoding than
those (0.7 s for the whole capture on 2 loaded cores). Its encoder (pylibjpeg-openjpeg)
is a declared dependency; JPEG-LS's (pyjpegls) is not, so it is not offered.
``transfer_syntax_uid`` picks RLE Lossless or uncompressed for a PACS that cannot take
JPEG 2000.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Sequence

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from dicom_node import __version__
from dicom_node.config import ReportConfig
from dicom_node.errors import UnsupportedImage
from dicom_node.log import get_logger
from dicom_node.pixels import display_pixels

# The wording and box handling of every result, shared rather than copied: what a capture
# says and where it puts a box must not drift from what the presentation state says.
from dicom_node.report.common import (
    DEMO_SERIES_DESCRIPTION,
    MODEL_NAME,
    DetectionLike,
    analysed_frame,
    clipped_boxes,
    fit,
    image_statement,
    label_box,
    normalised_copy,
)

log = get_logger(__name__)

# Lossless transfer syntaxes a capture can be written in, and the Photometric Interpretation
# each needs for RGB pixels: JPEG 2000 Lossless codes colour as YBR_RCT (PS3.5 8.2.4),
# decoded back to the same RGB.
CAPTURE_TRANSFER_SYNTAXES = {
    JPEG2000Lossless: "YBR_RCT",
    RLELossless: "RGB",
    ExplicitVRLittleEndian: "RGB",
}
DEFAULT_TRANSFER_SYNTAX = JPEG2000Lossless

BOX_COLOUR = (255, 255, 0)  # yellow: no grey value is, so it stands out on any mammogram
TEXT_OUTLINE = (0, 0, 0)
DEMO_BAND = (255, 0, 0)
DEMO_TEXT = (255, 255, 255)
SERIES_SUFFIX = " (burned-in)"


def build_capture(
    image: Dataset,
    detections: Sequence[DetectionLike] | None,
    *,
    report: ReportConfig,
    sop_instance_uid: str,
    series_instance_uid: str,
    instance_number: int,
    not_analysed_reason: str | None = None,
    demo: bool = False,
    frame: int | None = None,
    max_bytes: int | None = None,
    transfer_syntax_uid: str = DEFAULT_TRANSFER_SYNTAX,
    series_number: int | None = None,
    note: str | None = None,
) -> SCImage:
    """One burned-in Secondary Capture of `image`: its display with `detections` drawn in.

    `detections` (boxes in the source's pixels) for an analysed image, possibly empty;
    None with `not_analysed_reason` for an image that was not analysed (only its reason
    line is drawn). `frame`: the 0-based frame that was analysed in a multi-frame image
    (default the central one, as the worker and the GSPS take it). `demo`: results of the
    demo weights, which the capture says in its pixels and its Series Description.
    `max_bytes` bounds the decoding (node.max_dataset_megabytes) for an image the worker
    did not decode. `series_number`: default report.series_number. `note`: what this
    capture replaces and why (report.common.Predecessor.note), burned in and in Image Comments.

    Raises ValueError for contradicting arguments (a caller bug), UnsupportedImage or
    PermanentError (naming the SOP Instance UID) for an image that cannot be rendered.
    """
    if (detections is None) == (not_analysed_reason is None):
        raise ValueError("give either detections (analysed) or not_analysed_reason, not both or neither")
    if transfer_syntax_uid not in CAPTURE_TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer syntax {transfer_syntax_uid} is not one for captures: {sorted(CAPTURE_TRANSFER_SYNTAXES)}"
        )
    uid = str(image.SOPInstanceUID)
    frame = analysed_frame(image, {} if frame is None else {uid: frame})
    grey = display_pixels(image, frame=frame, max_bytes=max_bytes)
    rows, columns = grey.shape

    if detections is None:
        boxes = []
        summary = image_statement(report.manufacturer, not_analysed=not_analysed_reason)
    else:
        boxes = clipped_boxes(detections, image)  # logs those outside the image
        summary = image_statement(report.manufacturer, marked=len(boxes), frame=frame)
    pixels = _draw(grey, boxes, [summary, note] if note else [summary], demo=demo)

    source = normalised_copy(image)
    laterality = str(source.get("ImageLaterality") or source.get("Laterality") or "").upper()
    try:
        capture = SCImage.from_ref_dataset(
            source,
            pixels,
            photometric_interpretation=CAPTURE_TRANSFER_SYNTAXES[transfer_syntax_uid],
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_instance_uid,
            series_number=report.series_number if series_number is None else series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=report.manufacturer,
            # Replaced below by the source's own value, which highdicom's one-letter
            # check would refuse for mammography (A\FR: PS3.3 C.7.6.1.1.1).
            patient_orientation=("A", "R"),
            laterality=laterality if laterality in ("L", "R") else None,
            transfer_syntax_uid=transfer_syntax_uid,
            series_description=_series_description(report, demo=demo),
            manufacturer_model_name=MODEL_NAME,
            software_versions=__version__,
            device_serial_number=fit(platform.node() or MODEL_NAME, 64),
        )
    except (ValueError, TypeError) as error:
        # Whatever normalisation missed in the source: a clear error naming the image, not a
        # traceback from deep inside highdicom.
        raise UnsupportedImage(f"cannot build burned-in capture of {uid}: {error}") from error

    # General Image (PS3.3 C.7.6.1): Patient Orientation is Type 2C, the source's holds as
    # the pixel grid is the same.
    capture.PatientOrientation = source.get("PatientOrientation") or ""
    if source.get("PixelSpacing"):
        capture.PixelSpacing = source.PixelSpacing  # SC Image module (C.8.6.2), same grid
    capture.BurnedInAnnotation = "YES"
    capture.ImageType = ["DERIVED", "SECONDARY"]
    capture.DerivationDescription = _derivation(source, frame, boxes=len(boxes), analysed=detections is not None)
    capture.SourceImageSequence = DicomSequence([_source_reference(source, frame)])
    if note:
        capture.ImageComments = note  # General Image (C.7.6.1), Type 3
    if str(source.get("LossyImageCompression", "")) == "01":
        # C.7.6.1.1.5: once lossy compressed, always said so, through every derivation.
        for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                setattr(capture, keyword, source[keyword].value)
    return capture


def _series_description(report: ReportConfig, *, demo: bool) -> str:
    # Long String, 64 characters (PS3.5 6.2): the demo warning (55) leaves no room for the
    # suffix, and it is what must be read in the series list.
    if demo:
        return DEMO_SERIES_DESCRIPTION
    return fit(report.series_description, 64 - len(SERIES_SUFFIX)) + SERIES_SUFFIX


def _derivation(source: Dataset, frame: int | None, *, boxes: int, analysed: bool) -> str:
    view = " ".join(str(v) for v in (source.get("ImageLaterality") or source.get("Laterality"),
                                     source.get("ViewPosition")) if v)
    of_image = f"{view} image" if view else "image"
    on_frame = f", frame {frame + 1}" if frame is not None else ""
    drawn = f"{boxes} AI detection box(es) burned in" if analysed else "not analysed, its reason burned in"
    return (f"Display of the {of_image}{on_frame} (Modality LUT, VOI LUT, polarity applied) "
            f"as 8-bit RGB; {drawn}")


def _source_reference(source: Dataset, frame: int | None) -> Dataset:
    """A Source Image Sequence item (General Reference module, PS3.3 C.12.4)."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame + 1
    code = codes.DCM.SourceImageForImageProcessingOperation  # CID 7202
    purpose = Dataset()
    purpose.CodeValue = code.value
    purpose.CodingSchemeDesignator = code.scheme_designator
    purpose.CodeMeaning = code.meaning
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    item.SpatialLocationsPreserved = "YES"
    return item


# ---------------------------------------------------------------- drawing


def _draw(grey: np.ndarray, boxes, lines: Sequence[str], *, demo: bool) -> np.ndarray:
    """`grey` (float32 in [0, 1]) as 8-bit RGB with the boxes, labels and text `lines` drawn."""
    rows, columns = grey.shape
    levels = np.rint(grey * np.float32(255)).astype(np.uint8)
    canvas = Image.fromarray(levels).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(2, min(rows, columns) // 500)
    for mark in boxes:
        (x0, y0, x1, y1), label = mark.box, mark.text
        # Placed as the GSPS places it, around the box with its outline and a gap.
        outer = (x0 - 2 * width, y0 - 2 * width, x1 + 2 * width, y1 + 2 * width)
        left, top, _, bottom = label_box(outer, label, rows=rows, columns=columns)
        _text(draw, (left, top), label, size=bottom - top, fill=BOX_COLOUR, max_width=columns - left)
    for box in (mark.box for mark in boxes):  # after all labels: no label's outline covers a box's
        _rectangle(draw, box, width=width, rows=rows, columns=columns)

    margin = max(2, round(min(rows, columns) * 0.01))
    size = max(10, rows * 0.025)
    bottom = 0
    for line in lines:
        bottom = _text(draw, (margin, bottom + margin), line, size=size, fill=BOX_COLOUR,
                       max_width=columns - 2 * margin)
    if demo:
        top = bottom + margin
        font = _font_tofit(draw, DEMO_SERIES_DESCRIPTION, size, columns - 2 * margin)
        draw.rectangle((0, top, columns - 1, top + font.size + 2 * margin), fill=DEMO_BAND)
        draw.text((margin, top + margin), DEMO_SERIES_DESCRIPTION, fill=DEMO_TEXT, font=font, anchor="la")
    return np.asarray(canvas)


def _rectangle(draw: ImageDraw.ImageDraw, box, *, width: int, rows: int, columns: int) -> None:
    """The outline just outside `box` (pixel-edge coordinates, PS3.3 C.10.5.1.2), inside the image.

    Pixels of columns round(x0)..round(x1)-1 lie in the box; the lines take the `width`
    pixels around them, moved inwards where the box touches the image's edge.
    """
    x0, y0, x1, y1 = (round(v) for v in box)
    outer = (max(x0 - width, 0), max(y0 - width, 0),
             min(x1 + width - 1, columns - 1), min(y1 + width - 1, rows - 1))
    draw.rectangle(outer, outline=BOX_COLOUR, width=width)


def _text(draw, xy, text: str, *, size: float, fill, max_width: float) -> float:
    """Draw `text` at `xy` (top left), outlined in black, shrunk to fit; returns its bottom."""
    font = _font_tofit(draw, text, size, max_width)
    stroke = max(1, font.size // 12)
    draw.text(xy, text, fill=fill, font=font, anchor="la", stroke_width=stroke, stroke_fill=TEXT_OUTLINE)
    return xy[1] + font.size + 2 * stroke


def _font_tofit(draw, text: str, size: float, max_width: float) -> ImageFont.FreeTypeFont:
    font = _font(max(6, int(size)))
    length = draw.textlength(text, font=font)
    if length > max_width > 0:
        font = _font(max(6, int(font.size * max_width / length)))
    return font


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's own font (built in, FreeType): no font files needed on the host.
    return ImageFont.load_default(size=size)
