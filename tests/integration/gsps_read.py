"""Read back what a GSPS shows: referenced images, boxes per image, texts per image.

Written against the standard's attributes (PS3.3 C.10.5 Graphic Annotation, C.11.11
Presentation State Relationship), not against our builder, so that a test reads the
GSPS as a viewer would.
"""

from __future__ import annotations

from collections import defaultdict

from pydicom.dataset import Dataset

GSPS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


def referenced_images(gsps: Dataset) -> set[str]:
    return {
        str(image.ReferencedSOPInstanceUID)
        for series in gsps.ReferencedSeriesSequence
        for image in series.ReferencedImageSequence
    }


def boxes_by_image(gsps: Dataset) -> dict[str, list[tuple[float, float, float, float]]]:
    """Closed PIXEL polylines of each referenced image, as (x0, y0, x1, y1)."""
    boxes = defaultdict(list)
    for annotation in gsps.get("GraphicAnnotationSequence", []):
        images = [str(i.ReferencedSOPInstanceUID) for i in annotation.ReferencedImageSequence]
        for graphic in annotation.get("GraphicObjectSequence", []):
            if graphic.GraphicType != "POLYLINE" or graphic.GraphicAnnotationUnits != "PIXEL":
                continue
            points = [float(v) for v in graphic.GraphicData]
            xs, ys = points[0::2], points[1::2]
            assert (xs[0], ys[0]) == (xs[-1], ys[-1]), "rectangle is not closed"
            for uid in images:
                boxes[uid].append((min(xs), min(ys), max(xs), max(ys)))
    return dict(boxes)


def texts_by_image(gsps: Dataset) -> dict[str, list[str]]:
    texts = defaultdict(list)
    for annotation in gsps.get("GraphicAnnotationSequence", []):
        images = [str(i.ReferencedSOPInstanceUID) for i in annotation.ReferencedImageSequence]
        for text in annotation.get("TextObjectSequence", []):
            for uid in images:
                texts[uid].append(str(text.UnformattedTextValue))
    return dict(texts)
