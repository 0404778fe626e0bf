"""Build the Grayscale Softcopy Presentation State that carries the detector's boxes to the PACS.

One GSPS per analysed study, in its own series, referencing every image of the study that a
grayscale presentation state can reference (PS3.3 A.33.1). On one graphic layer it holds:

- per detection: a closed rectangle (POLYLINE in PIXEL units, 5 points, first repeated,
  PS3.3 C.10.5) and a short label (``mass 0.87``) in a text box just above the rectangle;
- per image: one summary line in DISPLAY units at the top of the image, so that every
  referenced image says what happened to it: ``<manufacturer>: 2 masses marked - AI, not for
  diagnosis``, ``<manufacturer>: analysed, no mass marked - AI, not for diagnosis`` or
  ``<manufacturer>: not analysed: <reason>``. "Nothing found" is thus always distinguishable
  from "not analysed", and the AI notice is on every image that was analysed.

Skipped images (``skipped``: SOP Instance UID -> reason): they are referenced by the GSPS
(when they are in ``images`` and are grayscale images) and carry only their "not analysed"
line, so the radiologist sees on the image itself that it was not looked at. Skipped entries
that cannot be referenced (not in ``images``, colour or non-image objects) are only counted
in the Content Description.

Pixel transformations (a GSPS replaces the image's own, PS3.4 N.2): the presentation state
shows what the model saw. Which Modality LUT, VOI LUT and polarity apply to an image comes
from the pixel package (``dicom_node.pixels.display_of``), the one that makes the model input.

- Modality LUT: the images' Rescale Slope/Intercept (identity when absent).
- Softcopy VOI LUT: every window of each image (centre, width, explanation, VOI LUT Function
  such as SIGMOID) or its VOI LUT table (scaled to span 16 bits, as the pipeline scales it
  to black..white), grouped per distinct value with Referenced Image Sequence where they
  differ. An image without any gets the window spanning its own values (``FULL RANGE``), the
  pipeline's min/max, so the GSPS always states a VOI.
- Presentation LUT Shape: IDENTITY for MONOCHROME2, INVERSE for MONOCHROME1: a GSPS makes the
  viewer ignore the image's Photometric Interpretation (PS3.3 C.11.6, PS3.4 N.2), so without INVERSE
  a MONOCHROME1 mammogram would show with dense tissue dark.
- When the images cannot share one Modality LUT and one polarity (different rescales, Modality
  LUT Sequences, MONOCHROME1 mixed with MONOCHROME2, a VOI LUT with a negative first value
  mapped: rare), every image instead gets a VOI LUT table that bakes in its whole display
  (the pipeline's own rendering of every stored value), under a Modality LUT that only
  shifts signed stored values to non-negative ones and an IDENTITY Presentation LUT.

Images of different sizes (different detector formats in one study) get one Displayed Area
Selection item per size (PS3.3 C.10.4). highdicom requires one size, so it is given copies
that share the first image's Rows/Columns and the displayed areas are set afterwards.

highdicom copies patient and study attributes from the first referenced image and reads
some of them unconditionally; they are normalised on copies (missing or invalid Type 2
values become empty), never on the caller's datasets.

Multi-frame images (breast tomosynthesis analysed on one slice): boxes reference the analysed
frame (``frames``, 0-based, default the central frame ``NumberOfFrames // 2``); the summary
line applies to all frames.

Equipment: Manufacturer, Series Description, Content Label, Content Creator's Name and
Series Number come from ReportConfig; Manufacturer's Model Name is "dicom-node", Software
Versions the package version, Device Serial Number the host name (which node made it).
"""

from __future__ import annotations

import platform
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace

