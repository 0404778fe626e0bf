"""Synthetic mammogram phantoms: valid MG DICOM, COCO labels, anatomy, determinism."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pydicom
import pytest
from dciodvfy import assert_dciodvfy_clean
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation

from dicom_node.lab.datasets.coco import load_coco
from dicom_node.lab.phantom import (
    SYNTHETIC_NOTICE,
    generate_phantom,
    phantom_dataset,
    spacing_for,
    write_phantoms,
)

ROWS, COLUMNS = 208, 160  # small, same aspect as 3328 x 2560


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    annotations = write_phantoms(out, n=6, seed=3, rows=ROWS, columns=COLUMNS)
    return out, annotations


def test_files_are_valid_mammograms_marked_synthetic(phantom_set):
    out, annotations = phantom_set
    coco = json.loads(annotations.read_text())
    for image in coco["images"]:
        path = out / image["file_name"]
        assert_dciodvfy_clean(path)
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == DigitalMammographyXRayImageStorageForPresentation
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 14)
        assert ds.pixel_array.max() < 2**ds.BitsStored
        assert (ds.Rows, ds.Columns) == (ROWS, COLUMNS) == (image["height"], image["width"])
        assert float(ds.WindowWidth) > 0
        assert float(ds.PixelSpacing[0]) == pytest.approx(spacing_for(ROWS, COLUMNS), rel=1e-4)
        assert float(ds.PixelSpacing[0]) == pytest.approx(0.1 * 3328 / ROWS, rel=0.02)
        assert str(ds.PatientName).startswith("PHANTOM^")
        assert ds.Manufacturer == "dicom-node phantom"
        assert SYNTHETIC_NOTICE in ds.ImageComments and SYNTHETIC_NOTICE in ds.SeriesDescription
        assert ds.ImageLaterality == image["laterality"] and ds.ViewPosition == image["view"]


def test_annotations_are_coco_with_mammography_fields(phantom_set):
    out, annotations = phantom_set
    coco = load_coco(annotations)  # validates files, ids, categories, boxes inside images
    assert coco["categories"] == [{"id": 1, "name": "mass", "supercategory": "lesion"}]
    assert len(coco["images"]) == 6
    for image in coco["images"]:
        assert image["view"] in ("CC", "MLO")
        assert image["laterality"] in ("L", "R")
        assert image["density"] in ("A", "B", "C", "D")
    assert coco["annotations"], "six images with 0-3 masses each should hold some masses"
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert w > 0 and h > 0 and annotation["category_id"] == 1 and annotation["iscrowd"] == 0
        assert 0 < annotation["area"] <= w * h


def test_four_views_share_a_study(phantom_set):
    out, annotations = phantom_set
    coco = json.loads(annotations.read_text())
    studies = defaultdict(list)
    for image in coco["images"]:
        ds = pydicom.dcmread(out / image["file_name"], stop_before_pixels=True)
        assert image["study_uid"] == ds.StudyInstanceUID
        studies[ds.StudyInstanceUID].append((ds.ImageLaterality, ds.ViewPosition, ds.PatientID))
    assert sorted(len(views) for views in studies.values()) == [2, 4]
    for views in studies.values():
        assert len({(lat, view) for lat, view, _ in views}) == len(views)
        assert len({patient for _, _, patient in views}) == 1
    complete = next(views for views in studies.values() if len(views) == 4)
    assert {(lat, view) for lat, view, _ in complete} == {
        ("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")}


def test_boxes_lie_inside_breast_and_image_off_the_muscle():
    seen = 0
    for index in range(12):
        phantom = generate_phantom(seed=7, index=index, rows=ROWS, columns=COLUMNS,
                                   masses_per_image=(1, 3))
        for mass in phantom.masses:
            x0, y0, x1, y1 = (int(v) for v in mass.box)
            assert 0 <= x0 < x1 <= COLUMNS and 0 <= y0 < y1 <= ROWS
            assert phantom.breast[y0:y1, x0:x1].all()
            assert not phantom.pectoral[y0:y1, x0:x1].any()
            seen += 1
    assert seen >= 12


def test_masses_brighten_their_box_and_nothing_else():
    # The tissue is drawn before the masses, so with and without a mass it is identical.
    kwargs = dict(seed=5, index=1, rows=416, columns=320)
    with_mass = generate_phantom(masses_per_image=1, **kwargs)
    without = generate_phantom(masses_per_image=0, **kwargs)
    (mass,) = with_mass.masses
    difference = with_mass.dataset.pixel_array.astype(float) - without.dataset.pixel_array.astype(float)
    x0, y0, x1, y1 = (int(v) for v in mass.box)
    inside = difference[y0:y1, x0:x1]
    outside = np.ones(difference.shape, bool)
    pad = int(mass.diameter_mm * 2.0 / spacing_for(416, 320))  # spicules and blur reach past the box
    outside[max(y0 - pad, 0):y1 + pad, max(x0 - pad, 0):x1 + pad] = False
    noise = difference[outside].std()
    assert inside.mean() > 3 * noise
    assert abs(difference[outside].mean()) < noise / 10


def test_same_seed_same_bytes_other_seed_other_image(tmp_path):
    first = generate_phantom(seed=11, index=2, rows=ROWS, columns=COLUMNS)
    again = generate_phantom(seed=11, index=2, rows=ROWS, columns=COLUMNS)
    other = generate_phantom(seed=12, index=2, rows=ROWS, columns=COLUMNS)
    assert first.dataset.PixelData == again.dataset.PixelData
    assert first.dataset.SOPInstanceUID == again.dataset.SOPInstanceUID
    assert first.masses == again.masses
    assert first.dataset.PixelData != other.dataset.PixelData
    assert first.dataset.StudyInstanceUID != other.dataset.StudyInstanceUID

    # The in-memory dataset is the file write_phantoms writes for the same seed and index.
    write_phantoms(tmp_path, n=3, seed=11, rows=ROWS, columns=COLUMNS)
    ds, boxes = phantom_dataset(seed=11, index=2, rows=ROWS, columns=COLUMNS)
    coco = json.loads((tmp_path / "annotations.json").read_text())
    written = pydicom.dcmread(tmp_path / coco["images"][2]["file_name"])
    assert written.PixelData == ds.PixelData == first.dataset.PixelData
    written_boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == coco["images"][2]["id"]]
    expected = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes.tolist()]
    assert written_boxes == expected


def test_mlo_has_pectoral_muscle_in_the_upper_chest_wall_corner():
    for laterality in ("L", "R"):
        mlo = generate_phantom(seed=2, index=3, rows=ROWS, columns=COLUMNS, view="MLO",
                               laterality=laterality)
        cc = generate_phantom(seed=2, index=1, rows=ROWS, columns=COLUMNS, view="CC",
                              laterality=laterality)
        assert not cc.pectoral.any()
        rows, columns = np.nonzero(mlo.pectoral)
        assert rows.size > 0.02 * ROWS * COLUMNS
        chest_wall = 0 if laterality == "L" else COLUMNS - 1
        assert mlo.pectoral[0, chest_wall]  # the muscle fills the corner
        assert rows.mean() < ROWS / 2
        assert (columns.mean() < COLUMNS / 2) == (laterality == "L")
        # Muscle is denser than the fatty breast beside it: brighter on MONOCHROME2.
        pixels = mlo.dataset.pixel_array
        assert pixels[mlo.pectoral].mean() > np.median(pixels[mlo.breast & ~mlo.pectoral])


def test_right_breast_is_the_mirror_of_the_left():
    kwargs = dict(seed=4, index=0, rows=ROWS, columns=COLUMNS, view="CC")
    left = generate_phantom(laterality="L", **kwargs)
    right = generate_phantom(laterality="R", **kwargs)
    assert np.array_equal(left.dataset.pixel_array, right.dataset.pixel_array[:, ::-1])
    assert [m.box for m in right.masses] == [
        (COLUMNS - x1, y0, COLUMNS - x0, y1) for x0, y0, x1, y1 in (m.box for m in left.masses)]
    # Chest wall on the side opposite the nipple: left breasts touch column 0, right the last.
    assert left.breast[:, 0].sum() > 0 and left.breast[:, -1].sum() == 0
    assert right.breast[:, -1].sum() > 0 and right.breast[:, 0].sum() == 0
    assert list(left.dataset.PatientOrientation) == ["A", "R"]
    assert list(right.dataset.PatientOrientation) == ["P", "L"]


def test_background_is_dark_air_and_breast_brighter():
    phantom = generate_phantom(seed=1, index=0, rows=ROWS, columns=COLUMNS)
    pixels = phantom.dataset.pixel_array.astype(float)
    full_scale = 2**phantom.dataset.BitsStored - 1
    air = pixels[~phantom.breast]
    assert air.mean() < 0.05 * full_scale
    assert air.std() > 0  # noise, not a flat fill
    assert np.median(pixels[phantom.breast]) > 5 * air.mean()


def test_some_images_have_no_mass():
    counts = [len(generate_phantom(seed=8, index=i, rows=96, columns=80, masses_per_image=(0, 3)).masses)
              for i in range(16)]
    assert 0 in counts and max(counts) >= 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rows=32), "at least 64"),
        (dict(bits_stored=16), "bits_stored"),
        (dict(density="E"), "density"),
        (dict(view="ML"), "view"),
        (dict(mass_size_mm=(10, 5)), "mass_size_mm"),
        (dict(masses_per_image=(3, 1)), "masses_per_image"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_phantom(**kwargs)


def test_parallel_writing_gives_the_same_files(tmp_path):
    serial = write_phantoms(tmp_path / "serial", n=5, seed=6, rows=96, columns=80)
    parallel = write_phantoms(tmp_path / "parallel", n=5, seed=6, rows=96, columns=80, workers=2)
    assert serial.read_text() == parallel.read_text()
    for image in json.loads(serial.read_text())["images"]:
        name = image["file_name"]
        assert (serial.parent / name).read_bytes() == (parallel.parent / name).read_bytes()
    with pytest.raises(ValueError, match="rows and columns"):
        write_phantoms(tmp_path / "bad", n=1, rows=10)
