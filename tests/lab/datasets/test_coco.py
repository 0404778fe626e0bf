"""COCO loading and validation, the prepared-image dataset, and deterministic splits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.lab.datasets import DatasetError
from dicom_node.lab.datasets import coco as coco_module
from dicom_node.lab.datasets.coco import (
    CocoDataset,
    load_coco,
    save_coco,
    split_coco,
    split_image_ids,
    validate_coco,
    write_splits,
)
from dicom_node.pixels import display_pixels


def _boxes_xyxy(data: dict, image_id) -> np.ndarray:
    boxes = [[x, y, x + w, y + h] for x, y, w, h in
             (a["bbox"] for a in data["annotations"] if a["image_id"] == image_id)]
    return np.array(boxes, dtype=np.float32).reshape(-1, 4)


def test_dataset_yields_prepared_images_and_scaled_boxes(phantom_set):
    data = load_coco(phantom_set)
    dataset = CocoDataset(phantom_set, input_size=104)
    assert len(dataset) == len(data["images"]) == 8
    for index in range(len(dataset)):
        prepared, boxes, image_id = dataset[index]
        image = data["images"][index]
        assert image_id == image["id"]
        assert prepared.original_shape == (image["height"], image["width"])
        assert max(prepared.pixels.shape) == 104
        assert prepared.pixels.dtype == np.float32
        assert 0 <= prepared.pixels.min() and prepared.pixels.max() <= 1
        assert boxes.dtype == np.float32 and boxes.shape[1] == 4
        original = _boxes_xyxy(data, image_id)
        assert len(boxes) == len(original) > 0
        # Mapping back with the pixel pipeline's own function gives the labelled boxes.
        np.testing.assert_allclose(prepared.boxes_to_original(boxes), original, atol=1e-3)
        rows, columns = prepared.pixels.shape
        assert (boxes[:, [0, 2]] <= columns).all() and (boxes[:, [1, 3]] <= rows).all()


def test_dataset_pixels_come_from_the_pixel_pipeline(phantom_set):
    import pydicom

    dataset = CocoDataset(phantom_set, input_size=208)  # the original size: no resampling
    prepared, _, _ = dataset[0]
    expected = display_pixels(pydicom.dcmread(dataset.path(0)))
    np.testing.assert_array_equal(prepared.pixels, expected)


def test_dataset_subset_and_crowd_boxes(phantom_set):
    data = load_coco(phantom_set)
    first = data["annotations"][0]
    data["annotations"][0] = {**first, "iscrowd": 1}
    dataset = CocoDataset(data, root=phantom_set.parent, input_size=64, image_ids=[first["image_id"]])
    assert len(dataset) == 1
    _, boxes, image_id = dataset[0]
    assert image_id == first["image_id"]
    assert len(boxes) == len(_boxes_xyxy(data, image_id)) - 1  # the crowd box is left out
    with pytest.raises(DatasetError, match="not in the dataset"):
        CocoDataset(data, root=phantom_set.parent, input_size=64, image_ids=[999])


def test_cache_serves_the_same_pixels_without_decoding(phantom_set, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    dataset = CocoDataset(phantom_set, input_size=96, cache_dir=cache)
    first, first_boxes, _ = dataset[1]
    assert len(list(cache.glob("*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the prepared image is cached")

    monkeypatch.setattr(coco_module, "read_image", no_decoding)
    again, again_boxes, _ = CocoDataset(phantom_set, input_size=96, cache_dir=cache)[1]
    np.testing.assert_array_equal(again.pixels, first.pixels)
    assert (again.scale, again.original_shape) == (first.scale, first.original_shape)
    np.testing.assert_array_equal(again_boxes, first_boxes)
    # Another input size is another cache entry, so it must decode.
    with pytest.raises(DatasetError, match="decoded although"):
        CocoDataset(phantom_set, input_size=64, cache_dir=cache)[1]


@pytest.mark.parametrize("bits", [8, 16])
def test_png_images_are_scaled_to_unit_range(tmp_path, bits):
    rows, columns = 60, 40
    full_scale = 255 if bits == 8 else 65535
    ramp = np.linspace(0, full_scale, rows * columns).reshape(rows, columns)
    array = ramp.astype(np.uint8 if bits == 8 else np.uint16)
    Image.fromarray(array).save(tmp_path / "image.png")
    data = {
        "images": [{"id": 7, "file_name": "image.png", "width": columns, "height": rows}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 20, 10, 20],
                         "area": 200, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "mass"}],
    }
    save_coco(data, tmp_path / "set.json")
    prepared, boxes, image_id = CocoDataset(tmp_path / "set.json", input_size=30)[0]
    assert image_id == 7 and prepared.pixels.shape == (30, 20)
    assert prepared.pixels.min() == pytest.approx(0, abs=0.02)
    assert prepared.pixels.max() == pytest.approx(1, abs=0.02)
    np.testing.assert_allclose(boxes, [[5, 10, 10, 20]])


def test_image_size_disagreeing_with_annotations_is_named(phantom_set, tmp_path):
    data = load_coco(phantom_set)
    data["images"][0]["width"] += 5
    dataset = CocoDataset(data, root=phantom_set.parent, input_size=64)
    with pytest.raises(DatasetError, match="annotations say"):
        dataset[0]


def _valid() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 50},
                   {"id": 2, "file_name": "b.png", "width": 100, "height": 50}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20],
                         "area": 400, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "mass"}],
    }


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["annotations"][0].update(bbox=[90, 10, 20, 20]), "outside its image 'a.png'"),
        (lambda d: d["annotations"][0].update(bbox=[10, 40, 20, 20]), "outside its image"),
        (lambda d: d["annotations"][0].update(bbox=[-5, 10, 20, 20]), "outside its image"),
        (lambda d: d["annotations"][0].update(bbox=[10, 10, 0, 20]), "no area"),
        (lambda d: d["annotations"][0].update(bbox=[10, 10, 20]), "four numbers"),
        (lambda d: d["annotations"][0].update(category_id=3), "unknown category_id 3"),
        (lambda d: d["annotations"][0].update(image_id=9), "unknown image_id 9"),
        (lambda d: d["images"][1].update(id=1), "duplicate image id"),
        (lambda d: d["images"][0].update(width=0), "'width' must be a positive integer"),
        (lambda d: d["images"][0].pop("file_name"), "missing 'file_name'"),
        (lambda d: d.pop("categories"), "'categories' must be a list (missing)"),
    ],
)
def test_validation_names_the_problem(change, message):
    data = _valid()
    assert validate_coco(data) == []
    change(data)
    problems = validate_coco(data)
    assert any(message in problem for problem in problems), problems


def test_load_coco_reports_missing_files_and_bad_json(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    save_coco(_valid(), tmp_path / "set.json")
    with pytest.raises(DatasetError, match=r"image 2: image file not found: .*b\.png"):
        load_coco(tmp_path / "set.json")
    assert load_coco(tmp_path / "set.json", check_files=False)["images"][1]["id"] == 2
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json: not a readable COCO JSON file"):
        load_coco(tmp_path / "broken.json")
    with pytest.raises(DatasetError, match="nowhere.json: annotation file not found"):
        load_coco(tmp_path / "nowhere.json")


def _many_patients(count: int = 300) -> dict:
    images, annotations = [], []
    for number in range(count * 4):
        patient = f"P{number // 4:04d}" if number % 7 else None  # some images without a patient
        image = {"id": number + 1, "file_name": f"{number}.dcm", "width": 10, "height": 10}
        if patient:
            image["patient_id"] = patient
        images.append(image)
        annotations.append({"id": number + 1, "image_id": number + 1, "category_id": 1,
                            "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "mass"}]}


def test_split_is_deterministic_disjoint_complete_and_keeps_patients_together():
    data = _many_patients()
    parts = split_image_ids(data, seed=3)
    assert parts == split_image_ids(copy.deepcopy(data), seed=3)
    assert parts != split_image_ids(data, seed=4)
    all_ids = [image_id for ids in parts.values() for image_id in ids]
    assert sorted(all_ids) == sorted(image["id"] for image in data["images"])
    patient_of = {image["id"]: image.get("patient_id") for image in data["images"]}
    part_of_patient: dict = {}
    for name, ids in parts.items():
        for image_id in ids:
            patient = patient_of[image_id]
            if patient:
                assert part_of_patient.setdefault(patient, name) == name
    # The study's 2378/400/400 proportions, within a group of four images.
    total = len(data["images"])
    for name, share in (("train", 2378 / 3178), ("val", 400 / 3178), ("test", 400 / 3178)):
        assert abs(len(parts[name]) - share * total) <= 4


def test_split_coco_subsets_annotations_and_by_image():
    data = _many_patients(40)
    parts = split_coco(data, proportions={"a": 1, "b": 1}, seed=0, group_by=None)
    assert {len(part["images"]) for part in parts.values()} == {80}
    for part in parts.values():
        ids = {image["id"] for image in part["images"]}
        assert {a["image_id"] for a in part["annotations"]} == ids
        assert part["categories"] == data["categories"]
    with pytest.raises(ValueError, match="proportions"):
        split_image_ids(data, proportions={"a": -1})


def test_write_splits_keeps_image_paths_valid_elsewhere(phantom_set, tmp_path):
    written = write_splits(phantom_set, out_dir=tmp_path / "splits", proportions={"train": 1, "val": 1},
                           seed=0, group_by="patient_id")
    assert set(written) == {"train", "val"}
    seen = []
    for name, path in written.items():
        part = load_coco(path)  # file names resolve relative to the new folder
        assert part["info"]["split"] == name
        seen += [image["sop_instance_uid"] for image in part["images"]]
        # Each phantom study is one patient: whole studies per part.
        assert len(part["images"]) % 4 == 0
    assert len(seen) == len(set(seen)) == 8
    beside = write_splits(phantom_set, proportions={"train": 1, "val": 1})
    assert beside["train"] == Path(phantom_set).with_name("annotations_train.json")
    assert json.loads(beside["train"].read_text())["images"][0]["file_name"].startswith("images/")
