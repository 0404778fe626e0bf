"""Resize for the model, and the one place where boxes move between pixel spaces.

Box coordinates are continuous pixel-edge coordinates: x runs from 0 (left edge of
the first column) to Columns (right edge of the last), y likewise to Rows, the
convention of PS3.3 C.10.5.1.2 for graphic annotations in PIXEL units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset

from dicom_node.pixels.display import display_pixels


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

    def boxes_from_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map Nx4 boxes from original to resized pixels (float32, unclipped): the inverse
        of `boxes_to_original`, with the same per-axis factors (labels for training)."""
        rows, columns = self.original_shape
        factors = np.array([self.pixels.shape[1] / columns, self.pixels.shape[0] / rows] * 2, dtype=np.float32)
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * factors


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
    """Display pixels of `ds` resized so that the longest side is `input_size`, in [0, 1]."""
    prepared = resize_longest_side(display_pixels(ds, frame=frame, max_bytes=max_bytes), input_size)
    # The resize's weights sum to 1 only to float32 precision: 1 + 1e-7 would leave [0, 1].
    np.clip(prepared.pixels, 0.0, 1.0, out=prepared.pixels)
    return prepared
