"""Which grayscale transformations apply to an image, and applying them (PS3.4 N.2.1.1).

`display_of(ds, frame)` says, without decoding anything, how a frame is displayed:
a `Display` with the Modality LUT (`Rescale` or `LookupTable`), the VOI LUT (`Window`,
`LookupTable`, or None for the range of the image's own values) and whether the
values are inverted (MONOCHROME1). The model input, training and the GSPS builder all
take it from here, so what the radiologist sees through the GSPS is what the model saw.

`display_pixels` decodes and renders: float32 in [0, 1], dense tissue bright.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from dicom_node.errors import PermanentError, UnsupportedImage
from dicom_node.pixels.frames import (
    FRAME_VOI_LUT,
    PIXEL_VALUE_TRANSFORMATION,
    frame_count,
    functional_group_item,
)
from dicom_node.pixels.lut import LookupTable, Rescale, Window

FULL_RANGE = "FULL RANGE"  # explanation of the window spanning an image's own values


@dataclass(frozen=True)
class Display:
    """How one frame of a grayscale image is displayed without a presentation state."""

    modality: Rescale | LookupTable  # PS3.3 C.11.1
    voi: Window | LookupTable | None  # PS3.3 C.11.2; None: the image's own min..max
    inverse: bool  # MONOCHROME1 (PS3.3 C.7.6.3.1.2): the minimum value is white
    stored_min: int  # the range Bits Stored and Pixel Representation allow
    stored_max: int

    def resolved(self, stored: np.ndarray) -> Display:
        """This display with a concrete VOI: the window spanning `stored`'s modality values."""
        if self.voi is not None:
            return self
        values = self.modality_values(stored)
        return replace(self, voi=Window.spanning(values.min(), values.max(), explanation=FULL_RANGE))

    def modality_values(self, stored: np.ndarray) -> np.ndarray:
        """Stored values through the Modality LUT, as float32."""
        return np.asarray(self.modality.apply(stored), dtype=np.float32)

    def render(self, stored: np.ndarray) -> np.ndarray:
        """Stored values -> float32 display values in [0, 1], dense tissue bright."""
        values = self.modality_values(stored)
        voi = self.voi
        if voi is None:
            voi = Window.spanning(values.min(), values.max(), explanation=FULL_RANGE)
        if isinstance(voi, Window):
            image = voi.apply(values)
        else:
            image = voi.apply_normalised(values)
        if self.inverse:
            # The MG and DX Presentation LUT Shape INVERSE states this same inversion,
            # not a second one.
            image = 1.0 - image
        return np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)


def display_of(ds: Dataset, frame: int | None = None) -> Display:
    """The Modality LUT, VOI LUT and polarity that apply to `frame` (0-based) of `ds`.

    Modality LUT (PS3.3 C.11.1): the Modality LUT Sequence's first item, else Rescale
    Slope/Intercept, else the identity. VOI LUT (C.11.2): an image may offer windows
    and VOI LUT tables, and which one applies is the application's choice; the first
    window is the vendor's default view and carries the VOI LUT Function (GE writes
    SIGMOID), so it goes first, then the first VOI LUT Sequence item, else None (the
    image's own range). An unusable table or window is passed over.
    """
    little_endian = ds.original_encoding[1]
    little_endian = True if little_endian is None else bool(little_endian)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    stored_min = -(1 << (bits - 1)) if signed else 0
    stored_max = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1

    pixel_source = functional_group_item(ds, frame, PIXEL_VALUE_TRANSFORMATION) or ds
    modality: Rescale | LookupTable = _rescale(pixel_source)
    tables = pixel_source.get("ModalityLUTSequence") or ds.get("ModalityLUTSequence")
    if tables:
        # C.11.1.1.1: the first value mapped is US or SS as Pixel Representation says.
        table = _table(tables[0], signed_input=signed, little_endian=little_endian)
        if table is not None:
            modality = table

    voi_source = functional_group_item(ds, frame, FRAME_VOI_LUT) or ds
    voi: Window | LookupTable | None = Window.from_attributes(voi_source)
    if voi is None:
        # C.11.2.1.1: the VOI LUT's first value mapped is signed when its input may
        # be: signed stored values without rescale, or rescaled values below zero.
        if isinstance(modality, Rescale):
            voi_signed = modality.output_range(stored_min, stored_max)[0] < 0
        else:
            voi_signed = False  # a Modality LUT's output is unsigned
        for item in voi_source.get("VOILUTSequence") or ds.get("VOILUTSequence") or ():
            voi = _table(item, signed_input=voi_signed, little_endian=little_endian)
            if voi is not None:
                break
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    return Display(
        modality=modality,
        voi=voi,
        inverse=photometric == "MONOCHROME1",
        stored_min=stored_min,
        stored_max=stored_max,
    )


