"""resize_longest_side and PreparedImage.boxes_to_original: the one box mapping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_node.pixels import PreparedImage, resize_longest_side


def square_image(shape, box):
    """Zeros with ones inside box (x0, y0, x1, y1) in pixel-edge coordinates."""
    image = np.zeros(shape, dtype=np.float32)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = 1.0
    return image


def bright_box(pixels: np.ndarray) -> np.ndarray:
    """The box (pixel edges) around the pixels brighter than half."""
    rows, columns = np.nonzero(pixels > 0.5)
    return np.array([[columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]], dtype=float)


@pytest.mark.parametrize(
    ("shape", "box", "size"),
    [
        ((300, 200), (40, 100, 90, 160), 120),  # downscale, portrait
        ((77, 301), (200, 10, 260, 60), 100),  # odd sizes: per-axis rounding
        ((60, 40), (10, 20, 30, 50), 150),  # upscale
    ],
)
def test_box_found_in_resized_image_maps_back_onto_the_original(shape, box, size):
    prepared = resize_longest_side(square_image(shape, box), size)
    assert max(prepared.pixels.shape) == size
    mapped = prepared.boxes_to_original(bright_box(prepared.pixels))
    # Within one resized pixel, the resolution the model sees.
    np.testing.assert_allclose(mapped[0], box, atol=1 / prepared.scale + 1e-6)


def test_aspect_ratio_and_scale():
    prepared = resize_longest_side(np.random.default_rng(0).random((400, 300)), 200)
    assert prepared.pixels.shape == (200, 150)
    assert prepared.scale == pytest.approx(0.5)
    assert prepared.original_shape == (400, 300)
    assert prepared.pixels.dtype == np.float32


def test_same_size_is_unchanged():
    image = np.random.default_rng(1).random((64, 48)).astype(np.float32)
    prepared = resize_longest_side(image, 64)
    np.testing.assert_array_equal(prepared.pixels, image)
    assert prepared.scale == 1.0


def test_boxes_are_clipped_to_the_original_image():
    prepared = PreparedImage(
        pixels=np.zeros((50, 40), np.float32), scale=0.5, original_shape=(100, 80)
    )
    boxes = np.array([[-5, -5, 10, 10], [30, 40, 45, 60]], dtype=float)
    mapped = prepared.boxes_to_original(boxes)
    np.testing.assert_allclose(mapped, [[0, 0, 20, 20], [60, 80, 80, 100]])


def test_no_boxes_gives_an_empty_array():
    prepared = resize_longest_side(np.zeros((10, 10), np.float32), 5)
    assert prepared.boxes_to_original(np.zeros((0, 4))).shape == (0, 4)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(4, 400),
    columns=st.integers(4, 400),
    size=st.integers(8, 300),
    seed=st.integers(0, 2**16),
)
def test_resize_properties(rows, columns, size, seed):
    image = np.random.default_rng(seed).random((rows, columns)).astype(np.float32)
    prepared = resize_longest_side(image, size)
    height, width = prepared.pixels.shape
    assert max(height, width) == size
    # aspect ratio kept up to rounding to whole pixels (at least one)
    assert height == max(1, round(rows * size / max(rows, columns)))
    assert width == max(1, round(columns * size / max(rows, columns)))
    # antialiased bilinear weights are non-negative: no overshoot
    assert prepared.pixels.min() >= image.min() - 1e-6
    assert prepared.pixels.max() <= image.max() + 1e-6
    # the whole resized image maps onto the whole original
    full = prepared.boxes_to_original(np.array([[0, 0, width, height]], dtype=float))
    np.testing.assert_allclose(full[0], [0, 0, columns, rows], atol=1e-6)
