"""The burned-in capture: every object is written, checked with dciodvfy and read back with pydicom.

Placement is checked in the decoded pixels: the outline's pixels are yellow exactly at the
box's edges in the source image's pixel coordinates, and no pixel away from the drawings is
anything but the pipeline's own grey.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    BreastTomosynthesisImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from synthetic import mammogram

from dicom_node.config import ReportConfig
from dicom_node.pixels import display_pixels
from dicom_node.report.capture import BOX_COLOUR, build_capture
from dicom_node.report.common import DEMO_SERIES_DESCRIPTION

ROWS, COLUMNS = 400, 300  # not square: boxes drawn transposed would land elsewhere
WIDTH = 2  # the outline's width at this size: max(2, min(rows, columns) // 500)
LOSSLESS = {JPEG2000Lossless, JPEGLSLossless, RLELossless, ExplicitVRLittleEndian}  # PS3.5 A.4
# Below the summary line (and the demo band) every test image's drawings are only the boxes.
BELOW_TEXT = 80


def source(**kwargs) -> Dataset:
    return mammogram(rows=ROWS, columns=COLUMNS, **kwargs)


def capture(image, detections, **kwargs):
    """build_capture with fresh UIDs and the default ReportConfig unless given."""
    kwargs.setdefault("report", ReportConfig())
    return build_capture(
        image, detections, sop_instance_uid=generate_uid(), series_instance_uid=generate_uid(),
        instance_number=kwargs.pop("instance_number", 1), **kwargs,
    )


def grey_levels(image, frame=None) -> np.ndarray:
    """What the pipeline shows of `image`, as the capture's 8-bit levels."""
    return np.rint(display_pixels(image, frame=frame) * np.float32(255)).astype(np.uint8)


def is_box_colour(pixels: np.ndarray) -> np.ndarray:
    return np.all(pixels == BOX_COLOUR, axis=-1)


def is_grey(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])


def assert_outline(pixels: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """The outline hugs `box` (pixel-edge coordinates) from outside, `WIDTH` pixels wide."""
    x0, y0, x1, y1 = box
    assert is_box_colour(pixels[y0:y1, x0 - WIDTH:x0]).all(), "left edge"
    assert is_box_colour(pixels[y0:y1, x1:x1 + WIDTH]).all(), "right edge"
    assert is_box_colour(pixels[y0 - WIDTH:y0, x0:x1]).all(), "top edge"
    assert is_box_colour(pixels[y1:y1 + WIDTH, x0:x1]).all(), "bottom edge"
    # Not a pixel further in or out: the box's own pixels and those just beyond the lines.
    assert not is_box_colour(pixels[y0:y1, x0:x1]).any(), "inside the box"
    assert not is_box_colour(pixels[y0:y1, x0 - WIDTH - 1]).any(), "left of the left edge"
    assert not is_box_colour(pixels[y0:y1, x1 + WIDTH]).any(), "right of the right edge"
    assert not is_box_colour(pixels[y1 + WIDTH, x0:x1]).any(), "below the bottom edge"


# ---------------------------------------------------------------- the object


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("boxes", [[], [(40, 200, 120, 260)]], ids=["no-box", "box"])
@pytest.mark.parametrize("demo", [False, True], ids=["", "demo"])
def test_captures_pass_dciodvfy(written, detection, photometric, boxes, demo):
    image = source(photometric=photometric)
    ds = written(capture(image, [detection(*box) for box in boxes], demo=demo))
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated) == (ROWS, COLUMNS, 3, 8)
    assert not is_grey(ds.pixel_array[:BELOW_TEXT]).all()  # the summary line at least


def test_a_not_analysed_capture_passes_dciodvfy(written):
    written(capture(source(), None, not_analysed_reason="For Processing image"))


def test_the_capture_says_what_it_is_and_where_it_comes_from(written, detection):
    image = source(laterality="R", view="MLO")
    image.PatientOrientation = ["P", "FL"]  # mammography's two-letter orientation
    series_uid = generate_uid()
    ds = written(build_capture(
        image, [detection(40, 200, 120, 260)], report=ReportConfig(), sop_instance_uid=generate_uid(),
        series_instance_uid=series_uid, instance_number=3,
    ))
    assert ds.BurnedInAnnotation == "YES"
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.StudyInstanceUID == image.StudyInstanceUID
    assert ds.SeriesInstanceUID == series_uid != image.SeriesInstanceUID
    assert ds.InstanceNumber == 3
    (reference,) = ds.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == image.SOPClassUID
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert "ReferencedFrameNumber" not in reference
    assert ds.Laterality == "R"
    assert list(ds.PatientOrientation) == ["P", "FL"]
    assert "R MLO" in ds.DerivationDescription
    assert [float(v) for v in ds.PixelSpacing] == [0.1, 0.1]
    assert ds.PatientID == image.PatientID and ds.PatientName == image.PatientName
    assert ds.SeriesDescription == "AI mass detection (dicom-node, not for diagnosis) (burned-in)"
    assert ds.Manufacturer == ReportConfig().manufacturer