def declared_pixel_bytes(ds: Dataset) -> int:
    """What decoding all of `ds`'s pixel data would take, by its own attributes (PS3.5 8.1.1)."""
    bits = int(ds.get("BitsAllocated", 16) or 16)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    return (
        int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        * samples * frame_count(ds) * bits // 8
    )


def stored_values(ds: Dataset, *, frame: int | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Decode the stored values of `ds` (one frame of a multi-frame image), HxW.

    Errors name the SOP Instance UID: UnsupportedImage for images this pipeline does not
    handle (colour, multi-frame without a frame, larger than `max_bytes` decoded),
    PermanentError for pixel data that cannot be decoded.
    """
    uid = str(ds.get("SOPInstanceUID", "(no SOP Instance UID)"))
    if max_bytes is not None and (declared := declared_pixel_bytes(ds)) > max_bytes:
        # Checked before decoding: a few kB of JPEG 2000 may declare 65535 x 65535 pixels.
        raise UnsupportedImage(
            f"{uid}: the image declares {declared // 2**20} MB of pixels, more than "
            f"node.max_dataset_megabytes ({max_bytes // 2**20} MB)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsupportedImage(
            f"{uid}: Photometric Interpretation {photometric or '(missing)'} is not grayscale"
        )
    frames = frame_count(ds)
    if frame is None and frames > 1:
        raise UnsupportedImage(f"{uid}: multi-frame image ({frames} frames) and no frame selected")
    if frame is not None and not 0 <= frame < frames:
        raise ValueError(f"{uid}: frame {frame} is out of range (0..{frames - 1})")
    try:
        stored = pixel_array(ds, index=frame if frames > 1 else None)
    except Exception as error:  # any decoder failure means the same thing to the caller
        raise PermanentError(f"{uid}: cannot decode pixel data ({error})") from error
    if stored.ndim != 2:
        raise PermanentError(
            f"{uid}: decoded pixel data has shape {stored.shape}, not rows x columns"
        )
    return stored


def display_pixels(ds: Dataset, *, frame: int | None = None, max_bytes: int | None = None) -> np.ndarray:
    """Decode `ds` and apply Modality LUT, VOI LUT and MONOCHROME1 inversion.

    Returns float32 HxW in [0, 1] at the original size, dense tissue bright.
    `frame` (0-based) selects one frame of a multi-frame image. Errors as `stored_values`.
    """
    stored = stored_values(ds, frame=frame, max_bytes=max_bytes)
    return display_of(ds, frame).render(stored)


def _rescale(source: Dataset) -> Rescale:
    try:
        slope = float(source.get("RescaleSlope", 1) or 1)
        intercept = float(source.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0  # malformed DS: the identity, as when absent
    return Rescale(slope=slope, intercept=intercept, type=str(source.get("RescaleType") or "US"))


def _table(item: Dataset, *, signed_input: bool, little_endian: bool) -> LookupTable | None:
    try:
        return LookupTable.from_item(item, signed_input=signed_input, little_endian=little_endian)
    except (AttributeError, TypeError, ValueError):
        return None
