"""display_pixels: decode, Modality LUT, VOI LUT, MONOCHROME1, on synthetic images.

Expected values are computed here from the formulas of PS3.3 C.11 applied to the
stored values, independently of dicom_node.pixels.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    BreastTomosynthesisImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    SecondaryCaptureImageStorage,
)

from dicom_node.errors import PermanentError, UnsupportedImage
from dicom_node.pixels import central_frame, display_pixels, image_kind, prepare
from tests.pixels.images import without_window
from tests.synthetic import (
    DCMTK_TRANSCODERS,
    compress_jpeg2000,
    mammogram,
    transcode,
    write,
)

LOSSLESS = [
    "explicit-little",
    "implicit-little",
    "deflated",
    "jpeg-lossless-sv1",
    "jpeg-ls-lossless",
    "rle",
]
LOSSY = ["jpeg-extended", "jpeg-ls-near-lossless", "jpeg-baseline"]


def linear_window(x, center, width):
    # PS3.3 C.11.2.1.2.1
    return np.where(
        x <= center - 0.5 - (width - 1) / 2,
        0.0,
        np.where(x > center - 0.5 + (width - 1) / 2, 1.0, (x - (center - 0.5)) / (width - 1) + 0.5),
    )


def test_output_is_float32_unit_range_at_original_size(ramp):
    image = display_pixels(ramp)
    assert image.dtype == np.float32
    assert image.shape == (ramp.Rows, ramp.Columns)
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_linear_window_follows_the_standard(ramp):
    ramp.WindowCenter, ramp.WindowWidth = 1500, 1001
    stored = ramp.pixel_array.astype(np.float64)
    np.testing.assert_allclose(display_pixels(ramp), linear_window(stored, 1500, 1001), atol=1e-6)
    # values below the window are black, above it white, and both occur in the ramp
    assert display_pixels(ramp)[0, 0] == 0.0 and display_pixels(ramp)[0, -1] == 1.0


def test_first_of_multiple_windows_is_used(ramp):
    ramp.WindowCenter, ramp.WindowWidth = [1000, 3000], [500, 200]
    expected = linear_window(ramp.pixel_array.astype(np.float64), 1000, 500)
    np.testing.assert_allclose(display_pixels(ramp), expected, atol=1e-6)


def test_linear_exact_window(ramp):
    ramp.WindowCenter, ramp.WindowWidth, ramp.VOILUTFunction = 2000, 800, "LINEAR_EXACT"
    stored = ramp.pixel_array.astype(np.float64)
    expected = np.clip((stored - 2000) / 800 + 0.5, 0, 1)  # PS3.3 C.11.2.1.3, LINEAR_EXACT
    np.testing.assert_allclose(display_pixels(ramp), expected, atol=1e-6)


def test_sigmoid_window_as_ge_writes_it(ramp):
    ramp.WindowCenter, ramp.WindowWidth, ramp.VOILUTFunction = 2100, 900, "SIGMOID"
    stored = ramp.pixel_array.astype(np.float64)
    expected = 1 / (1 + np.exp(-4 * (stored - 2100) / 900))  # PS3.3 C.11.2.1.3, SIGMOID
    image = display_pixels(ramp)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert np.all(np.diff(image[0]) >= 0)  # monotone, no clipping plateau in the middle
    assert 0 < image[0, 0] < 0.01 and 0.99 < image[0, -1] < 1


def test_no_voi_uses_image_min_max():
    ds = without_window(mammogram(masses=((100, 80, 20),)))
    stored = ds.pixel_array.astype(np.float64)
    image = display_pixels(ds)
    np.testing.assert_allclose(
        image, (stored - stored.min()) / (stored.max() - stored.min()), atol=1e-6
    )


def test_invalid_window_width_falls_back_to_min_max(ramp):
    ramp.WindowCenter, ramp.WindowWidth = 100, 0
    image = display_pixels(ramp)
    assert image.min() == 0.0 and image.max() == 1.0


def test_rescale_slope_and_intercept_before_window(ramp):
    ramp.RescaleSlope, ramp.RescaleIntercept = 2, -1000
    ramp.WindowCenter, ramp.WindowWidth = 3000, 2001  # in rescaled units
    modality = ramp.pixel_array.astype(np.float64) * 2 - 1000
    np.testing.assert_allclose(display_pixels(ramp), linear_window(modality, 3000, 2001), atol=1e-6)


def test_modality_lut_sequence(ramp):
    stored = ramp.pixel_array
    lut = (np.sqrt(np.arange(4096) / 4095) * 65535).round().astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.add(DataElement(0x00283006, "US", lut.tolist()))
    ramp.ModalityLUTSequence = Sequence([item])
    del ramp.RescaleSlope, ramp.RescaleIntercept, ramp.RescaleType
    ramp.WindowCenter, ramp.WindowWidth = 40000, 30001
    expected = linear_window(lut[stored].astype(np.float64), 40000, 30001)
    np.testing.assert_allclose(display_pixels(ramp), expected, atol=1e-6)


@pytest.mark.parametrize("vr", ["US", "OW"])
@pytest.mark.parametrize("bits", [16, 8])
def test_voi_lut_sequence_from_file(tmp_path, ramp, vr, bits):
    # A LUT that starts at stored value 100 (lower values take the first entry)
    # with 3000 entries (higher values take the last), through a real file.
    ramp = without_window(ramp)
    first_mapped, entries = 100, 3000
    top = (1 << bits) - 1
    lut = (np.linspace(0, 1, entries) ** 2 * top * 0.9 + top * 0.05).round().astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [entries, first_mapped, bits]
    if vr == "OW":
        item.add(DataElement(0x00283006, "OW", lut.astype("<u2").tobytes()))
    else:
        item.add(DataElement(0x00283006, "US", lut.tolist()))
    ramp.VOILUTSequence = Sequence([item])
    ds = pydicom.dcmread(write(ramp, tmp_path / "voi.dcm"))

    index = np.clip(ds.pixel_array.astype(np.int64) - first_mapped, 0, entries - 1)
    values = lut[index].astype(np.float64)
    expected = (values - lut.min()) / (lut.max() - lut.min())  # LUT output range -> [0, 1]
    np.testing.assert_allclose(display_pixels(ds), expected, atol=1e-6)


def test_window_is_preferred_over_voi_lut_sequence(ramp):
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add(DataElement(0x00283006, "US", list(range(4096, 0, -1))))  # an inverting LUT
    ramp.VOILUTSequence = Sequence([item])
    ramp.WindowCenter, ramp.WindowWidth = 2048, 4096
    image = display_pixels(ramp)
    assert image[0, -1] > image[0, 0]  # the window, not the inverting LUT


def test_monochrome1_is_inverted_so_dense_tissue_is_bright():
    masses = ((120, 90, 25),)
    mono2 = mammogram(photometric="MONOCHROME2", masses=masses, seed=3)
    mono1 = mammogram(photometric="MONOCHROME1", masses=masses, seed=3)
    assert not np.array_equal(mono1.pixel_array, mono2.pixel_array)  # stored inverted
    image1, image2 = display_pixels(mono1), display_pixels(mono2)
    # The synthetic window is centred on max//2, so the inverted values shift by
    # one step of the window (2 / (width - 1)); otherwise the images are the same.
    np.testing.assert_allclose(image1, image2, atol=2 / (mono1.WindowWidth - 1) + 1e-6)
    yy, xx = np.mgrid[0 : mono1.Rows, 0 : mono1.Columns]
    mass = (yy - 120) ** 2 + (xx - 90) ** 2 <= 20**2
    assert image1[mass].mean() > image1[~mass].mean() + 0.2


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("syntaxes")
    return write(mammogram(masses=((100, 80, 20), (200, 150, 12)), seed=7), folder / "source.dcm")


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_lossless_syntaxes_decode_to_the_same_pixels(reference_file, tmp_path, syntax):
    encoded = pydicom.dcmread(transcode(reference_file, tmp_path / f"{syntax}.dcm", syntax))
    if syntax not in ("explicit-little", "implicit-little", "deflated"):
        assert encoded.file_meta.TransferSyntaxUID.is_compressed
    reference = pydicom.dcmread(reference_file)
    np.testing.assert_array_equal(display_pixels(encoded), display_pixels(reference))


def test_jpeg_2000_decodes_like_the_uncompressed_image(reference_file, tmp_path):
    reference = display_pixels(pydicom.dcmread(reference_file))
    lossless = pydicom.dcmread(compress_jpeg2000(reference_file, tmp_path / "j2k.dcm"))
    assert lossless.file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(display_pixels(lossless), reference)
    lossy = pydicom.dcmread(
        compress_jpeg2000(reference_file, tmp_path / "j2k-lossy.dcm", lossless=False)
    )
    assert lossy.file_meta.TransferSyntaxUID == JPEG2000
    assert np.abs(display_pixels(lossy) - reference).mean() < 0.02


@pytest.mark.parametrize("syntax", LOSSY)
def test_lossy_syntaxes_decode_to_nearly_the_same_pixels(reference_file, tmp_path, syntax):
    assert syntax in DCMTK_TRANSCODERS
    encoded = pydicom.dcmread(transcode(reference_file, tmp_path / f"{syntax}.dcm", syntax))
    difference = np.abs(display_pixels(encoded) - display_pixels(pydicom.dcmread(reference_file)))
    assert difference.mean() < 0.02
    assert difference.max() < 0.15


def tomosynthesis(frames: int = 5, rows: int = 32, columns: int = 24) -> Dataset:
    """A minimal multi-frame image: frame k has stored value 100 * (k + 1) plus a ramp."""
    ds = mammogram(rows=rows, columns=columns, sop_class_uid=BreastTomosynthesisImageStorage)
    ramp = np.tile(np.arange(columns, dtype=np.uint16), (rows, 1))
    data = np.stack([ramp + 100 * (k + 1) for k in range(frames)]).astype(np.uint16)
    ds.NumberOfFrames = frames
    ds.PixelData = data.tobytes()
    return ds


def test_multi_frame_needs_a_frame_and_decodes_only_that_one():
    ds = tomosynthesis()
    with pytest.raises(UnsupportedImage, match="no frame selected"):
        display_pixels(ds)
    with pytest.raises(ValueError, match="out of range"):
        display_pixels(ds, frame=5)
    ds.WindowCenter, ds.WindowWidth = 300, 201
    frame = display_pixels(ds, frame=2)
    expected = linear_window(ds.pixel_array[2].astype(np.float64), 300, 201)
    np.testing.assert_allclose(frame, expected, atol=1e-6)
    assert not np.allclose(display_pixels(ds, frame=0), frame)


def test_per_frame_voi_overrides_shared_functional_group():
    ds = without_window(tomosynthesis())

    def voi_group(center, width):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        group = Dataset()
        group.FrameVOILUTSequence = Sequence([voi])
        return group

    ds.SharedFunctionalGroupsSequence = Sequence([voi_group(400, 101)])
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [Dataset() for _ in range(4)] + [voi_group(510, 21)]
    )
    stored = ds.pixel_array.astype(np.float64)
    np.testing.assert_allclose(
        display_pixels(ds, frame=1), linear_window(stored[1], 400, 101), atol=1e-6
    )
    np.testing.assert_allclose(
        display_pixels(ds, frame=4), linear_window(stored[4], 510, 21), atol=1e-6
    )


def test_central_frame():
    assert central_frame(tomosynthesis(frames=5)) == 2
    assert central_frame(tomosynthesis(frames=4)) == 2
    assert central_frame(mammogram()) == 0


def test_image_kind():
    assert image_kind(mammogram()) == "presentation"
    assert (
        image_kind(mammogram(sop_class_uid=DigitalMammographyXRayImageStorageForProcessing))
        == "processing"
    )
    dx = mammogram(sop_class_uid=DigitalXRayImageStorageForPresentation)
    assert image_kind(dx) == "presentation"
    dx.PresentationIntentType = "FOR PROCESSING"
    assert image_kind(dx) == "processing"
    assert image_kind(tomosynthesis()) == "tomosynthesis"
    assert image_kind(mammogram(sop_class_uid=SecondaryCaptureImageStorage)) == "secondary_capture"
    with pytest.raises(UnsupportedImage, match=CTImageStorage):
        image_kind(mammogram(sop_class_uid=CTImageStorage))


def test_undecodable_pixel_data_is_a_permanent_error_naming_the_instance(tmp_path):
    ds = mammogram()
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(PermanentError, match=ds.SOPInstanceUID) as error:
        display_pixels(ds)
    assert not isinstance(error.value, UnsupportedImage)  # corrupt, not merely unsupported
    compressed = pydicom.dcmread(
        transcode(write(mammogram(), tmp_path / "a.dcm"), tmp_path / "b.dcm", "rle")
    )
    compressed.PixelData = compressed.PixelData[:-400]  # a truncated RLE fragment
    with pytest.raises(PermanentError, match="cannot decode"):
        display_pixels(compressed)


def test_colour_images_are_unsupported():
    ds = mammogram()
    ds.PhotometricInterpretation = "RGB"
    ds.SamplesPerPixel = 3
    with pytest.raises(UnsupportedImage, match="not grayscale"):
        display_pixels(ds)


def test_prepare_is_display_pixels_resized(ramp):
    prepared = prepare(ramp, input_size=128)
    assert prepared.original_shape == (ramp.Rows, ramp.Columns)
    assert max(prepared.pixels.shape) == 128
    assert prepared.scale == pytest.approx(128 / max(ramp.Rows, ramp.Columns))
    assert prepared.pixels.dtype == np.float32
    # a ramp stays a ramp: the resize does not distort the intensities
    np.testing.assert_allclose(prepared.pixels[0], np.linspace(0, 1, 128), atol=0.02)


def signed_ramp() -> Dataset:
    """Stored values -2048..2047 along each row (12 bits, Pixel Representation 1)."""
    ds = without_window(mammogram(rows=4, columns=4096))
    ds.PixelRepresentation = 1
    ds.PixelData = np.tile(np.arange(-2048, 2048, dtype="<i2"), (4, 1)).tobytes()
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    return ds


def voi_lut(lut: np.ndarray, descriptor: list[int], *, descriptor_vr: str, data: bytes | None = None) -> Dataset:
    item = Dataset()
    item.add(DataElement(0x00283002, descriptor_vr, descriptor))
    item.add(DataElement(0x00283006, "OW", lut.astype("<u2").tobytes() if data is None else data))
    return item


def looked_up(stored: np.ndarray, lut: np.ndarray, first: int) -> np.ndarray:
    values = lut[np.clip(stored.astype(np.int64) - first, 0, len(lut) - 1)].astype(np.float64)
    return (values - lut.min()) / (lut.max() - lut.min())


@pytest.mark.parametrize("descriptor_vr", ["SS", "US"])
def test_signed_first_mapped_value_of_signed_pixels(tmp_path, descriptor_vr):
    # PS3.3 C.11.2.1.1: the first value mapped is SS for signed pixels; readers give it
    # as -1000 (SS) or as 64536 (US, the same 16 bits).
    ds = signed_ramp()
    lut = np.linspace(0, 65535, 2000).round().astype(np.uint16)
    first = -1000 if descriptor_vr == "SS" else 65536 - 1000
    ds.VOILUTSequence = Sequence([voi_lut(lut, [2000, first, 16], descriptor_vr=descriptor_vr)])
    ds = pydicom.dcmread(write(ds, tmp_path / "signed.dcm"))
    expected = looked_up(ds.pixel_array, lut, -1000)
    np.testing.assert_allclose(display_pixels(ds), expected, atol=1e-6)


def test_voi_lut_after_a_rescale_below_zero_has_a_signed_first_value(ramp):
    # C.11.2.1.1: SS "if the possible output range after ... Rescale ... may be signed".
    ramp = without_window(ramp)
    ramp.RescaleIntercept = -2048
    lut = np.linspace(0, 65535, 3000).round().astype(np.uint16)
    ramp.VOILUTSequence = Sequence([voi_lut(lut, [3000, 65536 - 1000, 16], descriptor_vr="US")])
    expected = looked_up(ramp.pixel_array.astype(np.int64) - 2048, lut, -1000)
    np.testing.assert_allclose(display_pixels(ramp), expected, atol=1e-6)


def test_ow_lut_data_of_a_big_endian_file(tmp_path, ramp):
    # pydicom gives OW as raw bytes: they are words in the file's byte order.
    ramp = without_window(ramp)
    lut = (np.linspace(0, 1, 4096) ** 0.5 * 65535).round().astype(np.uint16)
    ramp.VOILUTSequence = Sequence([
        voi_lut(lut, [4096, 0, 16], descriptor_vr="US", data=lut.astype(">u2").tobytes())
    ])
    ramp.PixelData = ramp.pixel_array.astype(">u2").tobytes()
    ramp.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds = pydicom.dcmread(write(ramp, tmp_path / "big.dcm"))
    assert ds.original_encoding == (False, False) and isinstance(ds.VOILUTSequence[0].LUTData, bytes)
    np.testing.assert_allclose(display_pixels(ds), looked_up(ds.pixel_array, lut, 0), atol=1e-6)


def test_8_bit_entries_packed_two_per_word(ramp):
    # CP-522: 8-bit entries are packed two per 16-bit word, the first in the low byte.
    ramp = without_window(ramp)
    lut = np.linspace(255, 0, 4096).round().astype(np.uint8)  # inverting
    ramp.VOILUTSequence = Sequence([
        voi_lut(lut, [4096, 0, 8], descriptor_vr="US", data=lut.tobytes())
    ])
    np.testing.assert_allclose(display_pixels(ramp), looked_up(ramp.pixel_array, lut, 0), atol=1e-6)


def test_65536_entries_are_declared_as_0(ramp):
    ramp = without_window(ramp)
    lut = (65535 - np.arange(65536)).astype(np.uint16)
    ramp.VOILUTSequence = Sequence([voi_lut(lut, [0, 0, 16], descriptor_vr="US")])
    np.testing.assert_allclose(display_pixels(ramp), looked_up(ramp.pixel_array, lut, 0), atol=1e-6)


def test_an_image_declaring_more_than_max_bytes_is_refused_before_decoding():
    # A few bytes that declare 65535 x 65535 x 16 bits (8 GB): refused by what it declares.
    ds = mammogram(rows=8, columns=8)
    ds.Rows = ds.Columns = 65535
    with pytest.raises(UnsupportedImage, match="declares 8191 MB of pixels"):
        prepare(ds, input_size=64, max_bytes=4096 * 2**20)
    assert display_pixels(mammogram(rows=8, columns=8), max_bytes=128).shape == (8, 8)  # 128 B: fits