def test_missing_and_invalid_patient_attributes_are_normalised(written):
    image = source()
    del image.PatientName, image.PatientID, image.StudyID, image.PatientBirthDate
    image.PatientSex = "U"  # not a value of PS3.3 C.7.1.1
    ds = written(capture(image, []))
    assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == ("", "", "", "")


def test_contradicting_arguments_are_refused(detection):
    with pytest.raises(ValueError, match="either detections"):
        capture(source(), None)
    with pytest.raises(ValueError, match="either detections"):
        capture(source(), [detection(1, 1, 2, 2)], not_analysed_reason="why")
    for lossy_or_unavailable in (JPEGBaseline8Bit, JPEGLSLossless):  # pyjpegls is no dependency
        with pytest.raises(ValueError, match="not one for captures"):
            capture(source(), [], transfer_syntax_uid=lossy_or_unavailable)


# ---------------------------------------------------------------- the pixels


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_boxes_are_drawn_at_the_source_pixel_coordinates(written, detection, photometric):
    image = source(photometric=photometric)
    boxes = [(40, 200, 120, 260), (180.4, 300.6, 260.2, 380.3)]  # the second rounds to 180, 301, 260, 380
    pixels = written(capture(image, [detection(*box) for box in boxes])).pixel_array

    assert_outline(pixels, (40, 200, 120, 260))
    assert_outline(pixels, (180, 301, 260, 380))
    # Where the first box's left edge would be drawn transposed (x for y) or scaled to a
    # model input of 512 on the long side (51, 256, 154, 333): nothing.
    assert not is_box_colour(pixels[40:120, 200 - WIDTH:200]).any()
    assert not is_box_colour(pixels[270:333, 51 - WIDTH:51]).any()
    # A row far from any box or text: grey all along.
    assert is_grey(pixels[150]).all()


def test_boxes_are_clipped_to_the_image(written, detection):
    pixels = written(capture(source(), [detection(250, 350, 400, 500)])).pixel_array
    # Clipped to 250, 350, 300, 400: the right and bottom lines move inside the image.
    assert is_box_colour(pixels[350:400, COLUMNS - WIDTH:]).all()
    assert is_box_colour(pixels[ROWS - WIDTH:, 250:300]).all()
    assert is_box_colour(pixels[350:400, 250 - WIDTH:250]).all()
    assert is_box_colour(pixels[350 - WIDTH:350, 250:300]).all()


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_the_grey_is_the_pipelines_display(written, detection, photometric):
    image = source(photometric=photometric, masses=((300, 100, 30),))
    pixels = written(capture(image, [detection(40, 200, 120, 260)])).pixel_array
    expected = grey_levels(image)
    # Every row between the text and the box's label, and below the box: untouched.
    for rows in (slice(BELOW_TEXT, 180), slice(270, ROWS)):
        for channel in range(3):
            np.testing.assert_array_equal(pixels[rows, :, channel], expected[rows])


def test_monochrome1_is_shown_with_dense_tissue_bright(written):
    # The same image stored both ways (tests/synthetic.py inverts the stored values):
    # the captures look the same, up to the windows' rounding.
    plain = written(capture(source(photometric="MONOCHROME2", masses=((300, 100, 30),)), [])).pixel_array
    inverted = written(capture(source(photometric="MONOCHROME1", masses=((300, 100, 30),)), [])).pixel_array
    difference = np.abs(plain[BELOW_TEXT:].astype(int) - inverted[BELOW_TEXT:].astype(int))
    assert difference.max() <= 1
    assert plain[300, 100, 0] > plain[300, 200, 0] + 50  # the mass is bright


def test_a_sigmoid_window_is_applied(written):
    linear = source(masses=((300, 100, 30),))
    sigmoid = source(masses=((300, 100, 30),))
    sigmoid.VOILUTFunction = "SIGMOID"
    sigmoid.WindowCenter, sigmoid.WindowWidth = 1500, 800
    pixels = written(capture(sigmoid, [])).pixel_array
    np.testing.assert_array_equal(pixels[BELOW_TEXT:, :, 1], grey_levels(sigmoid)[BELOW_TEXT:])
    assert not np.array_equal(grey_levels(sigmoid), grey_levels(linear))


def test_compression_is_lossless_and_decodes_to_what_was_drawn(written, detection):
    image = source(masses=((300, 100, 30),))
    detections = [detection(40, 200, 120, 260), detection(180, 300, 260, 380, score=0.5)]
    compressed = written(capture(image, detections))
    uncompressed = written(capture(image, detections, transfer_syntax_uid=ExplicitVRLittleEndian))

    assert compressed.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert compressed.file_meta.TransferSyntaxUID in LOSSLESS
    assert compressed.file_meta.TransferSyntaxUID.is_compressed
    assert "LossyImageCompression" not in compressed or compressed.LossyImageCompression == "00"
    assert len(compressed.PixelData) < len(uncompressed.PixelData) / 2
    np.testing.assert_array_equal(compressed.pixel_array, uncompressed.pixel_array)


