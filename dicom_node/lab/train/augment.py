"""Training augmentations on single-channel (grayscale) image tensors with their boxes.

The study trained with saturation, brightness and contrast jitter, rotation and
horizontal flip. A mammogram has one channel, so *saturation* (the distance of a
colour from grey) has no meaning on it. We map it to **gamma jitter**: ``x ** g``
with ``g`` drawn around 1 changes the contrast of the mid-tones, the part of the
range saturation acts on in a colour image, while black stays black and white
stays white. The photometric jitters are therefore brightness, contrast and gamma.

Geometric augmentations move the boxes with the pixels:
- horizontal flip: ``x0' = W - x1``, ``x1' = W - x0`` (exact);
- rotation by a small angle about the image centre: the four corners of each box
  are rotated and the enclosing axis-aligned box is taken, then clipped to the
  image; boxes left with no area are dropped. Corners uncovered by the rotation
  are filled with 0 (background, as outside the breast);
- random crop (optional, ``crop_size``; not one of the study's augmentations): a
  ``crop_size`` square window, centred near a random mass with probability
  ``crop_focus`` and anywhere otherwise. Boxes are clipped to the window and kept when
  at least half of their area is inside. Training on crops of images prepared at the
  full input size keeps the masses at the scale the model sees at inference while
  costing a fraction of the compute (used for the CPU-trained demo weights).

Boxes are ``x0, y0, x1, y1`` in pixel coordinates of the tensor (pixel ``i`` spans
``[i, i + 1)``). Every random draw comes from the ``torch.Generator`` passed in, so a
seeded generator gives the same augmentations on every run and on every machine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dicom_node.lab.train.config import AugmentConfig


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def jitter(image: torch.Tensor, *, brightness: float, contrast: float, gamma: float,
           generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and gamma jitter of a [0, 1] image; the result stays in [0, 1]."""
    out = image.clamp(0, 1)
    if gamma:
        out = out.pow(_uniform(generator, 1 - gamma, 1 + gamma))
    if contrast:
        mean = out.mean()
        out = (out - mean) * _uniform(generator, 1 - contrast, 1 + contrast) + mean
    if brightness:
        out = out + _uniform(generator, -brightness, brightness)
    return out.clamp(0, 1)


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the image left-right and map the boxes exactly."""
    width = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.flip(-1), flipped


def _rotation(angle_degrees: float) -> torch.Tensor:
    angle = math.radians(angle_degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    return torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)


def rotate_boxes(boxes: torch.Tensor, angle_degrees: float, *, height: int, width: int) -> torch.Tensor:
    """Boxes enclosing the rotated corners of ``boxes``, clipped to the image (may be empty)."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    centre = torch.tensor([width / 2, height / 2], dtype=torch.float64)
    b = boxes.to(torch.float64)
    corners = torch.stack(
        [b[:, [0, 1]], b[:, [2, 1]], b[:, [0, 3]], b[:, [2, 3]]], dim=1
    )  # N x 4 corners x (x, y)
    rotated = (corners - centre) @ _rotation(angle_degrees).T + centre
    out = torch.cat([rotated.min(dim=1).values, rotated.max(dim=1).values], dim=1)
    out[:, [0, 2]] = out[:, [0, 2]].clamp(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clamp(0, height)
    return out.to(boxes.dtype)


def rotate(image: torch.Tensor, boxes: torch.Tensor, angle_degrees: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the image about its centre (bilinear, zero fill) and the boxes with it."""
    height, width = image.shape[-2:]
    # grid_sample maps each output location to the input location it samples:
    # in = R^-1 (out - c) + c in pixels; in normalised coordinates (pixel = S * norm + c,
    # S = diag(W/2, H/2)) that is in_norm = S^-1 R^-1 S out_norm.
    scale = torch.diag(torch.tensor([width / 2, height / 2], dtype=torch.float64))
    theta = torch.linalg.inv(scale) @ _rotation(angle_degrees).T @ scale  # R^-1 = R^T
    affine = torch.zeros(1, 2, 3, dtype=image.dtype, device=image.device)
    affine[0, :, :2] = theta.to(image.dtype)
    batch = image.reshape(1, 1, height, width)
    grid = F.affine_grid(affine, [1, 1, height, width], align_corners=False)
    rotated = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated.reshape(image.shape), rotate_boxes(boxes, angle_degrees, height=height, width=width)


def _window_origin(boxes: torch.Tensor, *, height: int, width: int, crop_h: int, crop_w: int, focus: float,
                   generator: torch.Generator) -> tuple[int, int]:
    """(left, top) of a ``crop_h`` x ``crop_w`` window; with probability ``focus`` (and boxes)
    it holds a random box, placed at a random position inside the window where it fits."""
    draw_focus = float(torch.rand((), generator=generator)) < focus
    if draw_focus and len(boxes):
        x0, y0, x1, y1 = boxes[int(torch.randint(len(boxes), (), generator=generator))].tolist()
        # Window origins that keep the box inside (or centred on it, if it is larger).
        lo_x, hi_x = x1 - crop_w, x0
        lo_y, hi_y = y1 - crop_h, y0
        if lo_x > hi_x:
            lo_x = hi_x = (x0 + x1 - crop_w) / 2
        if lo_y > hi_y:
            lo_y = hi_y = (y0 + y1 - crop_h) / 2
        left = _uniform(generator, max(lo_x, 0), max(min(hi_x, width - crop_w), 0))
        top = _uniform(generator, max(lo_y, 0), max(min(hi_y, height - crop_h), 0))
    else:
        left = _uniform(generator, 0, width - crop_w)
        top = _uniform(generator, 0, height - crop_h)
    left = int(min(max(round(left), 0), width - crop_w))
    top = int(min(max(round(top), 0), height - crop_h))
    return left, top


def _area(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def _clip_to(boxes: torch.Tensor, left: int, top: int, width: int, height: int) -> torch.Tensor:
    """Boxes moved into the window at (left, top), clipped to it; those left with less than
    half their area (or none) are dropped."""
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    clipped = shifted.clone()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clamp(0, width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clamp(0, height)
    keep = (_area(clipped) >= 0.5 * _area(shifted)) & (_area(clipped) > 0)
    return clipped[keep]


def crop(image: torch.Tensor, boxes: torch.Tensor, size: int, *, focus: float,
         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size`` x ``size`` window (smaller where the image is), boxes clipped to it.

    With probability ``focus`` (and when there are boxes) the window holds a random box,
    placed at a random position inside the window where it fits.
    """
    height, width = image.shape[-2:]
    crop_h, crop_w = min(size, height), min(size, width)
    left, top = _window_origin(boxes, height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                               focus=focus, generator=generator)
    window = image[..., top:top + crop_h, left:left + crop_w]
    return window, _clip_to(boxes, left, top, crop_w, crop_h)


def _padded_window(image: torch.Tensor, left: int, top: int, width: int, height: int) -> torch.Tensor:
    """image[top:top+height, left:left+width], with zeros (air) where it leaves the image."""
    rows, columns = image.shape[-2:]
    out = image.new_zeros((*image.shape[:-2], height, width))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, rows), min(left + width, columns)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top:y1 - top, x0 - left:x1 - left] = image[..., y0:y1, x0:x1]
    return out


