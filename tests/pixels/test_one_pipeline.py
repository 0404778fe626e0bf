"""One grayscale pipeline: the model input, training and the GSPS show the same pixels.

Every dataset below goes to a file (Explicit VR Little Endian, or Big Endian where the byte
order is the point) and is read back; then, for each:

- the model input: `prepare` with the keywords the node's worker uses
  (dicom_node.analyse.worker.analyse_study);
- training and evaluation: the lab's COCO dataset reader (`CocoDataset`, `read_image`);
- the GSPS: the presentation state built for the image, written and read back, whose own
  Modality LUT, Softcopy VOI LUT and Presentation LUT Shape are put on the image in place
  of its own and rendered through the pixel package;

must give the pipeline's display values. Model input and training: exactly
(np.array_equal). The GSPS: a window is text (DS, up to 16 characters) and the values
are float32, so to 1e-6; a VOI LUT table in the GSPS has 16-bit entries, so to half a
level, 0.5 / 65535, plus that 1e-6.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from dciodvfy import assert_dciodvfy_clean
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    BreastTomosynthesisImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

from dicom_node.config import ReportConfig
from dicom_node.lab.datasets.coco import CocoDataset, read_image
from dicom_node.pixels import central_frame, display_pixels, prepare
from dicom_node.report.gsps import build_gsps
from tests.pixels.images import without_window
from tests.synthetic import mammogram, write

INPUT_SIZE = 40  # smaller than the images: the resize is part of what is compared
MAX_BYTES = 4096 * 2**20  # node.max_dataset_megabytes' default, as the worker passes it
WINDOW_TOLERANCE = 1e-6
TABLE_TOLERANCE = 0.5 / 65535 + 1e-6

LUT_TAGS = ("LUTDescriptor", "LUTData")
IMAGE_LUT_KEYWORDS = (
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter",
    "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction", "VOILUTSequence",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
)


def image(**kwargs) -> Dataset:
    return mammogram(rows=64, columns=48, masses=((30, 20, 9),), **kwargs)


def lut_item(entries: np.ndarray, *, first: int, bits: int, vr: str, big_endian: bool = False) -> Dataset:
    """A LUT Sequence item; OW data as the raw words in the file's byte order."""
    item = Dataset()
    item.LUTDescriptor = [len(entries), first, bits]
    if vr == "OW":
        item.add(DataElement(0x00283006, "OW", entries.astype(">u2" if big_endian else "<u2").tobytes()))
    elif vr == "OW-packed":  # 8-bit entries two per word, the first in the low byte (CP-522)
        words = entries[0::2].astype(np.uint16) | (entries[1::2].astype(np.uint16) << 8)
        item.add(DataElement(0x00283006, "OW", words.astype(">u2" if big_endian else "<u2").tobytes()))
    else:
        item.add(DataElement(0x00283006, "US", [int(v) for v in entries]))
    return item


