"""The one pixel pipeline: DICOM pixel data -> display-ready float32 image -> model input.

Used by the node, training, evaluation and the GSPS builder alike, so a model sees the
same pixels everywhere and the presentation state shows the radiologist what the model
saw. The steps follow the grayscale rendering pipeline of PS3.4 N.2.1.1:

1. decode the stored values (pydicom with the pylibjpeg plugins: JPEG, JPEG-LS,
   JPEG 2000, RLE), bounded by what the image declares (`display.stored_values`);
2. Modality LUT: Rescale Slope/Intercept or Modality LUT Sequence (PS3.3 C.11.1);
3. VOI LUT: the first Window Center/Width with its VOI LUT Function (LINEAR,
   LINEAR_EXACT, SIGMOID; PS3.3 C.11.2.1.2 and C.11.2.1.3), else the first VOI LUT
   Sequence item, else the image's own min/max;
4. MONOCHROME1 is inverted so that dense tissue is bright (PS3.3 C.7.6.3.1.2).

Modules: `lut` (the transformations as values: rescale, lookup table, window),
`frames` (functional groups of enhanced multi-frame images), `display` (which
transformations apply to an image, `display_of`, and rendering), `resize` (the model
input and the one place where boxes move between pixel spaces), `kinds` (image kinds).
"""

from dicom_node.pixels.display import (
    FULL_RANGE,
    Display,
    declared_pixel_bytes,
    display_of,
    display_pixels,
    stored_values,
)
from dicom_node.pixels.frames import central_frame
from dicom_node.pixels.kinds import ImageKind, image_kind
from dicom_node.pixels.lut import LookupTable, Rescale, Window
from dicom_node.pixels.resize import PreparedImage, prepare, resize_longest_side

__all__ = [
    "FULL_RANGE",
    "Display",
    "ImageKind",
    "LookupTable",
    "PreparedImage",
    "Rescale",
    "Window",
    "central_frame",
    "declared_pixel_bytes",
    "display_of",
    "display_pixels",
    "image_kind",
    "prepare",
    "resize_longest_side",
    "stored_values",
]