def augment(image: torch.Tensor, boxes: torch.Tensor, options: AugmentConfig, *,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the configured augmentations to one image (HxW or 1xHxW) and its Nx4 boxes.

    Order: photometric jitter, flip, rotation, then the optional crop. Boxes that a
    rotation pushes out of the image, or that a crop cuts to less than half, are dropped.

    With a crop, the crop is placed first (as :func:`crop` places it) and only a window
    around it, wide enough for any rotation drawn, is jittered, flipped and rotated about
    its own centre before the crop is cut from its middle: the same kinds of samples for a
    fraction of the work (on 1024-pixel images and 512 crops, about a third), which is what
    bounds training speed on a GPU when augmentation runs in the loader's processes.
    """
    if options.crop_size:
        return _augment_cropped(image, boxes, options, generator=generator)
    return _jitter_flip_rotate(image, boxes, options, generator=generator)


def _jitter_flip_rotate(image: torch.Tensor, boxes: torch.Tensor, options: AugmentConfig, *,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    image = jitter(image, brightness=options.brightness, contrast=options.contrast,
                   gamma=options.gamma, generator=generator)
    if options.horizontal_flip and float(torch.rand((), generator=generator)) < options.horizontal_flip:
        image, boxes = hflip(image, boxes)
    if options.rotation_degrees:
        angle = _uniform(generator, -options.rotation_degrees, options.rotation_degrees)
        image, boxes = rotate(image, boxes, angle)
        keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        boxes = boxes[keep]
    return image, boxes


def _augment_cropped(image: torch.Tensor, boxes: torch.Tensor, options: AugmentConfig, *,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = image.shape[-2:]
    crop_h, crop_w = min(options.crop_size, height), min(options.crop_size, width)
    left, top = _window_origin(boxes, height=height, width=width, crop_h=crop_h, crop_w=crop_w,
                               focus=options.crop_focus, generator=generator)
    # A margin that keeps the crop's corners inside the window at the largest rotation.
    angle = math.radians(options.rotation_degrees)
    margin = math.ceil(max(crop_h, crop_w) * (math.cos(angle) + math.sin(angle) - 1) / 2) + 2
    window = _padded_window(image, left - margin, top - margin, crop_w + 2 * margin, crop_h + 2 * margin)
    boxes = _clip_to(boxes, left - margin, top - margin, crop_w + 2 * margin, crop_h + 2 * margin)
    window, boxes = _jitter_flip_rotate(window, boxes, options, generator=generator)
    cut = window[..., margin:margin + crop_h, margin:margin + crop_w]
    return cut, _clip_to(boxes, margin, margin, crop_w, crop_h)
