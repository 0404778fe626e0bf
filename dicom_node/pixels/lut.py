"""The grayscale transformations of PS3.3 C.11 as values: rescale, lookup table, window.

- `Rescale`: the linear Modality LUT, Rescale Slope and Intercept (PS3.3 C.11.1).
- `LookupTable`: one item of a Modality LUT Sequence (C.11.1.1) or VOI LUT Sequence
  (C.11.2.1.1), decoded from LUT Descriptor and LUT Data whatever their encoding.
- `Window`: Window Center/Width with the VOI LUT Function LINEAR (C.11.2.1.2.1),
  LINEAR_EXACT or SIGMOID (C.11.2.1.3).

Each applies itself to an array; `dicom_node.pixels.display` decides which ones apply
to an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True)
class Rescale:
    """Modality LUT as Rescale Slope and Intercept: output = stored * slope + intercept."""

    slope: float = 1.0
    intercept: float = 0.0
    type: str = "US"  # Rescale Type (PS3.3 C.11.1.1.2); US (unspecified) when absent

    def apply(self, stored: np.ndarray) -> np.ndarray:
        values = stored.astype(np.float32)
        if self.slope != 1.0:
            values *= np.float32(self.slope)
        if self.intercept != 0.0:
            values += np.float32(self.intercept)
        return values

    def output_range(self, low: float, high: float) -> tuple[float, float]:
        """The outputs of stored values `low` and `high`, smallest first."""
        ends = sorted((low * self.slope + self.intercept, high * self.slope + self.intercept))
        return ends[0], ends[1]


@dataclass(frozen=True, eq=False)
class LookupTable:
    """A decoded LUT: input `first_mapped + i` maps to `entries[i]` (PS3.3 C.11.1.1.1).

    Inputs below `first_mapped` take the first entry, inputs past the end the last
    one (C.11.2.1.1). `bits` is the LUT Descriptor's third value: entries lie in
    0..2^bits - 1.
    """

    first_mapped: int
    bits: int
    entries: np.ndarray  # int64, one per table entry
    explanation: str | None = None

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Look up integer `values` (int64 result)."""
        index = np.asarray(values, dtype=np.int64) - self.first_mapped
        np.clip(index, 0, self.entries.size - 1, out=index)
        return self.entries[index]

    def apply_normalised(self, values: np.ndarray) -> np.ndarray:
        """Look up `values` (rounded to integers) and scale the table's own output range to [0, 1].

        The table's range rather than 0..2^bits - 1 (PS3.3 C.11.6.1 note 3): some vendors
        declare 16-bit entries but fill only 12 bits, which would render nearly black.
        """
        low, high = int(self.entries.min()), int(self.entries.max())
        looked_up = self.apply(np.rint(values)).astype(np.float32)
        if high <= low:
            return np.zeros(looked_up.shape, dtype=np.float32)
        return (looked_up - np.float32(low)) / np.float32(high - low)

    @classmethod
    def from_item(cls, item: Dataset, *, signed_input: bool, little_endian: bool) -> LookupTable:
        """Decode a Modality or VOI LUT Sequence item.

        `signed_input`: the LUT Descriptor's second value (first value mapped) is SS,
        not US (C.11.1.1.1: as Pixel Representation says; C.11.2.1.1: for a VOI LUT,
        also when the rescaled values may be negative). `little_endian`: the byte
        order of the data set, which LUT Data of VR OW (raw bytes in pydicom) is in.
        Raises ValueError for a malformed item.
        """
        descriptor = [int(v) for v in _values(item.get("LUTDescriptor"))]
        if len(descriptor) != 3:
            raise ValueError(f"LUT Descriptor has {len(descriptor)} values, not 3")
        # All three values arrive as US or SS depending on the reader (PS3.3 C.11.1.1.1:
        # the first and third are always unsigned); reduce to 16 bits, then re-sign.
        count, first, bits = (value & 0xFFFF for value in descriptor)
        count = count or 65536  # 0 means 2^16 entries
        if signed_input and first >= 32768:
            first -= 65536
        if not 1 <= bits <= 16:
            raise ValueError(f"LUT Descriptor declares {bits} bits per entry")
        entries = _lut_entries(item.get("LUTData"), count=count, bits=bits, little_endian=little_endian)
        if entries.size == 0:
            raise ValueError("LUT Data is empty")
        explanation = item.get("LUTExplanation")
        return cls(
            first_mapped=first,
            bits=bits,
            entries=entries[:count],
            explanation=str(explanation) if explanation else None,
        )


