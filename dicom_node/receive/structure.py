"""A strict walk over the element structure of a received data set, values never decoded.

The SCP stores data set bytes exactly as received, so they must be one well-formed data
set in the negotiated transfer syntax before Success is sent (PS3.5 7: Data Set
encoding). pydicom is lenient on purpose: it switches between Explicit and Implicit VR
when the bytes do not match, reads a truncated data set up to where it ends, and warns
with the offending value quoted (patient data, when a wrong length made a UID swallow
the Patient module). This walk instead checks every element header, including those
inside sequences, and fails with a reason that quotes nothing received.

It returns the raw bytes of the few top-level elements the SCP needs to identify the
instance; pixel data and other values are skipped, never read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR

# PS3.5 7.1.2: in Explicit VR these VRs have two reserved bytes and a 32-bit length;
# all others have a 16-bit length.
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
VRS = LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)
UNDEFINED_LENGTH = 0xFFFFFFFF
# PS3.5 7.5: Item, Item Delimitation Item and Sequence Delimitation Item tags.
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
# No mammogram nests sequences this deep; readers recurse per level (pydicom, highdicom),
# so a data set nested deeper would fail them later, or overflow their stack.
MAX_NESTING = 32
TRUNCATED = "data set ends inside an element (truncated or wrong length)"

_DATASET, _ITEMS, _FRAGMENTS = range(3)


class MalformedDataset(ValueError):
    """The bytes are not one well-formed data set; the message quotes no received value."""


@dataclass
class ScannedDataset:
    values: dict[int, bytes] = field(default_factory=dict)  # tag -> raw value, top level only
    pixel_data_encapsulated: bool | None = None  # None: no Pixel Data element


def _is_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:  # private or unknown: read as a value (PS3.5 7.8, A.1)
        return False


def scan_dataset(
    buffer, *, start: int = 0, implicit: bool, wanted: frozenset[int]
) -> ScannedDataset:
    """Check the data set in ``buffer[start:]`` and return the raw values of the ``wanted`` tags.

    ``buffer`` is anything struct can unpack from and slice (bytes, mmap). Raises
    MalformedDataset for: a header that is not valid for the encoding (Explicit VR bytes on
    an Implicit VR context, or the reverse), a length running past its sequence, item or
    the end of the data, an undefined length where PS3.5 7.1.3 and 7.5 allow none, a
    missing delimiter (the data set ends inside a sequence) and nesting deeper than
    MAX_NESTING. The walk is iterative: depth costs no stack.
    """
    size = len(buffer)
    result = ScannedDataset()
    # Each frame: (kind, end offset or None for an undefined length, implicit VR).
    frames: list[tuple[int, int | None, bool]] = [(_DATASET, size, implicit)]
    pos = start
    if implicit and size - start >= 8 and bytes(buffer[start + 4 : start + 6]) in VRS:
        raise MalformedDataset("Explicit VR encoding on an Implicit VR context")
    while frames:
        kind, end, implicit = frames[-1]
        if pos == end:
            frames.pop()
            continue
        limit = size if end is None else end
        if pos + 8 > limit:
            raise MalformedDataset(TRUNCATED)
        group, element, length = struct.unpack_from("<HHL", buffer, pos)
        tag = group << 16 | element
        if kind != _DATASET:  # a sequence's items, or encapsulated pixel data fragments
            if tag == SEQUENCE_END and end is None:
                pos += 8
                frames.pop()
                continue
            if tag != ITEM:
                raise MalformedDataset("a sequence holds something other than items")
            pos += 8
            if length == UNDEFINED_LENGTH:
                if kind == _FRAGMENTS:  # PS3.5 A.4: fragments have explicit lengths
                    raise MalformedDataset("a pixel data fragment of undefined length")
                frames.append((_DATASET, None, implicit))
            elif pos + length > limit:
                raise MalformedDataset("an item is longer than its sequence")
            elif kind == _ITEMS:
                frames.append((_DATASET, pos + length, implicit))
            else:
                pos += length
        else:
            if tag == ITEM_END and end is None:
                pos += 8
                frames.pop()
                continue
            if group == 0xFFFE:
                raise MalformedDataset("an item or delimiter outside a sequence")
            vr = None
            value = pos + 8
            if not implicit:
                vr = bytes(buffer[pos + 4 : pos + 6])
                if vr not in VRS:
                    raise MalformedDataset("an element header that is not Explicit VR")
                if vr in LONG_VRS:
                    if pos + 12 > limit:
                        raise MalformedDataset(TRUNCATED)
                    (length,) = struct.unpack_from("<L", buffer, pos + 8)
                    value = pos + 12
                else:
                    (length,) = struct.unpack_from("<H", buffer, pos + 6)
            if tag == PIXEL_DATA and len(frames) == 1:
                result.pixel_data_encapsulated = length == UNDEFINED_LENGTH
            if length == UNDEFINED_LENGTH:
                if vr in (None, b"SQ"):  # PS3.5 7.5.2
                    frames.append((_ITEMS, None, implicit))
                elif vr == b"UN":  # PS3.5 6.2.2: a sequence in Implicit VR Little Endian
                    frames.append((_ITEMS, None, True))
                elif vr in (b"OB", b"OW") and tag == PIXEL_DATA:  # PS3.5 A.4: encapsulated
                    frames.append((_FRAGMENTS, None, implicit))
                else:
                    raise MalformedDataset("undefined length on an element that is not a sequence")
                pos = value
            elif value + length > limit:
                raise MalformedDataset("an element runs past its end (truncated or wrong length)")
            elif vr == b"SQ" or (vr is None and _is_sequence(tag)):
                frames.append((_ITEMS, value + length, implicit))
                pos = value
            else:
                if len(frames) == 1 and tag in wanted:
                    result.values[tag] = bytes(buffer[value : value + length])
                pos = value + length
        if len(frames) > 2 * MAX_NESTING + 1:
            raise MalformedDataset(f"sequences nested deeper than {MAX_NESTING} levels")
    return result