import highdicom
import numpy as np
from highdicom.color import CIELabColor
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextJustificationValues,
    TextObject,
)
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node import __version__
from dicom_node.config import ReportConfig
from dicom_node.errors import PermanentError, UnsupportedImage
from dicom_node.log import get_logger
from dicom_node.pixels import (
    FULL_RANGE,
    Display,
    LookupTable,
    Rescale,
    Window,
    display_of,
    stored_values,
)
from dicom_node.report.common import (
    AI_NOTICE,
    MODEL_NAME,
    DetectionLike,
    analysed_frame,
    check_arguments,
    clipped_boxes,
    count,
    fit,
    image_statement,
    index_images,
    label_box,
    normalised_copy,
    unreferenceable,
)

log = get_logger(__name__)

_RESCALE_TYPES = frozenset(value.value for value in highdicom.RescaleTypeValues)


def build_gsps(
    images: Sequence[Dataset],
    detections: Mapping[str, Sequence[DetectionLike]],
    *,
    report: ReportConfig,
    sop_instance_uid: str,
    series_instance_uid: str,
    skipped: Mapping[str, str] = {},
    frames: Mapping[str, int] = {},
    instance_number: int = 1,
    note: str | None = None,
) -> GrayscaleSoftcopyPresentationState:
    """Build one GSPS for one study: a box and label per detection, a summary line per image.

    ``detections`` and ``skipped`` are keyed by SOP Instance UID; every image in ``images``
    must be in exactly one of them (analysed, possibly with no detection, or skipped with a
    reason). ``frames`` gives the 0-based frame that was analysed in a multi-frame image
    (default: the central frame); boxes are placed on that frame. `note`: a second line on
    every image, below its statement (what an earlier result this one replaces).

    Raises ValueError when the arguments contradict each other (a caller bug) and
    UnsupportedImage when the study's images cannot carry a presentation state.
    """
    by_uid = index_images(images)
    check_arguments(by_uid, detections, skipped)
    study_uid = str(images[0].StudyInstanceUID)

    references: list[Dataset] = []
    for uid, ds in by_uid.items():
        problem = unreferenceable(ds)
        if problem is None:
            references.append(normalised_copy(ds))
        elif uid in skipped:
            log.info("gsps_image_not_referenced", sop_instance_uid=uid, reason=problem)
        else:
            raise ValueError(f"analysed image {uid} cannot be referenced by a GSPS: {problem}")
    if not references:
        raise UnsupportedImage(
            f"study {study_uid} has no grayscale image that a presentation state can reference"
        )
    analysed_frames = {
        str(ds.SOPInstanceUID): analysed_frame(ds, frames) for ds in references
    }

    layer = GraphicLayer(
        layer_name=report.graphic_layer,
        order=1,
        description=fit(f"{report.manufacturer} mass detection, {AI_NOTICE}", 64),
        display_color=CIELabColor.from_string("yellow"),
    )
    try:
        annotations, marked = _annotations(
            references, detections, skipped, analysed_frames, layer, prefix=report.manufacturer, note=note
        )
        modality, vois, presentation = _pixel_transformations(
            by_uid, references, analysed_frames, analysed=detections.keys()
        )
        same_size = [_with_size(ref, references[0]) for ref in references]
        gsps = GrayscaleSoftcopyPresentationState(
            referenced_images=same_size,
            series_instance_uid=series_instance_uid,
            series_number=report.series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=report.manufacturer,
            manufacturer_model_name=MODEL_NAME,
            software_versions=__version__,
            device_serial_number=fit(platform.node() or MODEL_NAME, 64),
            content_label=report.content_label,
            content_description=_description(marked, not_analysed=len(skipped)),
            graphic_annotations=annotations,
            graphic_layers=[layer],
            content_creator_name=report.content_creator_name,
            modality_lut_transformation=modality,
            voi_lut_transformations=vois,
            presentation_lut_transformation=presentation,
            series_description=report.series_description,
        )
    except (ValueError, TypeError) as error:
        # Whatever normalisation missed in the source images: a clear permanent error
        # naming the study rather than a traceback from deep inside highdicom.
        raise UnsupportedImage(f"cannot build GSPS for study {study_uid}: {error}") from error
    gsps.DisplayedAreaSelectionSequence = _displayed_areas(references)
    # PS3.3 C.7.3.1 General Series: Laterality is Type 2C for paired body parts; one side
    # when every referenced image shows the same breast, empty otherwise.
    sides = {str(ref.get("ImageLaterality") or ref.get("Laterality") or "") for ref in references}
    gsps.Laterality = sides.pop() if len(sides) == 1 and sides <= {"L", "R"} else ""
    return gsps


