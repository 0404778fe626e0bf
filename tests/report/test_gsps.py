"""The GSPS builder: every object is written, checked with dciodvfy and read back with pydicom.

Placement is verified the way a viewer sees it: the POLYLINE read back from the file must be
the detection box (clipped to the image) on the image it was detected on.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from synthetic import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, mammogram

from dicom_node.config import ReportConfig
from dicom_node.errors import UnsupportedImage

BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def rectangle(x0, y0, x1, y1) -> list[float]:
    """A closed rectangle as GSPS POLYLINE graphic data: 5 column\\row points, first repeated."""
    return [x0, y0, x1, y0, x1, y1, x0, y1, x0, y0]


def annotations(ds: Dataset, uid: str) -> list[Dataset]:
    return [
        item
        for item in ds.GraphicAnnotationSequence
        if any(ref.ReferencedSOPInstanceUID == uid for ref in item.ReferencedImageSequence)
    ]


def graphics(ds: Dataset, uid: str) -> list[list[float]]:
    return [
        [float(v) for v in obj.GraphicData]
        for item in annotations(ds, uid)
        for obj in item.get("GraphicObjectSequence", [])
    ]


def texts(ds: Dataset, uid: str) -> list[str]:
    return [
        obj.UnformattedTextValue
        for item in annotations(ds, uid)
        for obj in item.get("TextObjectSequence", [])
    ]


def referenced_uids(ds: Dataset) -> dict[str, set[str]]:
    """Series UID -> referenced SOP Instance UIDs (Presentation State Relationship module)."""
    return {
        series.SeriesInstanceUID: {ref.ReferencedSOPInstanceUID for ref in series.ReferencedImageSequence}
        for series in ds.ReferencedSeriesSequence
    }


def study(n: int, **kwargs) -> list[Dataset]:
    study_uid = generate_uid()
    series_uid = generate_uid()
    return [
        mammogram(study_uid=study_uid, series_uid=series_uid, laterality="LR"[i % 2], seed=i, **kwargs)
        for i in range(n)
    ]


def test_boxes_on_several_images_are_the_detection_boxes(build, written, detection):
    images = study(3)
    boxes = {
        images[0].SOPInstanceUID: [
            detection(10.5, 20.25, 50, 60, score=0.87),
            detection(100, 30, 150, 90, score=0.61),
        ],
        images[1].SOPInstanceUID: [detection(5, 6, 70, 80.75, score=0.55)],
        images[2].SOPInstanceUID: [],
    }

    ds = written(build(images, boxes))

    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
    assert referenced_uids(ds) == {images[0].SeriesInstanceUID: {im.SOPInstanceUID for im in images}}
    for image in images:
        uid = image.SOPInstanceUID
        expected = [rectangle(*d.box) for d in boxes[uid]]
        assert graphics(ds, uid) == [pytest.approx(points) for points in expected]
        for item in annotations(ds, uid):
            for obj in item.get("GraphicObjectSequence", []):
                assert (obj.GraphicType, obj.GraphicAnnotationUnits, obj.NumberOfGraphicPoints) == (
                    "POLYLINE", "PIXEL", 5
                )
            assert item.GraphicLayer == ReportConfig().graphic_layer
    assert "mass 0.87" in texts(ds, images[0].SOPInstanceUID)
    assert "mass 0.61" in texts(ds, images[0].SOPInstanceUID)
    assert "mass 0.55" in texts(ds, images[1].SOPInstanceUID)
    assert [layer.GraphicLayer for layer in ds.GraphicLayerSequence] == [ReportConfig().graphic_layer]


def test_labels_sit_next_to_their_box_inside_the_image(build, written, detection):
    image = mammogram(rows=256, columns=192)
    uid = image.SOPInstanceUID
    boxes = [detection(20, 100, 60, 140), detection(150, 0, 192, 30, score=0.5)]  # second touches the top

    ds = written(build([image], {uid: boxes}))

    labels = [
        obj for item in annotations(ds, uid) for obj in item.get("TextObjectSequence", [])
        if obj.BoundingBoxAnnotationUnits == "PIXEL"
    ]
    assert len(labels) == 2
    for label, box in zip(labels, [d.box for d in boxes]):
        left, top = label.BoundingBoxTopLeftHandCorner
        right, bottom = label.BoundingBoxBottomRightHandCorner
        assert 0 <= left < right <= 192 and 0 <= top < bottom <= 256
        assert bottom == pytest.approx(box[1]) or top == pytest.approx(box[3])  # just above or below


def test_monochrome1_images_get_an_inverse_presentation_lut(build, written, detection):
    images = study(2, photometric="MONOCHROME1")
    ds = written(build(images, {im.SOPInstanceUID: [detection(1, 2, 30, 40)] for im in images}))
    # A GSPS overrides the Photometric Interpretation (PS3.3 C.11.6, PS3.4 N.2): INVERSE keeps dense tissue bright.
    assert ds.PresentationLUTShape == "INVERSE"


def test_monochrome2_images_get_an_identity_presentation_lut(build, written):
    images = study(2)
    ds = written(build(images, {im.SOPInstanceUID: [] for im in images}))
    assert ds.PresentationLUTShape == "IDENTITY"


def test_the_images_windows_and_rescale_are_copied(build, written):
    images = study(2)
    for image in images:
        image.WindowCenter = [2000, 1800]
        image.WindowWidth = [4000, 3000]
        image.WindowCenterWidthExplanation = ["NORMAL", "HARDER"]
        image.VOILUTFunction = "SIGMOID"

    ds = written(build(images, {im.SOPInstanceUID: [] for im in images}))

    (voi,) = ds.SoftcopyVOILUTSequence
    assert [float(v) for v in voi.WindowCenter] == [2000, 1800]
    assert [float(v) for v in voi.WindowWidth] == [4000, 3000]
    assert list(voi.WindowCenterWidthExplanation) == ["NORMAL", "HARDER"]
    assert voi.VOILUTFunction == "SIGMOID"
    assert "ReferencedImageSequence" not in voi  # one window for all images
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)


def test_images_with_different_windows_each_keep_theirs(build, written):
    images = study(3)
    images[1].WindowCenter, images[1].WindowWidth = 1000, 500
    del images[2].WindowCenter, images[2].WindowWidth  # no window: the image's own range
    low, high = int(images[2].pixel_array.min()), int(images[2].pixel_array.max())

    ds = written(build(images, {im.SOPInstanceUID: [] for im in images}))

    windows = {
        ref.ReferencedSOPInstanceUID: (float(voi.WindowCenter), float(voi.WindowWidth))
        for voi in ds.SoftcopyVOILUTSequence
        for ref in voi.ReferencedImageSequence
    }
    assert windows == {
        images[0].SOPInstanceUID: (float(images[0].WindowCenter), float(images[0].WindowWidth)),
        images[1].SOPInstanceUID: (1000.0, 500.0),
        # the LINEAR window mapping low to black and high to white (PS3.3 C.11.2.1.2.1),
        # as the pixel pipeline showed the image to the model
        images[2].SOPInstanceUID: (low + (high - low + 1) / 2, high - low + 1.0),
    }


def test_a_voi_lut_table_is_copied_as_a_16_bit_table_with_the_same_display(build, written):
    image = mammogram()
    del image.WindowCenter, image.WindowWidth
    table = Dataset()
    table.LUTDescriptor = [4096, 0, 12]  # 12-bit output values
    table.LUTData = list(range(4095, -1, -1))  # an inverting table
    table.LUTExplanation = "VENDOR TABLE"
    image.VOILUTSequence = [table]

    ds = written(build([image], {image.SOPInstanceUID: []}))

    ((lut,),) = [voi.VOILUTSequence for voi in ds.SoftcopyVOILUTSequence]
    assert list(lut.LUTDescriptor) == [4096, 0, 16]
    copied = np.frombuffer(lut.LUTData, dtype="<u2").astype(float)
    assert np.allclose(copied / 65535, np.arange(4095, -1, -1) / 4095, atol=1e-4)
    assert lut.LUTExplanation == "VENDOR TABLE"


def test_mixed_polarities_get_one_baked_voi_table_per_image(build, written):
    study_uid = generate_uid()
    bright = mammogram(study_uid=study_uid, photometric="MONOCHROME2")
    inverted = mammogram(study_uid=study_uid, photometric="MONOCHROME1", laterality="R")

    ds = written(build([bright, inverted], {bright.SOPInstanceUID: [], inverted.SOPInstanceUID: []}))

    assert ds.PresentationLUTShape == "IDENTITY"
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
    tables = {}
    for voi in ds.SoftcopyVOILUTSequence:
        (ref,) = voi.ReferencedImageSequence
        (lut,) = voi.VOILUTSequence
        assert list(lut.LUTDescriptor) == [4096, 0, 16]
        tables[ref.ReferencedSOPInstanceUID] = np.frombuffer(lut.LUTData, dtype="<u2")
    rising, falling = tables[bright.SOPInstanceUID], tables[inverted.SOPInstanceUID]
    # The image's own window (about the full 12-bit range) from black to white, and reversed.
    assert rising[0] < 650 and rising[-1] > 64880 and np.all(np.diff(rising.astype(int)) >= 0)
    assert np.array_equal(falling.astype(int), 65535 - rising.astype(int))


def test_no_detection_still_reports_that_the_image_was_analysed(build, written):
    images = study(2)
    ds = written(build(images, {im.SOPInstanceUID: [] for im in images}))

    for image in images:
        assert graphics(ds, image.SOPInstanceUID) == []
        (text,) = texts(ds, image.SOPInstanceUID)
        assert "analysed, no mass marked" in text and "not for diagnosis" in text
    assert "0 masses marked" in ds.ContentDescription


def test_boxes_are_clipped_to_the_image_and_boxes_outside_are_dropped(build, written, detection):
    image = mammogram(rows=256, columns=192)
    uid = image.SOPInstanceUID
    boxes = [
        detection(-10, -5, 40, 50, score=0.9),  # over the top left corner
        detection(150, 200, 230.5, 300, score=0.8),  # over the bottom right corner
        detection(300, 10, 400, 60, score=0.7),  # entirely to the right: nothing to draw
    ]

    ds = written(build([image], {uid: boxes}))

    assert graphics(ds, uid) == [
        pytest.approx(rectangle(0, 0, 40, 50)),
        pytest.approx(rectangle(150, 200, 192, 256)),
    ]
    assert any("2 masses marked" in text for text in texts(ds, uid))


def test_source_without_birth_date_and_study_id_is_normalised_on_a_copy(build, written, detection):
    image = mammogram()
    del image.PatientBirthDate, image.StudyID, image.ReferringPhysicianName
    image.PatientSex = "U"  # not a value of PS3.3 C.7.1.1
    before = copy.deepcopy(image)

    ds = written(build([image], {image.SOPInstanceUID: [detection(1, 2, 3, 4)]}))

    assert ds.PatientBirthDate == "" and ds.StudyID == "" and ds.PatientSex == ""
    assert image == before  # the caller's dataset is untouched (pixel data included)
    assert "PatientBirthDate" not in image and "PixelData" in image


def test_patient_and_study_are_those_of_the_source_so_the_pacs_files_it_with_the_study(build, written):
    images = study(2)
    ds = written(build(images, {im.SOPInstanceUID: [] for im in images}))
    copied = ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate", "StudyID")
    for keyword in copied:
        assert ds[keyword].value == images[0][keyword].value, keyword
    assert (ds.PatientID, str(ds.PatientName)) == (FAKE_PATIENT_ID, FAKE_PATIENT_NAME)
    assert ds.Modality == "PR" and ds.SeriesInstanceUID not in {im.SeriesInstanceUID for im in images}


def test_images_from_two_series_are_referenced_per_series(build, written, detection):
    study_uid = generate_uid()
    first, second = generate_uid(), generate_uid()
    images = [
        mammogram(study_uid=study_uid, series_uid=first, laterality="L", view="CC"),
        mammogram(study_uid=study_uid, series_uid=first, laterality="L", view="MLO"),
        mammogram(study_uid=study_uid, series_uid=second, laterality="R", view="CC"),
        mammogram(study_uid=study_uid, series_uid=second, laterality="R", view="MLO"),
    ]
    boxes = {im.SOPInstanceUID: [detection(10, 10, 20 + i, 30 + i)] for i, im in enumerate(images)}

    ds = written(build(images, boxes))

    assert referenced_uids(ds) == {
        first: {images[0].SOPInstanceUID, images[1].SOPInstanceUID},
        second: {images[2].SOPInstanceUID, images[3].SOPInstanceUID},
    }
    for i, image in enumerate(images):
        assert graphics(ds, image.SOPInstanceUID) == [pytest.approx(rectangle(10, 10, 20 + i, 30 + i))]
    assert ds.Laterality == ""  # both breasts


def test_skipped_images_are_referenced_with_the_reason(build, written, detection):
    images = study(3)
    analysed, processing, colour = images
    colour.SOPClassUID = SECONDARY_CAPTURE
    colour.SamplesPerPixel = 3  # a grayscale presentation state cannot reference it
    skipped = {
        processing.SOPInstanceUID: "For Processing image",
        colour.SOPInstanceUID: "not a mammogram",
        generate_uid(): "not readable",  # no dataset at all: only counted
    }

    ds = written(build(images, {analysed.SOPInstanceUID: [detection(1, 1, 9, 9)]}, skipped=skipped))

    assert referenced_uids(ds) == {
        analysed.SeriesInstanceUID: {analysed.SOPInstanceUID, processing.SOPInstanceUID}
    }
    assert graphics(ds, processing.SOPInstanceUID) == []
    assert texts(ds, processing.SOPInstanceUID) == ["dicom-node: not analysed: For Processing image"]
    assert "3 images not analysed" in ds.ContentDescription


def test_config_names_the_series_the_content_and_the_layer(build, written, detection):
    report = ReportConfig(
        manufacturer="Example AI",
        series_description="Example masses, not for diagnosis",
        content_label="EXAMPLE_CAD",
        content_creator_name="EXAMPLE^AI",
        graphic_layer="EXAMPLE_LAYER",
        series_number=77,
    )
    image = mammogram()

    ds = written(build([image], {image.SOPInstanceUID: [detection(1, 1, 9, 9)]}, report=report))

    assert (ds.Manufacturer, ds.SeriesDescription, ds.ContentLabel) == (
        "Example AI", "Example masses, not for diagnosis", "EXAMPLE_CAD"
    )
    assert (str(ds.ContentCreatorName), ds.SeriesNumber) == ("EXAMPLE^AI", 77)
    assert {item.GraphicLayer for item in ds.GraphicAnnotationSequence} == {"EXAMPLE_LAYER"}
    assert any(text.startswith("Example AI: 1 mass marked") for text in texts(ds, image.SOPInstanceUID))


def test_images_of_different_sizes_get_one_displayed_area_each(build, written, detection):
    study_uid = generate_uid()
    small = mammogram(study_uid=study_uid, rows=256, columns=192)
    large = mammogram(study_uid=study_uid, rows=320, columns=240, laterality="R")

    boxes = {small.SOPInstanceUID: [], large.SOPInstanceUID: [detection(200, 300, 240, 320)]}

    ds = written(build([small, large], boxes))

    areas = {
        item.ReferencedImageSequence[0].ReferencedSOPInstanceUID: list(
            item.DisplayedAreaBottomRightHandCorner
        )
        for item in ds.DisplayedAreaSelectionSequence
    }
    assert areas == {small.SOPInstanceUID: [192, 256], large.SOPInstanceUID: [240, 320]}
    assert graphics(ds, large.SOPInstanceUID) == [pytest.approx(rectangle(200, 300, 240, 320))]


def tomosynthesis(study_uid: str, frames: int = 5) -> Dataset:
    """A minimal multi-frame breast tomosynthesis dataset (rescale and window in functional groups)."""
    ds = mammogram(study_uid=study_uid)
    ds.SOPClassUID = BREAST_TOMOSYNTHESIS
    ds.NumberOfFrames = frames
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType"):
        delattr(ds, keyword)
    shared = Dataset()
    transformation = Dataset()
    transformation.RescaleSlope, transformation.RescaleIntercept, transformation.RescaleType = 1, 0, "US"
    shared.PixelValueTransformationSequence = [transformation]
    window = Dataset()
    window.WindowCenter, window.WindowWidth = 2047, 4095
    shared.FrameVOILUTSequence = [window]
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [Dataset() for _ in range(frames)]
    return ds


def test_boxes_on_a_tomosynthesis_volume_sit_on_the_analysed_frame(build, written, detection):
    study_uid = generate_uid()
    volume = tomosynthesis(study_uid, frames=5)
    image = mammogram(study_uid=study_uid)
    boxes = {volume.SOPInstanceUID: [detection(10, 20, 30, 40)], image.SOPInstanceUID: []}

    ds = written(build([image, volume], boxes, frames={volume.SOPInstanceUID: 1}))
    central = written(build([image, volume], boxes))

    def frame_of_box(result):
        (item,) = [a for a in annotations(result, volume.SOPInstanceUID) if "GraphicObjectSequence" in a]
        return int(item.ReferencedImageSequence[0].ReferencedFrameNumber)

    assert frame_of_box(ds) == 2  # 0-based frame 1 is DICOM frame number 2
    assert frame_of_box(central) == 3  # default: the central frame of 5
    assert graphics(ds, volume.SOPInstanceUID) == [pytest.approx(rectangle(10, 20, 30, 40))]


def test_contradictory_arguments_are_refused(build, detection):
    images = study(2)
    first, second = (im.SOPInstanceUID for im in images)
    with pytest.raises(ValueError, match="neither in detections nor in skipped"):
        build(images, {first: []})
    with pytest.raises(ValueError, match="not in images"):
        build(images, {first: [], second: [], generate_uid(): [detection(1, 1, 2, 2)]})
    with pytest.raises(ValueError, match="both analysed and skipped"):
        build(images, {first: [], second: []}, skipped={second: "For Processing image"})
    with pytest.raises(ValueError, match="studies"):
        build([images[0], mammogram()], {first: []})


def test_a_study_without_any_referenceable_image_is_an_unsupported_image(build):
    colour = mammogram()
    colour.SOPClassUID = SECONDARY_CAPTURE
    colour.SamplesPerPixel = 3
    with pytest.raises(UnsupportedImage, match="no grayscale image"):
        build([colour], {}, skipped={colour.SOPInstanceUID: "not a mammogram"})
