"""Read back what a burned-in capture shows: the rectangle drawn in its pixels.

Written against the pixels, not against our builder: a rectangle is the rows and the columns
holding a straight run of the box colour much longer than any letter of the drawn text, so
that a test finds the box as a reader of the image would.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
MIN_EDGE = 16  # pixels: longer than any stroke of the drawn text at these image sizes


def _longest_runs(mask: np.ndarray) -> np.ndarray:
    """Per row of `mask`, the length of its longest run of True."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    longest = np.zeros(mask.shape[0], dtype=int)
    for row, steps in enumerate(np.diff(padded, axis=1)):
        starts, ends = np.flatnonzero(steps == 1), np.flatnonzero(steps == -1)
        if starts.size:
            longest[row] = int((ends - starts).max())
    return longest


def drawn_box(capture: Dataset, colour=(255, 255, 0)) -> tuple[int, int, int, int] | None:
    """The one rectangle outlined in `colour` in the capture's pixels, as the box it encloses
    in pixel-edge coordinates (x0, y0, x1, y1: the outline's inner edges); None without one."""
    mask = np.all(capture.pixel_array == np.asarray(colour, dtype=np.uint8), axis=-1)
    rows = np.flatnonzero(_longest_runs(mask) >= MIN_EDGE)  # the top and bottom lines
    columns = np.flatnonzero(_longest_runs(mask.T) >= MIN_EDGE)  # the left and right lines
    if rows.size == 0 or columns.size == 0:
        return None
    top, bottom = _two_lines(rows)
    left, right = _two_lines(columns)
    return (left[-1] + 1, top[-1] + 1, right[0], bottom[0])


def _two_lines(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split consecutive indices into the two lines of an outline (each a few pixels thick)."""
    gaps = np.flatnonzero(np.diff(indices) > 1)
    if gaps.size != 1:
        raise AssertionError(f"not one rectangle: lines at {indices.tolist()}")
    return indices[: gaps[0] + 1], indices[gaps[0] + 1:]