# ---------------------------------------------------------------- arguments and copies


# ---------------------------------------------------------------- sizes


def _with_size(ds: Dataset, like: Dataset) -> Dataset:
    """`ds` with `like`'s Rows/Columns, for highdicom's one-size rule (see module docstring)."""
    if (ds.Rows, ds.Columns) == (like.Rows, like.Columns):
        return ds
    # A new mapping of the same elements; Rows and Columns get new elements (assigning the
    # keywords would change the shared elements' values in `ds` too).
    resized = Dataset(dict(ds.items()))
    resized[Tag("Rows")] = DataElement(Tag("Rows"), "US", int(like.Rows))
    resized[Tag("Columns")] = DataElement(Tag("Columns"), "US", int(like.Columns))
    return resized


# ---------------------------------------------------------------- graphics


def _annotations(
    references: Sequence[Dataset],
    detections: Mapping[str, Sequence[DetectionLike]],
    skipped: Mapping[str, str],
    frames: Mapping[str, int | None],
    layer: GraphicLayer,
    *,
    prefix: str,
    note: str | None = None,
) -> tuple[list[GraphicAnnotation], int]:
    """Boxes, labels and one summary line per referenced image; also the number of boxes."""
    annotations: list[GraphicAnnotation] = []
    marked = 0
    for ref in references:
        uid = str(ref.SOPInstanceUID)
        if uid in skipped:
            annotations.append(_summary_annotation(ref, layer, image_statement(prefix, not_analysed=skipped[uid]), note))
            continue
        boxes = clipped_boxes(detections[uid], ref)
        marked += len(boxes)
        frame = frames[uid]
        if boxes:
            annotations.append(_boxes_annotation(ref, layer, boxes, frame=frame))
        text = image_statement(prefix, marked=len(boxes), frame=frame)
        annotations.append(_summary_annotation(ref, layer, text, note))

    return annotations, marked


def _description(marked: int, *, not_analysed: int) -> str:
    description = f"{AI_NOTICE}: {count(marked, 'mass', 'masses')} marked"
    if not_analysed:
        description += f", {count(not_analysed, 'image', 'images')} not analysed"
    return fit(description, 64)


def _rectangle(box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)


def _boxes_annotation(
    ref: Dataset, layer: GraphicLayer, boxes, *, frame: int | None
) -> GraphicAnnotation:
    rows, columns = int(ref.Rows), int(ref.Columns)
    graphics = [
        GraphicObject(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=_rectangle(mark.box),
            units=AnnotationUnitsValues.PIXEL,
            is_filled=False,
        )
        for mark in boxes
    ]
    texts = [
        TextObject(
            text_value=mark.text,
            units=AnnotationUnitsValues.PIXEL,
            bounding_box=label_box(mark.box, mark.text, rows=rows, columns=columns),
            text_justification=TextJustificationValues.LEFT,
        )
        for mark in boxes
    ]
    return GraphicAnnotation(
        referenced_images=[ref],
        graphic_layer=layer,
        referenced_frame_number=None if frame is None else frame + 1,
        graphic_objects=graphics,
        text_objects=texts,
    )


def _summary_annotation(ref: Dataset, layer: GraphicLayer, text: str, note: str | None = None) -> GraphicAnnotation:
    # DISPLAY units (fractions of the displayed area) keep the lines readable at any image size.
    lines = [text] if note is None else [text, note]
    return GraphicAnnotation(
        referenced_images=[ref],
        graphic_layer=layer,
        text_objects=[
            TextObject(
                text_value=line,
                units=AnnotationUnitsValues.DISPLAY,
                bounding_box=(0.01, 0.01 + 0.04 * index, 0.99, 0.05 + 0.04 * index),
                text_justification=TextJustificationValues.LEFT,
            )
            for index, line in enumerate(lines)
        ],
    )


