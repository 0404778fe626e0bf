"""--by breakdowns, the report folder and its figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dicom_node.lab.evaluate.run import (
    STUDY_REFERENCE,
    evaluate_detections,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CURVE_BLUE = np.array([0x1F, 0x77, 0xB4])  # the first series' colour in the figures


def breakdown_case() -> tuple[dict, list[dict]]:
    lesion, elsewhere = [0, 0, 40, 40], [300, 300, 40, 40]
    images = [
        {"id": 1, "view": "CC", "density": 2},  # lesion found
        {"id": 2, "view": "MLO", "density": 2},  # lesion missed, one false mark
        {"id": 3, "view": "CC", "density": 3},  # no lesion, one false mark
        {"id": 4, "density": 3},  # no view recorded; lesion found
    ]
    annotations = [{"id": i, "image_id": image_id, "category_id": 1, "bbox": lesion, "iscrowd": 0,
                    "area": 1600.0} for i, image_id in enumerate((1, 2, 4), start=1)]
    detections = [
        {"image_id": 1, "category_id": 1, "bbox": lesion, "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": elsewhere, "score": 0.8},
        {"image_id": 3, "category_id": 1, "bbox": elsewhere, "score": 0.7},
        {"image_id": 4, "category_id": 1, "bbox": lesion, "score": 0.6},
    ]
    gt = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "mass"}]}
    return gt, detections


def test_breakdown_by_an_image_field():
    gt, detections = breakdown_case()
    result = evaluate_detections(gt, detections, threshold=0.5, by="view")
    groups = result["by"]["view"]
    assert set(groups) == {"CC", "MLO", "(none)"}
    cc, mlo, none = (groups[k]["summary"] for k in ("CC", "MLO", "(none)"))
    # CC: images 1 and 3, one lesion found, one false mark.
    assert (cc["images"], cc["lesions"], cc["tp"], cc["fp"]) == (2, 1, 1, 1)
    assert (cc["precision"], cc["recall"], cc["fp_per_image"]) == (0.5, 1.0, 0.5)
    # MLO: image 2, lesion missed, one false mark.
    assert (mlo["precision"], mlo["recall"], mlo["f1"], mlo["ap50"]) == (0.0, 0.0, 0.0, 0.0)
    # Image 4 has no view: its own group, a single found lesion.
    assert (none["precision"], none["recall"], none["ap50"]) == (1.0, 1.0, pytest.approx(1.0))
    # The whole set is still evaluated once: 2 of 3 lesions, 2 of 4 marks right.
    assert (result["summary"]["recall"], result["summary"]["precision"]) == (pytest.approx(2 / 3), 0.5)


def test_breakdown_by_several_fields_with_numeric_values():
    gt, detections = breakdown_case()
    result = evaluate_detections(gt, detections, threshold=0.5, by=["view", "density"])
    density = result["by"]["density"]
    assert set(density) == {"2", "3"}
    assert density["2"]["summary"]["recall"] == 0.5  # images 1, 2: one of two lesions
    assert density["3"]["summary"]["recall"] == 1.0  # images 3, 4: the one lesion


def test_breakdown_by_a_field_no_image_has():
    gt, detections = breakdown_case()
    with pytest.raises(ValueError, match="laterality"):
        evaluate_detections(gt, detections, threshold=0.5, by="laterality")


def assert_png(path, *, curve_drawn: bool | None = True):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
        assert image.width >= 600 and image.height >= 500
    if curve_drawn is not None:
        blue = np.count_nonzero(np.abs(pixels - CURVE_BLUE).sum(axis=1) < 40)
        assert (blue > 500) == curve_drawn, f"{path}: {blue} curve-coloured pixels"


def test_report_folder(tmp_path):
    gt, detections = breakdown_case()
    result = evaluate_detections(gt, detections, threshold=0.5, by="view", label="test model")
    written = write_report(result, tmp_path)
    names = {p.name for p in written}
    assert names == {"metrics.json", "report.md", "pr_curve.png", "froc_curve.png",
                     "pr_curve_by_view.png", "froc_curve_by_view.png"}
    assert all((tmp_path / name).is_file() for name in names)
    for name in ("pr_curve.png", "froc_curve.png"):
        assert_png(tmp_path / name)
    for name in ("pr_curve_by_view.png", "froc_curve_by_view.png"):  # overlaid groups hide colours
        assert_png(tmp_path / name, curve_drawn=None)
    # Strict JSON (no NaN), the same numbers as returned.
    stored = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert stored["summary"] == result["summary"]
    assert stored["by"]["view"]["MLO"]["summary"]["recall"] == 0.0

    report = (tmp_path / "report.md").read_text()
    assert "| test model | this data set" in report
    assert f"| {result['summary']['precision']:.3f} |" in report
    for row in STUDY_REFERENCE:
        line = next(line for line in report.splitlines() if line.startswith(f"| {row['model']} |"))
        assert "private test set" in line
        for key in ("precision", "recall", "f1", "ap50"):
            assert f"{row[key]:.3f}" in line


def test_study_reference_is_the_published_table():
    # Issue 4: RetinaNet R101-FPN 0.735/0.600/0.660/0.568 ... (precision/recall/F1/AP50).
    published = {
        "retinanet_r101_fpn": (0.735, 0.600, 0.660, 0.568),
        "retinanet_r50_fpn": (0.766, 0.442, 0.560, 0.502),
        "faster_rcnn_r101_fpn": (0.613, 0.655, 0.635, 0.544),
        "faster_rcnn_r50_fpn": (0.574, 0.660, 0.614, 0.523),
    }
    table = {r["architecture"]: (r["precision"], r["recall"], r["f1"], r["ap50"]) for r in STUDY_REFERENCE}
    assert table == published


def test_report_without_lesions_still_draws(tmp_path):
    gt = {"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "mass"}]}
    result = evaluate_detections(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}],
                                 threshold=0.5)
    write_report(result, tmp_path)
    for name in ("pr_curve.png", "froc_curve.png"):
        assert_png(tmp_path / name, curve_drawn=False)
    assert json.loads((tmp_path / "metrics.json").read_text())["summary"]["ap50"] is None
