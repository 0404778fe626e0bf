"""Frames of multi-frame images, and where each frame's grayscale attributes are.

Enhanced multi-frame objects (breast tomosynthesis, PS3.3 A.84) carry the Modality LUT
and VOI LUT attributes in functional group macros instead of the top level: Pixel Value
Transformation (PS3.3 C.7.6.16.2.9) and Frame VOI LUT (C.7.6.16.2.10), either shared by
all frames or per frame (PS3.3 C.7.6.16: a macro is in one or the other; per-frame wins
here should a writer put it in both).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

PIXEL_VALUE_TRANSFORMATION = "PixelValueTransformationSequence"
FRAME_VOI_LUT = "FrameVOILUTSequence"


def frame_count(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def central_frame(ds: Dataset) -> int:
    """Index (0-based) of the central frame of a multi-frame image, e.g. a tomosynthesis slice."""
    return frame_count(ds) // 2


def functional_group_item(ds: Dataset, frame: int | None, macro: str) -> Dataset | None:
    """The item of `macro` (a functional group sequence keyword) that applies to `frame`.

    The per-frame item when there is one, else the shared one, else None.
    """
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame is not None and 0 <= frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        sequence = group.get(macro)
        if sequence:
            return sequence[0]
    return None