def _displayed_areas(references: Sequence[Dataset]) -> list[Dataset]:
    """One Displayed Area Selection item per image size: the whole image, scaled to fit."""
    by_size: dict[tuple[int, int], list[Dataset]] = {}
    for ref in references:
        by_size.setdefault((int(ref.Rows), int(ref.Columns)), []).append(ref)
    items = []
    for (rows, columns), group in by_size.items():
        item = Dataset()
        if len(by_size) > 1:
            # PS3.3 C.10.4: required when the item does not apply to all referenced images.
            item.ReferencedImageSequence = highdicom.ReferencedImageSequence(group)
        item.DisplayedAreaTopLeftHandCorner = [1, 1]
        item.DisplayedAreaBottomRightHandCorner = [columns, rows]
        item.PresentationSizeMode = "SCALE TO FIT"
        item.PresentationPixelAspectRatio = [1, 1]
        items.append(item)
    return items


# ---------------------------------------------------------------- pixel transformations


def _pixel_transformations(
    images: Mapping[str, Dataset],
    references: Sequence[Dataset],
    frames: Mapping[str, int | None],
    analysed: Collection[str],
):
    """(Modality LUT, Softcopy VOI LUTs, Presentation LUT) reproducing the images' display.

    Each image's display comes from the pixel package (`dicom_node.pixels.display_of`),
    the one the model input was made with. `images` are the callers' datasets (with pixel
    data: an analysed image without a window is decoded again for its min/max).
    """
    displays = [
        (ref, _display(images[str(ref.SOPInstanceUID)], frames[str(ref.SOPInstanceUID)],
                       analysed=str(ref.SOPInstanceUID) in analysed))
        for ref in references
    ]
    rescales = {(d.modality.slope, d.modality.intercept) if isinstance(d.modality, Rescale)
                else None for _, d in displays}
    polarities = {d.inverse for _, d in displays}
    if (
        len(rescales) == 1 and None not in rescales and len(polarities) == 1
        and all(_copyable(d.voi) for _, d in displays)
    ):
        slope, intercept = rescales.pop()
        types = {d.modality.type for _, d in displays}
        rescale_type = types.pop() if len(types) == 1 else "US"
        modality = highdicom.ModalityLUTTransformation(
            rescale_intercept=intercept,
            rescale_slope=slope,
            rescale_type=rescale_type if rescale_type in _RESCALE_TYPES else "US",
        )
        shape = "INVERSE" if polarities.pop() else "IDENTITY"
        return modality, _copied_vois(displays), highdicom.PresentationLUTTransformation(shape)
    log.info("gsps_voi_tables", images=len(displays))
    # Baked tables are indexed by stored value; a VOI LUT's first value mapped is unsigned
    # here (highdicom), so signed stored values are shifted up by the Modality LUT.
    shift = max(0, -min(d.stored_min for _, d in displays))
    shifted = highdicom.ModalityLUTTransformation(
        rescale_intercept=float(shift), rescale_slope=1.0, rescale_type="US"
    )
    vois = [
        SoftcopyVOILUTTransformation(
            voi_luts=[_baked_table(ref, d, shift)],
            referenced_images=highdicom.ReferencedImageSequence([ref]),
        )
        for ref, d in displays
    ]
    return shifted, vois, highdicom.PresentationLUTTransformation("IDENTITY")