def _lut_entries(data, *, count: int, bits: int, little_endian: bool) -> np.ndarray:
    """LUT Data as int64 entries.

    OW arrives as raw bytes: 16-bit words in the data set's byte order. 8-bit entries
    are packed two per word, the first in the low byte (PS3.3 C.11.1.1.1 as clarified by
    CP-522); a table with one padded word per 8-bit entry is recognised by its length.
    """
    if data is None:
        raise ValueError("no LUT Data")
    if isinstance(data, bytes):
        words = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2" if little_endian else ">u2")
    else:
        words = np.asarray(_values(data), dtype=np.int64) & 0xFFFF
    words = words.astype(np.int64)
    if bits <= 8 and words.size < count:
        # Packed: low byte first (the order of the bytes in a little endian stream).
        words = np.stack([words & 0xFF, words >> 8], axis=1).reshape(-1)
    return words & ((1 << bits) - 1)


@dataclass(frozen=True)
class Window:
    """Window Center/Width values and the VOI LUT Function; the first window is applied.

    `explanations` (Window Center & Width Explanation) is None or one per window.
    """

    centers: tuple[float, ...]
    widths: tuple[float, ...]
    function: str = "LINEAR"
    explanations: tuple[str, ...] | None = None

    @classmethod
    def spanning(cls, low: float, high: float, *, explanation: str) -> Window:
        """The LINEAR window that maps `low` to 0 and `high` to 1 (PS3.3 C.11.2.1.2.1).

        LINEAR maps [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] onto the output range, so
        c = low + (high - low + 1) / 2 and w = high - low + 1.
        """
        low, high = float(low), float(high)
        return cls(
            centers=(low + (high - low + 1) / 2,),
            widths=(high - low + 1,),
            explanations=(explanation,),
        )

    @classmethod
    def from_attributes(cls, source: Dataset) -> Window | None:
        """The windows of `source`, or None when it has no usable first window.

        Windows are kept from the first up to the first invalid one (width <= 0, or < 1
        for LINEAR, which C.11.2.1.2.1 requires; centre and width counts that differ).
        """
        try:
            centers = [float(v) for v in _values(source.get("WindowCenter"))]
            widths = [float(v) for v in _values(source.get("WindowWidth"))]
        except (TypeError, ValueError):
            return None  # an empty or malformed window: treated as no window
        function = str(source.get("VOILUTFunction") or "LINEAR").strip().upper()
        if function not in VOI_FUNCTIONS:
            function = "LINEAR"  # PS3.3 defines no other; LINEAR is the default
        least = 1.0 if function == "LINEAR" else 0.0
        kept = 0
        for center, width in zip(centers, widths):
            if not (np.isfinite(center) and np.isfinite(width)) or width < least or width <= 0:
                break
            kept += 1
        if kept == 0:
            return None
        explanations = [str(v) for v in _values(source.get("WindowCenterWidthExplanation"))]
        return cls(
            centers=tuple(centers[:kept]),
            widths=tuple(widths[:kept]),
            function=function,
            explanations=tuple(explanations[:kept]) if len(explanations) >= kept else None,
        )

    def apply(self, values: np.ndarray) -> np.ndarray:
        """The first window applied to modality values, output in [0, 1]."""
        center, width = self.centers[0], self.widths[0]
        if self.function == "SIGMOID":  # PS3.3 C.11.2.1.3.1
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        if self.function == "LINEAR_EXACT":  # PS3.3 C.11.2.1.3.2
            return np.clip((values - center) / width + 0.5, 0.0, 1.0)
        # PS3.3 C.11.2.1.2.1 LINEAR: the width-1 and center-0.5 terms make integer
        # windows map to whole output levels.
        if width <= 1:
            return (values > center - 0.5).astype(np.float32)
        return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _values(value) -> list:
    """A DICOM value as a list: empty for None or '', one item for a single value."""
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    return [value]
