"""Augmentations move boxes with the pixels, stay in range, and are reproducible."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_node.lab.train.augment import augment, hflip, jitter, rotate, rotate_boxes
from dicom_node.lab.train.config import AugmentConfig


def _image_with_square(height=60, width=80, box=(10, 20, 30, 35)):
    image = torch.zeros(height, width)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = 1.0
    return image, torch.tensor([list(map(float, box))])


def _bright_extent(image: torch.Tensor, level: float = 0.5) -> tuple[float, float, float, float]:
    ys, xs = torch.nonzero(image > level, as_tuple=True)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def test_hflip_maps_pixels_and_boxes_exactly():
    image, boxes = _image_with_square()
    flipped, flipped_boxes = hflip(image, boxes)
    assert flipped_boxes.tolist() == [[80 - 30, 20, 80 - 10, 35]]
    assert _bright_extent(flipped) == tuple(flipped_boxes[0].tolist())
    again, again_boxes = hflip(flipped, flipped_boxes)
    assert torch.equal(again, image) and torch.equal(again_boxes, boxes)


def test_rotation_by_zero_is_identity():
    image, boxes = _image_with_square()
    rotated, rotated_boxes = rotate(image, boxes, 0.0)
    assert torch.allclose(rotated, image, atol=1e-5)
    assert torch.allclose(rotated_boxes, boxes)


@pytest.mark.parametrize("angle", [-10.0, 7.5, 30.0])
def test_rotated_box_encloses_the_rotated_object(angle):
    image, boxes = _image_with_square(box=(30, 20, 50, 40))
    rotated, rotated_boxes = rotate(image, boxes, angle)
    x0, y0, x1, y1 = rotated_boxes[0].tolist()
    bx0, by0, bx1, by1 = _bright_extent(rotated)
    # The box encloses the rotated square, and is tight to within the bilinear blur.
    assert x0 <= bx0 + 1 and y0 <= by0 + 1 and x1 >= bx1 - 1 and y1 >= by1 - 1
    assert bx0 <= x0 + 1.5 and by0 <= y0 + 1.5 and bx1 >= x1 - 1.5 and by1 >= y1 - 1.5


@settings(max_examples=50, deadline=None)
@given(
    angle=st.floats(-45, 45),
    x0=st.floats(0, 70), y0=st.floats(0, 50), w=st.floats(1, 60), h=st.floats(1, 60),
)
def test_rotated_boxes_stay_inside_the_image(angle, x0, y0, w, h):
    boxes = torch.tensor([[x0, y0, min(x0 + w, 80.0), min(y0 + h, 60.0)]])
    out = rotate_boxes(boxes, angle, height=60, width=80)
    assert (out[:, [0, 2]] >= 0).all() and (out[:, [0, 2]] <= 80).all()
    assert (out[:, [1, 3]] >= 0).all() and (out[:, [1, 3]] <= 60).all()
    assert (out[:, 2] >= out[:, 0]).all() and (out[:, 3] >= out[:, 1]).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), strength=st.floats(0.0, 0.9))
def test_jitter_keeps_the_range(seed, strength):
    image = torch.rand(32, 24, generator=torch.Generator().manual_seed(seed))
    out = jitter(image, brightness=strength, contrast=strength, gamma=strength,
                 generator=torch.Generator().manual_seed(seed))
    assert out.shape == image.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_augment_is_deterministic_for_a_seed_and_varies_across_seeds():
    image, boxes = _image_with_square()
    image = image * 0.5 + 0.25
    options = AugmentConfig(rotation_degrees=10, horizontal_flip=0.5)
    a = augment(image, boxes, options, generator=torch.Generator().manual_seed(3))
    b = augment(image, boxes, options, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [augment(image, boxes, options, generator=torch.Generator().manual_seed(s)) for s in range(4, 9)]
    assert any(not torch.equal(a[0], other[0]) for other in others)


def test_augment_drops_boxes_rotated_out_of_the_image():
    image = torch.zeros(60, 80)
    corner = torch.tensor([[0.0, 0.0, 2.0, 2.0], [30.0, 20.0, 50.0, 40.0]])
    options = AugmentConfig(brightness=0, contrast=0, gamma=0, horizontal_flip=0, rotation_degrees=45)
    kept = []
    for seed in range(20):
        _, out = augment(image, corner, options, generator=torch.Generator().manual_seed(seed))
        assert ((out[:, 2] - out[:, 0]) >= 1).all() and ((out[:, 3] - out[:, 1]) >= 1).all()
        kept.append(len(out))
    # The central box always survives; the corner box is lost at some angles.
    assert min(kept) >= 1 and min(kept) < 2


def test_a_focused_crop_keeps_its_mass_and_moves_the_box_with_the_pixels():
    """Crops are cut from a rotated window around them: the box still frames the bright square."""
    from dicom_node.lab.train.config import AugmentConfig

    image = torch.zeros(400, 300)
    image[200:240, 100:140] = 1.0
    boxes = torch.tensor([[100.0, 200.0, 140.0, 240.0]])
    options = AugmentConfig(brightness=0, contrast=0, gamma=0, rotation_degrees=10, horizontal_flip=0.5,
                            crop_size=128, crop_focus=1.0)
    for seed in range(20):
        out, kept = augment(image, boxes, options, generator=torch.Generator().manual_seed(seed))
        assert out.shape == (128, 128)
        assert len(kept) == 1
        x0, y0, x1, y1 = kept[0].round().int().tolist()
        inside = out[y0:y1, x0:x1]
        assert inside.sum() >= 0.9 * out.sum()  # the rotated square lies within its box
        assert out.sum() > 0.5 * 40 * 40 * 0.9


def test_a_crop_larger_than_the_image_keeps_the_whole_image():
    from dicom_node.lab.train.config import AugmentConfig

    image = torch.rand(60, 50)
    options = AugmentConfig(brightness=0, contrast=0, gamma=0, rotation_degrees=0, horizontal_flip=0,
                            crop_size=128, crop_focus=0.5)
    out, _ = augment(image, torch.zeros(0, 4), options, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, image)