def _display(ds: Dataset, frame: int | None, *, analysed: bool) -> Display:
    """The image's display, with a concrete VOI.

    Without a window or VOI LUT the pipeline shows the frame's own min..max: an analysed
    image (which the worker decoded within its bounds) is decoded again to find them. A
    skipped image is not decoded (it may be what the bounds refused): it gets the range
    its Bits Stored allow, as a viewer would.
    """
    display = display_of(ds, frame)
    if display.voi is not None:
        return display
    if analysed:
        try:
            return display.resolved(stored_values(ds, frame=frame))
        except (UnsupportedImage, PermanentError, ValueError) as error:
            log.warning("gsps_full_range_from_bits", sop_instance_uid=str(ds.SOPInstanceUID),
                        error=str(error))
    if isinstance(display.modality, Rescale):
        low, high = display.modality.output_range(display.stored_min, display.stored_max)
    else:
        low, high = 0, (1 << display.modality.bits) - 1
    return replace(display, voi=Window.spanning(low, high, explanation=FULL_RANGE))


def _copyable(voi: Window | LookupTable | None) -> bool:
    """Whether a VOI can be copied as is: a window, or a table highdicom can write."""
    return isinstance(voi, Window) or (
        isinstance(voi, LookupTable) and 0 <= voi.first_mapped < 1 << 16
    )


def _copied_vois(displays: Sequence[tuple[Dataset, Display]]) -> list[SoftcopyVOILUTTransformation]:
    """The images' own windows (or VOI LUT table), one item per distinct value."""
    groups: dict[tuple, list[Dataset]] = {}
    tables: dict[tuple, highdicom.VOILUT] = {}
    for ref, display in displays:
        voi = display.voi
        if isinstance(voi, Window):
            key = ("window", voi.centers, voi.widths, voi.explanations, voi.function)
        else:
            table = _normalised_table(voi)
            key = ("table", table.first_mapped_value, table.LUTData)
            tables[key] = table
        groups.setdefault(key, []).append(ref)
    vois = []
    for key, members in groups.items():
        refs = None if len(groups) == 1 else highdicom.ReferencedImageSequence(members)
        if key[0] == "window":
            _, centers, widths, explanations, function = key
            vois.append(
                SoftcopyVOILUTTransformation(
                    window_center=list(centers),
                    window_width=list(widths),
                    window_explanation=list(explanations) if explanations else None,
                    voi_lut_function=None if function == "LINEAR" else function,
                    referenced_images=refs,
                )
            )
        else:
            vois.append(SoftcopyVOILUTTransformation(voi_luts=[tables[key]], referenced_images=refs))
    return vois


def _normalised_table(table: LookupTable) -> highdicom.VOILUT:
    """`table` as a 16-bit VOILUT whose entries span 0..65535.

    The pipeline scales a VOI LUT's own output range to black..white
    (LookupTable.apply_normalised); a viewer scales 0..2^bits-1. A table spanning the
    full 16 bits looks the same to both.
    """
    entries = table.entries
    low, high = int(entries.min()), int(entries.max())
    scale = 65535 / (high - low) if high > low else 0.0
    return highdicom.VOILUT(
        first_mapped_value=table.first_mapped,
        lut_data=np.round((entries - low) * scale).astype(np.uint16),
        lut_explanation=fit(table.explanation, 64) if table.explanation else None,
    )


def _baked_table(ref: Dataset, display: Display, shift: int) -> highdicom.VOILUT:
    """A VOI LUT from (shifted) stored values to display values: the whole pipeline."""
    if display.stored_max + shift >= 1 << 16:
        raise UnsupportedImage(
            f"image {ref.SOPInstanceUID}: more than 16 bits of stored values in a study whose "
            "images need different modality LUTs or polarities"
        )
    stored = np.arange(display.stored_min, display.stored_max + 1, dtype=np.int64)
    levels = np.round(replace(display, inverse=False).render(stored) * np.float32(65535))
    if display.inverse:
        levels = 65535 - levels  # inverted in whole levels: exactly the mirror image
    return highdicom.VOILUT(
        first_mapped_value=display.stored_min + shift,
        lut_data=levels.astype(np.uint16),
        lut_explanation="MODALITY, VOI AND POLARITY",
    )
