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
# A mammogram has a few hundred elements; a data set of millions of empty ones is an
# attack on the time this walk takes (and on every reader after it).
MAX_ELEMENTS = 1_000_000
TRUNCATED = "data set ends inside an element (truncated or wrong length)"

_DATASET, _ITEMS, _FRAGMENTS = range(3)


class MalformedDataset(ValueError):
    """The bytes are not one well-formed data set; the message quotes no received value."""


@dataclass
class ScannedDataset:
    values: dict[int, bytes] = field(default_factory=dict)  # tag -> raw value, top level only
    pixel_data_encapsulated: bool | None = None  # None: no Pixel Data element
    pixel_data_length: int | None = None  # native Pixel Data: its value length
    # Encapsulated Pixel Data: (offset, length) of each item, the Basic Offset Table first.
    fragments: list[tuple[int, int]] = field(default_factory=list)


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
    elements = 0
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
        elements += 1
        if elements > MAX_ELEMENTS:
            raise MalformedDataset(f"more than {MAX_ELEMENTS} elements")
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
                if len(frames) == 2:  # the top-level Pixel Data's fragments
                    result.fragments.append((pos, length))
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
                if length != UNDEFINED_LENGTH:
                    result.pixel_data_length = length
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


# --------------------------------------------------------------------------- pixel data

ROWS, COLUMNS, SAMPLES_PER_PIXEL, NUMBER_OF_FRAMES, BITS_ALLOCATED = (
    0x00280010, 0x00280011, 0x00280002, 0x00280008, 0x00280100,
)
IMAGE_PIXEL_TAGS = frozenset({ROWS, COLUMNS, SAMPLES_PER_PIXEL, NUMBER_OF_FRAMES, BITS_ALLOCATED})
# Transfer syntaxes whose frames are JPEG, JPEG-LS or JPEG 2000 codestreams: each ends
# with the marker FFD9 (ITU T.81 EOI, T.87 EOI, T.800 EOC).
CODESTREAM_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
})  # fmt: skip
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
END_OF_CODESTREAM = b"\xff\xd9"


def _unsigned_short(scanned: ScannedDataset, tag: int, name: str) -> int:
    raw = scanned.values.get(tag)
    if raw is None or len(raw) != 2:
        raise MalformedDataset(f"{name} is missing or not one US value")
    return struct.unpack("<H", raw)[0]


def _number_of_frames(scanned: ScannedDataset) -> int:
    raw = scanned.values.get(NUMBER_OF_FRAMES)
    if raw is None:
        return 1
    try:
        frames = int(raw.decode("ascii").strip("\x00 ") or "1")
    except (UnicodeDecodeError, ValueError):
        raise MalformedDataset("Number of Frames is not an integer (IS)") from None
    if frames < 1:
        raise MalformedDataset("Number of Frames is less than 1")
    return frames


def declared_pixel_bytes(scanned: ScannedDataset) -> int:
    """Rows x Columns x Samples per Pixel x Number of Frames x Bits Allocated / 8 (PS3.5 8.1.1)."""
    rows = _unsigned_short(scanned, ROWS, "Rows")
    columns = _unsigned_short(scanned, COLUMNS, "Columns")
    bits = _unsigned_short(scanned, BITS_ALLOCATED, "Bits Allocated")
    samples = _unsigned_short(scanned, SAMPLES_PER_PIXEL, "Samples per Pixel") if (
        SAMPLES_PER_PIXEL in scanned.values) else 1
    return (rows * columns * samples * _number_of_frames(scanned) * bits + 7) // 8


def check_pixel_data(buffer, scanned: ScannedDataset, *, transfer_syntax: str) -> None:
    """Refuse pixel data that cannot hold the image it declares, without decoding it.

    Native (PS3.5 8.1.1): the value must hold every declared pixel; a shorter one is a
    data set cut short. Encapsulated (PS3.5 A.4): a Basic Offset Table item and at least
    one fragment per frame; each codestream that ends a frame ends with its end marker
    (JPEG, JPEG-LS, JPEG 2000); an RLE frame's header (PS3.5 G.5) points inside its
    fragment. ``scanned`` must hold the IMAGE_PIXEL_TAGS values (scan with them wanted).
    """
    if scanned.pixel_data_encapsulated is None:
        return
    expected = declared_pixel_bytes(scanned)
    if not scanned.pixel_data_encapsulated:
        if scanned.pixel_data_length < expected:
            raise MalformedDataset(
                f"Pixel Data holds {scanned.pixel_data_length} bytes, the image needs {expected} "
                "(data set cut short?)"
            )
        return
    frames = _number_of_frames(scanned)
    offset_table, *fragments = scanned.fragments or [None]
    if offset_table is None:
        raise MalformedDataset("encapsulated Pixel Data has no Basic Offset Table item")
    if len(fragments) < frames:
        raise MalformedDataset(f"encapsulated Pixel Data has {len(fragments)} fragments for {frames} frames")
    one_per_frame = len(fragments) == frames
    if transfer_syntax in CODESTREAM_SYNTAXES:
        for position, length in fragments if one_per_frame else fragments[-1:]:
            tail = bytes(buffer[position + max(0, length - 16) : position + length]).rstrip(b"\x00")
            if not tail.endswith(END_OF_CODESTREAM):
                raise MalformedDataset("a compressed frame does not end with its end marker (cut short?)")
    elif transfer_syntax == RLE_LOSSLESS:
        for position, length in fragments:
            if length < 64:
                raise MalformedDataset("an RLE fragment is shorter than its 64-byte header")
            segments, *offsets = struct.unpack_from("<16L", buffer, position)
            used = offsets[:segments]
            in_order = all(a < b for a, b in zip(used, used[1:]))
            if not 1 <= segments <= 15 or used[0] != 64 or not in_order or used[-1] >= length:
                raise MalformedDataset("an RLE header does not describe its fragment (cut short?)")