def curve(entries: int, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    return (np.linspace(0, 1, entries) ** 2 * top).round().astype(np.uint16)


def windowed(**attributes) -> Dataset:
    ds = image()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def rescaled() -> Dataset:
    return windowed(RescaleSlope=0.5, RescaleIntercept=-100, WindowCenter=800, WindowWidth=1501)


def modality_lut_sequence() -> Dataset:
    ds = image()
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    table = (np.sqrt(np.arange(4096) / 4095) * 65535).round().astype(np.uint16)
    ds.ModalityLUTSequence = Sequence([lut_item(table, first=0, bits=16, vr="US")])
    ds.ModalityLUTSequence[0].ModalityLUTType = "US"
    ds.WindowCenter, ds.WindowWidth = 40000, 30001
    return ds


def voi_table(bits: int, vr: str, *, big_endian: bool = False) -> Dataset:
    ds = without_window(image())
    entries = 3000  # from stored value 100: lower values take the first entry, higher the last
    ds.VOILUTSequence = Sequence(
        [lut_item(curve(entries, bits), first=100, bits=bits, vr=vr, big_endian=big_endian)]
    )
    return ds


def signed_first_mapped() -> Dataset:
    """Signed stored values (-2048..2047); the VOI LUT starts at -1000 (LUT Descriptor SS)."""
    ds = without_window(image())
    ds.PixelRepresentation = 1
    stored = ds.pixel_array.astype(np.int32) - 2048
    ds.PixelData = stored.astype("<i2").tobytes()
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType  # the VOI LUT's input is signed
    item = lut_item(curve(2500, 16), first=0, bits=16, vr="OW")
    item["LUTDescriptor"] = DataElement(0x00283002, "SS", [2500, -1000, 16])
    ds.VOILUTSequence = Sequence([item])
    return ds


def tomosynthesis() -> Dataset:
    """Enhanced multi-frame: shared rescale and window, the central frame its own window."""
    ds = image(sop_class_uid=BreastTomosynthesisImageStorage)
    frames = np.stack([ds.pixel_array + 200 * k for k in range(3)]).astype(np.uint16)
    ds.NumberOfFrames, ds.PixelData = 3, frames.tobytes()
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType"):
        delattr(ds, keyword)

    def group(**items: Dataset) -> Dataset:
        result = Dataset()
        for keyword, item in items.items():
            setattr(result, keyword, Sequence([item]))
        return result

    def values(**attributes) -> Dataset:
        item = Dataset()
        for keyword, value in attributes.items():
            setattr(item, keyword, value)
        return item

    ds.SharedFunctionalGroupsSequence = Sequence([group(
        PixelValueTransformationSequence=values(RescaleSlope=2, RescaleIntercept=10, RescaleType="US"),
        FrameVOILUTSequence=values(WindowCenter=3000, WindowWidth=4001),
    )])
    ds.PerFrameFunctionalGroupsSequence = Sequence([
        Dataset(),
        group(FrameVOILUTSequence=values(WindowCenter=3400, WindowWidth=2001, VOILUTFunction="SIGMOID")),
        Dataset(),
    ])
    return ds


CASES = {
    "monochrome2": lambda: image(),
    "monochrome1": lambda: image(photometric="MONOCHROME1"),
    "rescale": rescaled,
    "modality-lut-sequence": modality_lut_sequence,
    "linear": lambda: windowed(WindowCenter=1500, WindowWidth=1001),
    "linear-exact": lambda: windowed(WindowCenter=1500, WindowWidth=1000, VOILUTFunction="LINEAR_EXACT"),
    "sigmoid": lambda: windowed(WindowCenter=1400, WindowWidth=900, VOILUTFunction="SIGMOID"),
    "several-windows": lambda: windowed(
        WindowCenter=[1000, 3000], WindowWidth=[1500, 200],
        WindowCenterWidthExplanation=["SOFT", "HARD"],
    ),
    "voi-lut-16-bit-us": lambda: voi_table(16, "US"),
    "voi-lut-8-bit-us": lambda: voi_table(8, "US"),
    "voi-lut-ow-little-endian": lambda: voi_table(16, "OW"),
    "voi-lut-ow-big-endian": lambda: voi_table(16, "OW", big_endian=True),
    "voi-lut-8-bit-ow-packed": lambda: voi_table(8, "OW-packed"),
    "voi-lut-signed-first-mapped": signed_first_mapped,
    "enhanced-multi-frame": tomosynthesis,
    "no-window": lambda: without_window(image()),
    "monochrome1-no-window": lambda: without_window(image(photometric="MONOCHROME1")),
}
BIG_ENDIAN = {"voi-lut-ow-big-endian"}


def to_file(ds: Dataset, path, *, big_endian: bool) -> Dataset:
    """`ds` written to `path` and read back."""
    if big_endian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = np.frombuffer(ds.PixelData, dtype="<u2").astype(">u2").tobytes()
    write(ds, path)
    read = pydicom.dcmread(path)
    assert read.original_encoding == (False, not big_endian)
    return read


def gsps_display(image: Dataset, frame: int | None, tmp_path) -> np.ndarray:
    """The image as the GSPS shows it: its LUTs replaced by the GSPS's, through the pixel package."""
    uid = str(image.SOPInstanceUID)
    gsps = build_gsps(
        [image], {uid: []}, report=ReportConfig(), sop_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(), frames={} if frame is None else {uid: frame},
    )
    path = tmp_path / "gsps.dcm"
    gsps.save_as(path, enforce_file_format=True)
    assert_dciodvfy_clean(path)
    state = pydicom.dcmread(path)

    view = copy.deepcopy(image)
    if not image.original_encoding[1]:
        # The GSPS is little endian, so its OW LUT Data is: the view (the image's pixels
        # under the GSPS's LUTs) is made a little endian data set too.
        view.PixelData = image.pixel_array.astype("<u2" if image.PixelRepresentation == 0 else "<i2").tobytes()
        view.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        view.set_original_encoding(False, True)
    for keyword in IMAGE_LUT_KEYWORDS:
        if keyword in view:
            delattr(view, keyword)
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence"):
        if keyword in state:
            view[keyword] = state[keyword]
    (voi,) = [
        item for item in state.SoftcopyVOILUTSequence
        if uid in {ref.ReferencedSOPInstanceUID for ref in item.get("ReferencedImageSequence", [])}
        or "ReferencedImageSequence" not in item
    ]
    for element in voi:
        if element.keyword != "ReferencedImageSequence":
            view[element.tag] = element
    for table in voi.get("VOILUTSequence", []):
        # A viewer scales a table's 0..2^bits-1 to black..white, the pipeline the table's own
        # range: the GSPS writes tables that span all 16 bits, where both agree.
        entries = np.frombuffer(table.LUTData, dtype="<u2")
        assert (int(table.LUTDescriptor[2]), entries.min(), entries.max()) == (16, 0, 65535)
    # PS3.4 N.2: a GSPS's Presentation LUT Shape replaces the Photometric Interpretation.
    view.PhotometricInterpretation = "MONOCHROME1" if state.PresentationLUTShape == "INVERSE" else "MONOCHROME2"
    if view.PixelRepresentation == 1 and "VOILUTSequence" in view:
        # The VOI LUT's input is the GSPS Modality LUT's output, which here shifts the
        # signed stored values to non-negative ones: its first value mapped is unsigned.
        assert float(state.RescaleIntercept) > 0
        view.VOILUTSequence[0]["LUTDescriptor"] = DataElement(0x00283002, "US", list(view.VOILUTSequence[0].LUTDescriptor))
    return display_pixels(view, frame=frame), "VOILUTSequence" in voi


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_input_training_and_gsps_show_the_same_pixels(case, tmp_path):
    ds = to_file(CASES[case](), tmp_path / "image.dcm", big_endian=case in BIG_ENDIAN)
    frame = central_frame(ds) if int(ds.get("NumberOfFrames", 1)) > 1 else None
    display = display_pixels(ds, frame=frame)
    assert display.min() < display.max()  # something to compare

    model_input = prepare(ds, input_size=INPUT_SIZE, frame=frame, max_bytes=MAX_BYTES)

    coco = {
        "images": [{"id": 1, "file_name": "image.dcm", "width": int(ds.Columns),
                    "height": int(ds.Rows), **({} if frame is None else {"frame": frame})}],
        "annotations": [],
        "categories": [{"id": 1, "name": "mass"}],
    }
    training, _, _ = CocoDataset(coco, input_size=INPUT_SIZE, root=tmp_path)[0]
    assert np.array_equal(read_image(tmp_path / "image.dcm", frame=frame), display)
    assert np.array_equal(training.pixels, model_input.pixels)
    assert training.original_shape == model_input.original_shape

    shown, by_table = gsps_display(ds, frame, tmp_path)
    tolerance = TABLE_TOLERANCE if by_table else WINDOW_TOLERANCE
    np.testing.assert_allclose(shown, display, rtol=0, atol=tolerance)


def test_the_cases_cover_what_they_claim(tmp_path):
    # Guards the list above against drifting into testing less than its names say.
    big = to_file(CASES["voi-lut-ow-big-endian"](), tmp_path / "big.dcm", big_endian=True)
    assert big.VOILUTSequence[0]["LUTData"].VR == "OW" and not big.original_encoding[1]
    signed = to_file(CASES["voi-lut-signed-first-mapped"](), tmp_path / "signed.dcm", big_endian=False)
    assert signed.VOILUTSequence[0].LUTDescriptor[1] == -1000
    assert signed.pixel_array.min() < -1000 < signed.pixel_array.max()
    packed = CASES["voi-lut-8-bit-ow-packed"]()
    assert len(packed.VOILUTSequence[0].LUTData) == 3000  # one byte per entry
