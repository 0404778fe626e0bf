"""The CBIS-DDSM converter on a tiny fake download (synthetic DICOM, CSV written here)."""

from __future__ import annotations

import pytest

from dicom_node.lab.datasets import DatasetError
from dicom_node.lab.datasets.cbis_ddsm import convert_cbis_ddsm
from dicom_node.lab.datasets.coco import CocoDataset, load_coco


def _by_case(coco: dict) -> dict:
    return {image["cbis_image"]: image for image in coco["images"]}


def _boxes(coco: dict, image: dict) -> list[list[float]]:
    return [a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"]]


def test_converts_tcia_layout_with_renamed_folders(fake_cbis, tmp_path):
    fake_cbis.add_case(patient="P_00001", side="LEFT", view="CC", shape=(120, 80), density=3, lesions=[
        {"box": (10, 20, 30, 50), "pathology": "BENIGN"},
        {"box": (40, 60, 70, 100), "pathology": "MALIGNANT", "order": "crop-first"},
    ])
    fake_cbis.add_case(patient="P_00002", side="RIGHT", view="MLO", shape=(100, 60), lesions=[
        # No telling Series Description: the mask is the file the size of the image.
        {"box": (5, 5, 25, 15), "pathology": "BENIGN_WITHOUT_CALLBACK", "generic_description": True,
         "order": "crop-first"},
    ])
    csv_path = fake_cbis.write_csv(tmp_path / "mass_case_description_train_set.csv")
    out = tmp_path / "coco" / "cbis.json"

    summary = convert_cbis_ddsm([csv_path], fake_cbis.root, out)

    assert (summary.rows, summary.images, summary.annotations, summary.skipped) == (3, 2, 3, [])
    coco = load_coco(out)  # valid COCO, image paths resolve relative to the JSON file
    cases = _by_case(coco)
    left = cases["Mass-Training_P_00001_LEFT_CC"]
    assert (left["view"], left["laterality"], left["density"], left["birads_density"]) == ("CC", "L", "C", 3)
    assert (left["width"], left["height"], left["split"], left["patient_id"]) == (80, 120, "train", "P_00001")
    assert left["pathology"] == "MALIGNANT"  # the most severe of its masses
    assert "full mammogram images" in left["file_name"]
    assert sorted(_boxes(coco, left)) == [[10, 20, 20, 30], [40, 60, 30, 40]]
    right = cases["Mass-Training_P_00002_RIGHT_MLO"]
    assert (right["view"], right["laterality"], right["pathology"]) == ("MLO", "R", "BENIGN_WITHOUT_CALLBACK")
    assert _boxes(coco, right) == [[5, 5, 20, 10]]
    annotation = next(a for a in coco["annotations"] if a["image_id"] == left["id"] and a["abnormality_id"] == 2)
    assert (annotation["pathology"], annotation["category_id"], annotation["area"]) == ("MALIGNANT", 1, 1200)
    # And it feeds the training dataset directly.
    _, boxes, _ = CocoDataset(out, input_size=60)[0]
    assert boxes.shape == (2, 4)


def test_exact_csv_paths_are_used_when_they_exist(fake_cbis, tmp_path):
    fake_cbis.add_case(patient="P_00003", layout="csv", lesions=[{"box": (1, 2, 11, 22)}])
    csv_path = fake_cbis.write_csv(tmp_path / "mass_case_description_test_set.csv")
    summary = convert_cbis_ddsm([csv_path], fake_cbis.root, tmp_path / "out.json")
    coco = load_coco(tmp_path / "out.json")
    assert summary.annotations == 1 and coco["images"][0]["split"] == "test"
    assert coco["images"][0]["file_name"].endswith("000000.dcm")
    assert coco["annotations"][0]["bbox"] == [1, 2, 10, 20]


def test_slightly_smaller_mask_is_rescaled(fake_cbis, tmp_path):
    # Mask 2 rows and 1 column short of the 120 x 80 image: scaled up, not rejected.
    fake_cbis.add_case(patient="P_00004", shape=(120, 80),
                       lesions=[{"box": (10, 10, 40, 59), "mask_shape": (118, 79)}])
    csv_path = fake_cbis.write_csv(tmp_path / "mass_case_description_train_set.csv")
    summary = convert_cbis_ddsm([csv_path], fake_cbis.root, tmp_path / "out.json")
    assert summary.rescaled_masks == 1 and summary.annotations == 1
    x, y, w, h = load_coco(tmp_path / "out.json")["annotations"][0]["bbox"]
    assert x == pytest.approx(10 * 80 / 79) and w == pytest.approx(30 * 80 / 79)
    assert y == pytest.approx(10 * 120 / 118) and h == pytest.approx(49 * 120 / 118)


def test_bad_rows_are_skipped_and_reported(fake_cbis, tmp_path):
    fake_cbis.add_case(patient="P_00010", lesions=[
        {"box": (10, 10, 20, 20)},  # good
        {"box": (5, 5, 10, 10), "mask_shape": (60, 40)},  # half size: another image's mask
        {"box": (5, 5, 10, 10), "empty": True},
        {"box": (5, 5, 10, 10), "write": False},  # mask missing
    ])
    fake_cbis.add_case(patient="P_00011", write_image=False, lesions=[{"box": (1, 1, 5, 5)}])
    fake_cbis.add_case(patient="P_00012", prefix="Calc-Training", abnormality_type="calcification",
                       lesions=[{"box": (1, 1, 5, 5)}])
    fake_cbis.add_case(patient="P_00013", lesions=[{"box": (1, 1, 5, 5), "mask_shape": (60, 40)}])
    csv_path = fake_cbis.write_csv(tmp_path / "mass_case_description_train_set.csv")

    summary = convert_cbis_ddsm([csv_path], fake_cbis.root, tmp_path / "out.json")

    assert (summary.rows, summary.not_mass, summary.annotations) == (7, 1, 1)
    # P_00013's only mask was inconsistent: an image with no boxes is left out entirely.
    assert summary.images == 1
    reasons = {(entry["what"].split()[0], entry["what"].split()[-1]): entry["reason"]
               for entry in summary.skipped}
    assert "inconsistent sizes" in reasons[("P_00010", "2")]
    assert "empty mask" in reasons[("P_00010", "3")]
    assert "ROI mask not found" in reasons[("P_00010", "4")]
    assert "full mammogram not found" in reasons[("P_00011", "1")]
    assert "inconsistent sizes" in reasons[("P_00013", "1")]
    assert all(entry["csv"] == csv_path.name and entry["line"] > 1 for entry in summary.skipped)
    assert len(summary.skipped) == 5
    coco = load_coco(tmp_path / "out.json")
    assert [image["patient_id"] for image in coco["images"]] == ["P_00010"]
    assert summary.as_dict()["skipped"] == summary.skipped


def test_missing_mask_is_named(fake_cbis, tmp_path):
    # Neither the mask nor the crop exists (their folder is absent from the download).
    fake_cbis.add_case(patient="P_00020", lesions=[{"box": (1, 1, 5, 5), "write": False},
                                                   {"box": (2, 2, 6, 6)}])
    csv_path = fake_cbis.write_csv(tmp_path / "mass_case_description_train_set.csv")
    summary = convert_cbis_ddsm([csv_path], fake_cbis.root, tmp_path / "out.json")
    assert summary.annotations == 1
    (skipped,) = summary.skipped
    assert "ROI mask not found" in skipped["reason"] and "P_00020_LEFT_CC_1" in skipped["reason"]


def test_unusable_inputs_are_named(fake_cbis, tmp_path):
    not_cbis = tmp_path / "other.csv"
    not_cbis.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match=r"other.csv: not a CBIS-DDSM description file"):
        convert_cbis_ddsm([not_cbis], fake_cbis.root, tmp_path / "out.json")
    with pytest.raises(DatasetError, match="cannot read CSV file"):
        convert_cbis_ddsm([tmp_path / "absent.csv"], fake_cbis.root, tmp_path / "out.json")
    with pytest.raises(DatasetError, match="root folder not found"):
        convert_cbis_ddsm([not_cbis], tmp_path / "absent", tmp_path / "out.json")
