"""Varied phantoms (dicom_node.lab.phantom_variety): every property the issue lists is drawn,
hard negatives never touch a labelled mass, and the held-out varieties lie outside the
training ranges. Images are read back through the node's pixel pipeline, as the model sees them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pydicom
import pytest

from dicom_node.lab.datasets.coco import CocoDataset
from dicom_node.lab.phantom import generate_phantom, prepared_phantoms, write_phantoms
from dicom_node.lab.phantom_variety import HELDOUT, TRAINING, VARIETIES, Variety
from dicom_node.pixels import display_pixels, prepare

# Small sizes keep the test fast; the ranges under test are the other properties.
SMALL = dataclasses.replace(TRAINING, rows=((600, 900),))


@pytest.fixture(scope="module")
def drawn():
    return [generate_phantom(seed=11, index=i, variety=SMALL) for i in range(96)]  # 24 studies


def test_every_look_of_the_issue_is_drawn(drawn):
    looks = [p.look for p in drawn]
    assert {look.photometric for look in looks} == {"MONOCHROME1", "MONOCHROME2"}
    assert {look.voi for look in looks} == {"LINEAR", "SIGMOID", "LUT", "none"}
    assert {look.bits_stored for look in looks} == {10, 12, 14, 16}
    assert {look.texture for look in looks} == set(TRAINING.textures)
    masses = [m for p in drawn for m in p.masses]
    assert {m.shape for m in masses} == {"round", "oval", "irregular"}
    assert {m.margin for m in masses} == {"circumscribed", "ill-defined", "spiculated"}
    kinds = {kind for p in drawn for kind in p.distractors}
    assert kinds == {"view_letters", "text", "ruler", "markers", "paddle"}
    assert {p.density for p in drawn} == {"A", "B", "C", "D"}


def test_dataset_says_what_was_drawn(drawn):
    for phantom in drawn:
        ds, look = phantom.dataset, phantom.look
        assert ds.PhotometricInterpretation == look.photometric
        assert ds.BitsStored == look.bits_stored and ds.HighBit == look.bits_stored - 1
        assert int(ds.pixel_array.max()) < 2**look.bits_stored
        assert ("WindowCenter" in ds) == (look.voi in ("LINEAR", "SIGMOID"))
        assert ("VOILUTSequence" in ds) == (look.voi == "LUT")
        if "WindowCenter" in ds:
            assert ds.VOILUTFunction == look.voi
        assert ds.BurnedInAnnotation == ("YES" if phantom.distractors else "NO")


def test_dense_tissue_is_bright_as_the_model_sees_it_whatever_the_encoding(drawn):
    """MONOCHROME1 stores the image inverted; through the pipeline breast is still brighter than air."""
    for phantom in drawn:
        shown = display_pixels(phantom.dataset)
        breast = phantom.breast & ~phantom.pectoral
        assert shown[breast].mean() > shown[~phantom.breast].mean() + 0.1, phantom.look


def test_hard_negatives_stay_clear_of_every_mass():
    """Text, markers and rulers are bright: none of them lies in a mass box (3 mm margin)."""
    checked = 0
    for index in range(24):
        phantom = generate_phantom(seed=12, index=index, variety=dataclasses.replace(SMALL, distractors=1.0))
        reference = generate_phantom(seed=12, index=index, variety=dataclasses.replace(SMALL, distractors=0.0))
        # Stored values, not display: without a VOI the display spans min..max, which text moves.
        full_scale = 2.0**phantom.look.bits_stored
        difference = phantom.dataset.pixel_array.astype(float) - reference.dataset.pixel_array
        changed = np.abs(difference) / full_scale > 0.2
        assert [m.box for m in phantom.masses] == [m.box for m in reference.masses]
        margin = 3 / phantom.look.spacing
        for mass in phantom.masses:
            x0, y0, x1, y1 = (int(v) for v in mass.box)
            m = int(margin) - 1
            assert not changed[max(y0 - m, 0):y1 + m, max(x0 - m, 0):x1 + m].any(), (index, mass)
            checked += 1
        assert phantom.distractors and changed.any()
    assert checked > 10


def test_held_out_varieties_lie_outside_the_training_ranges():
    train_rows = TRAINING.rows
    size = HELDOUT["size_3328x2560"]
    assert size.rows == ((3328, 3328),)
    assert not any(low <= 3328 <= high for low, high in train_rows)
    texture = HELDOUT["texture_reticular"]
    assert set(texture.textures).isdisjoint(TRAINING.textures)
    contrast = HELDOUT["contrast_band"]
    for low, high in contrast.mass_contrast:
        for t_low, t_high in TRAINING.mass_contrast:
            assert high <= t_low or low >= t_high
    phantom = generate_phantom(seed=1, index=0, variety=size)
    assert (phantom.dataset.Rows, phantom.dataset.Columns) == (3328, 2560)
    drawn = [generate_phantom(seed=2, index=i, variety=dataclasses.replace(contrast, rows=((600, 700),)))
             for i in range(8)]
    # Contrast as drawn, before dense tissue damps it (at most 35 %), lies in the held-out band.
    values = [m.contrast for p in drawn for m in p.masses]
    assert values and all(0.075 * 0.65 - 1e-4 <= v <= 0.11 + 1e-4 for v in values)
    assert set(VARIETIES) == {"training", "texture_reticular", "contrast_band", "size_3328x2560"}


def test_sizes_and_masses_within_the_training_ranges():
    sizes, diameters = [], []
    for index in range(0, 64, 4):  # one image per study: the size is the study's
        phantom = generate_phantom(seed=3, index=index, variety=TRAINING)
        sizes.append(phantom.dataset.Rows)
        diameters += [m.diameter_mm for m in phantom.masses]
    assert all(any(low <= r <= high for low, high in TRAINING.rows) for r in sizes)
    assert min(sizes) < 2900 and max(sizes) > 3500
    assert min(diameters) >= 4 * 0.9 and max(diameters) <= 60 * 1.1


def test_same_seed_same_look_and_bytes():
    a = generate_phantom(seed=5, index=6, variety=SMALL)
    b = generate_phantom(seed=5, index=6, variety=SMALL)
    c = generate_phantom(seed=6, index=6, variety=SMALL)
    assert a.look == b.look and a.dataset.PixelData == b.dataset.PixelData
    assert a.dataset.PixelData != c.dataset.PixelData


def test_bad_variety_is_named():
    with pytest.raises(ValueError, match="texture"):
        Variety(textures=("marble",))
    with pytest.raises(ValueError, match="bits_stored"):
        Variety(bits_stored=(8,))


def test_in_memory_phantoms_are_what_the_written_files_give(tmp_path):
    """Training on phantoms rendered in memory sees exactly what it would read from the files."""
    items, coco = prepared_phantoms(n=6, seed=21, variety=SMALL, input_size=256)
    annotations = write_phantoms(tmp_path, n=6, seed=21, variety=SMALL)
    written = json.loads(annotations.read_text())
    assert [a["bbox"] for a in coco["annotations"]] == [a["bbox"] for a in written["annotations"]]
    assert [i["texture"] for i in coco["images"]] == [i["texture"] for i in written["images"]]
    dataset = CocoDataset(annotations, input_size=256)
    for (prepared, boxes, image_id), index in zip(items, range(6)):
        from_file, file_boxes, file_id = dataset[index]
        assert image_id == file_id
        np.testing.assert_array_equal(prepared.pixels, from_file.pixels)
        np.testing.assert_allclose(boxes, file_boxes, rtol=1e-6)
    ds = pydicom.dcmread(tmp_path / written["images"][0]["file_name"])
    np.testing.assert_array_equal(prepare(ds, input_size=256).pixels, items[0][0].pixels)


def test_in_memory_classic_phantoms_at_a_chosen_size_are_what_the_written_files_give(tmp_path):
    items, coco = prepared_phantoms(n=2, seed=23, variety=None, input_size=128, rows=400, columns=320)
    annotations = write_phantoms(tmp_path, n=2, seed=23, rows=400, columns=320)
    written = json.loads(annotations.read_text())
    assert coco["info"] == written["info"] and coco["info"]["rows"] == 400
    assert [a["bbox"] for a in coco["annotations"]] == [a["bbox"] for a in written["annotations"]]
    dataset = CocoDataset(annotations, input_size=128)
    for index, (prepared, _boxes, _image_id) in enumerate(items):
        np.testing.assert_array_equal(prepared.pixels, dataset[index][0].pixels)
    with pytest.raises(ValueError, match="at least 64"):
        prepared_phantoms(n=1, seed=23, variety=None, input_size=128, rows=40, columns=320)


def test_written_varied_phantoms_keep_the_look_for_breakdowns(tmp_path):
    annotations = write_phantoms(tmp_path, n=4, seed=8, variety=SMALL)
    coco = json.loads(annotations.read_text())
    assert coco["info"]["variety"]["textures"] == list(SMALL.textures)
    for image in coco["images"]:
        assert {"texture", "photometric", "voi", "bits_stored", "distractors"} <= set(image)
    assert all("shape" in a for a in coco["annotations"])


def test_the_cli_offers_every_named_variety_and_writes_one(tmp_path):
    import subprocess
    import sys

    from dicom_node.cli import build_parser

    phantom = build_parser()._subparsers._group_actions[0].choices["phantom"]
    offered = next(a for a in phantom._actions if a.dest == "variety").choices
    assert sorted(offered) == sorted(VARIETIES)
    done = subprocess.run([sys.executable, "-m", "dicom_node", "phantom", "--out", str(tmp_path), "--n", "1",
                           "--variety", "texture_reticular"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    image = json.loads((tmp_path / "annotations.json").read_text())["images"][0]
    assert image["texture"] == "reticular"


def test_hard_negatives_are_never_drawn_over_a_mass_even_where_masses_fill_the_image():
    """A mass box over most of the image: every mark must still land outside it (3 mm margin)."""
    from dicom_node.lab.phantom_variety import draw_distractors

    spacing = 0.5  # mm per pixel: the 3 mm margin is 6 pixels
    mass = (60.0, 60.0, 340.0, 340.0)
    drawn = 0
    for seed in range(40):
        image = np.zeros((400, 400), dtype=np.float32)
        marks = draw_distractors(np.random.default_rng(seed), image,
                                 variety=dataclasses.replace(TRAINING, distractors=1.0), spacing=spacing,
                                 laterality="L", view="CC", breast=np.ones((40, 40), dtype=bool), masses=[mass])
        drawn += len(marks)
        assert not image[60 - 5:340 + 5, 60 - 5:340 + 5].any(), (seed, marks)
    assert drawn > 40


def test_in_memory_phantoms_are_the_same_from_several_processes():
    one, coco_one = prepared_phantoms(n=3, seed=22, variety=SMALL, input_size=128)
    two, coco_two = prepared_phantoms(n=3, seed=22, variety=SMALL, input_size=128, workers=2, half=True)
    assert coco_one == coco_two
    for (a, boxes_a, id_a), (b, boxes_b, id_b) in zip(one, two):
        assert id_a == id_b and b.pixels.dtype == np.float16
        np.testing.assert_array_equal(a.pixels.astype(np.float16), b.pixels)
        np.testing.assert_array_equal(boxes_a, boxes_b)


# The VOI LUT attributes a DX image For Presentation must carry (PS3.3 C.8.11.3, Type 1C): a
# varied look of "none" leaves them out on purpose, as some vendors' images do, so that the
# node and training meet such images; dciodvfy names exactly these and nothing else.
MISSING_VOI = {
    "Error - Missing attribute Type 1C Conditional Element=<VOILUTSequence> Module=<DXImage>",
    "Error - Missing attribute Type 1C Conditional Element=<VOILUTSequence> Module=<VOILUTMacro>",
    "Error - Missing attribute Type 1C Conditional Element=<WindowCenter> Module=<DXImage>",
    "Error - Missing attribute Type 1C Conditional Element=<WindowCenter> Module=<VOILUTMacro>",
}


def test_varied_phantoms_pass_dciodvfy(tmp_path):
    from dciodvfy import assert_dciodvfy_clean, dciodvfy_lines

    annotations = write_phantoms(tmp_path, n=40, seed=31, variety=dataclasses.replace(SMALL, distractors=1.0))
    images = json.loads(annotations.read_text())["images"]
    assert {image["voi"] for image in images} == {"LINEAR", "SIGMOID", "LUT", "none"}
    assert {image["photometric"] for image in images} == {"MONOCHROME1", "MONOCHROME2"}
    for image in images:
        path = tmp_path / image["file_name"]
        if image["voi"] == "none":
            errors = {line for line in dciodvfy_lines(path) if line.startswith("Error")}
            assert errors == MISSING_VOI, (image, errors)
        else:
            assert_dciodvfy_clean(path)
