"""Data sets cut short or broken inside their pixel data are refused, and nothing is stored.

The SCP checks, without decoding a pixel (dicom_node.receive.structure.check_pixel_data):
native Pixel Data must hold Rows x Columns x Samples x Frames x Bits Allocated / 8 bytes
(PS3.5 8.1.1); encapsulated Pixel Data needs a Basic Offset Table item and a fragment per
frame (PS3.5 A.4), each JPEG / JPEG-LS / JPEG 2000 codestream ends with its end marker,
and an RLE header (PS3.5 G.5) points inside its fragment. Each broken data set is sent by
a real association to the running SCP, is answered 0xC000 and leaves nothing behind;
its intact twin is stored.
"""

from __future__ import annotations

import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests import synthetic
from tests.receive.helpers import association, make_encoded, stored_files, temp_files

MG = DigitalMammographyXRayImageStorageForPresentation
CANNOT_UNDERSTAND = 0xC000


def send(node, ds) -> int:
    syntax = ds.file_meta.TransferSyntaxUID
    with association(node.port, [(MG, [syntax])]) as assoc:
        assert assoc.is_established
        return assoc.send_c_store(ds).Status


def renamed(ds):
    """The same image as another instance (so the intact twin is a new instance)."""
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def native(rows=64, columns=48):
    ds = synthetic.mammogram(rows=rows, columns=columns)
    return ds


def compressed(tmp_path, syntax_name: str):
    return pydicom.dcmread(make_encoded(tmp_path / syntax_name, syntax_name, rows=64, columns=48))


def with_frames(ds, frames: list[bytes]):
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def only_frame(ds) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def cut_native(tmp_path):
    ds = native()
    ds.PixelData = ds.PixelData[:-100]
    return ds


def more_frames_declared(tmp_path):
    ds = native()
    ds.NumberOfFrames = 2  # one frame of pixels, two declared
    return ds


def cut_codestream(syntax_name):
    def make(tmp_path):
        ds = compressed(tmp_path, syntax_name)
        frame = only_frame(ds)
        return with_frames(ds, [frame[: len(frame) * 2 // 3]])

    return make


def rle_header_past_its_fragment(tmp_path):
    ds = compressed(tmp_path, "rle")
    frame = only_frame(ds)
    return with_frames(ds, [frame[:80]])  # the header's second segment offset lies beyond


def fewer_fragments_than_frames(tmp_path):
    ds = compressed(tmp_path, "jpeg-ls-lossless")
    ds.NumberOfFrames = 3
    return with_frames(ds, [only_frame(ds)])


BROKEN = {
    "native pixel data cut short": (cut_native, ExplicitVRLittleEndian),
    "more frames declared than sent": (more_frames_declared, ExplicitVRLittleEndian),
    "JPEG-LS codestream cut": (cut_codestream("jpeg-ls-lossless"), JPEGLSLossless),
    "JPEG 2000 codestream cut": (cut_codestream("jpeg2000-lossless"), JPEG2000Lossless),
    "RLE header past its fragment": (rle_header_past_its_fragment, RLELossless),
    "fewer fragments than frames": (fewer_fragments_than_frames, JPEGLSLossless),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_pixel_data_is_refused_and_nothing_is_stored(node, tmp_path, kind, log_output):
    make, syntax = BROKEN[kind]
    ds = make(tmp_path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert send(node, ds) == CANNOT_UNDERSTAND
    assert stored_files(node.data_dir) == [] and temp_files(node.data_dir) == []
    assert node.queue.stats()["instances"]["total"] == 0
    assert '"instance_refused"' in log_output()


@pytest.mark.parametrize("syntax_name", ["explicit-little", "jpeg-ls-lossless", "jpeg2000-lossless", "rle"])
def test_intact_twins_are_stored(node, tmp_path, syntax_name):
    """The check does not refuse what is whole (frames rebuilt the same way as above)."""
    if syntax_name == "explicit-little":
        ds = native()
    else:
        ds = compressed(tmp_path, syntax_name)
        with_frames(ds, [only_frame(ds)])
    assert send(node, renamed(ds)) == 0x0000
    assert len(stored_files(node.data_dir)) == 1