def test_rle_lossless_decodes_to_the_same_pixels(written, detection):
    image = source()
    detections = [detection(40, 200, 120, 260)]
    ds = written(capture(image, detections, transfer_syntax_uid=RLELossless))
    reference = written(capture(image, detections, transfer_syntax_uid=ExplicitVRLittleEndian))
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(ds.pixel_array, reference.pixel_array)


def test_a_lossy_source_stays_marked_lossy(written):
    image = source()
    image.LossyImageCompression = "01"
    image.LossyImageCompressionRatio = 10
    image.LossyImageCompressionMethod = "ISO_15444_1"
    ds = written(capture(image, []))
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_15444_1"


# ---------------------------------------------------------------- what the text says


def top(pixels: np.ndarray) -> np.ndarray:
    return pixels[:BELOW_TEXT]


def test_the_demo_warning_is_burned_in_and_in_the_series_description(written, detection):
    image = source()
    detections = [detection(40, 200, 120, 260)]
    plain = written(capture(image, detections))
    demo = written(capture(image, detections, demo=True))

    assert demo.SeriesDescription == DEMO_SERIES_DESCRIPTION
    assert "DEMO" not in plain.SeriesDescription
    red = np.all(top(demo.pixel_array) == (255, 0, 0), axis=-1)
    assert red.mean() > 0.1  # the band
    assert not np.all(top(plain.pixel_array) == (255, 0, 0), axis=-1).any()
    # Everything else is the same capture.
    np.testing.assert_array_equal(demo.pixel_array[BELOW_TEXT:], plain.pixel_array[BELOW_TEXT:])


def test_a_not_analysed_capture_carries_its_reason_and_no_box(written):
    image = source()
    processing = written(capture(image, None, not_analysed_reason="For Processing image")).pixel_array
    too_large = written(capture(image, None, not_analysed_reason="larger than allowed")).pixel_array
    analysed = written(capture(image, [])).pixel_array

    # The reason is written: another reason, another line; and not the analysed line.
    assert not np.array_equal(top(processing), top(too_large))
    assert not np.array_equal(top(processing), top(analysed))
    assert not is_grey(top(processing)).all()
    # No box: below the line, only the pipeline's grey.
    expected = grey_levels(image)[BELOW_TEXT:]
    for channel in range(3):
        np.testing.assert_array_equal(processing[BELOW_TEXT:, :, channel], expected)


def test_the_summary_line_counts_the_boxes(written, detection):
    # One box, two boxes, none: three different lines (boxes placed far below the text).
    image = source()
    one = written(capture(image, [detection(40, 200, 120, 260)])).pixel_array
    two = written(capture(image, [detection(40, 200, 120, 260), detection(180, 300, 260, 380)])).pixel_array
    none = written(capture(image, [])).pixel_array
    assert not np.array_equal(top(one), top(two))
    assert not np.array_equal(top(one), top(none))


# ---------------------------------------------------------------- multi-frame


def tomosynthesis(frames: int = 5) -> Dataset:
    """A multi-frame image whose frames differ (frame k is the image plus 300 * k)."""
    ds = source(sop_class_uid=BreastTomosynthesisImageStorage)
    base = ds.pixel_array.astype(np.uint16)
    data = np.stack([np.minimum(base + 300 * k, 4095) for k in range(frames)]).astype(np.uint16)
    ds.NumberOfFrames = frames
    ds.PixelData = data.tobytes()
    return ds


def test_a_tomosynthesis_capture_shows_the_analysed_frame(written, detection):
    volume = tomosynthesis()
    central = written(capture(volume, [detection(40, 200, 120, 260)]))
    second = written(capture(volume, [detection(40, 200, 120, 260)], frame=1))

    assert central.SourceImageSequence[0].ReferencedFrameNumber == 3  # the central of 5
    assert second.SourceImageSequence[0].ReferencedFrameNumber == 2
    assert "frame 3" in central.DerivationDescription
    np.testing.assert_array_equal(central.pixel_array[150, :, 0], grey_levels(volume, frame=2)[150])
    np.testing.assert_array_equal(second.pixel_array[150, :, 0], grey_levels(volume, frame=1)[150])
    assert not np.array_equal(central.pixel_array[150], second.pixel_array[150])
    assert_outline(second.pixel_array, (40, 200, 120, 260))
    with pytest.raises(ValueError, match="frame 5"):
        capture(volume, [], frame=5)


# ---------------------------------------------------------------- full size


def test_a_full_size_capture_is_built_in_seconds(written, detection):
    image = mammogram(rows=3328, columns=2560, masses=((1000, 800, 200),))
    started = time.perf_counter()
    built = capture(image, [detection(600, 800, 1000, 1200)])
    elapsed = time.perf_counter() - started
    assert elapsed < 15  # about 1 s on 2 loaded cores: far from anything per-pixel in Python
    ds = written(built)
    width = 5  # max(2, 2560 // 500)
    pixels = ds.pixel_array
    assert pixels.shape == (3328, 2560, 3)
    assert is_box_colour(pixels[800:1200, 600 - width:600]).all()
    assert not is_box_colour(pixels[800:1200, 600:1000]).any()
