"""`run_evaluation` end to end: DICOM files on disk, the real detector loader, the report folder.

The detector is the `fixed_boxes` test double behind the real `load_detector`: the same
boxes, relative to the image, on every image. They travel the real path (resized pixels
-> PreparedImage.boxes_to_original), so a box that came back in resized coordinates
would miss the ground truth written in original pixels.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest

from dicom_node.config import DetectorConfig
from dicom_node.errors import NodeError
from dicom_node.lab.evaluate.run import run_evaluation
from tests import synthetic

LESION_BOX = (0.25, 0.25, 0.5, 0.5)  # relative x0, y0, x1, y1: where every image's mass is
# (rows, columns, view, has a lesion); image ids 1, 2, 3
IMAGES = [(256, 192, "CC", True), (300, 200, "MLO", True), (256, 192, "CC", False)]


def relative_to_coco(box, rows: int, columns: int) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0 * columns, y0 * rows, (x1 - x0) * columns, (y1 - y0) * rows]


@pytest.fixture
def dataset(tmp_path):
    images, annotations = [], []
    for image_id, (rows, columns, view, lesion) in enumerate(IMAGES, start=1):
        name = f"images/{image_id}.dcm"
        masses = ((rows * 0.375, columns * 0.375, rows * 0.1),) if lesion else ()
        synthetic.write(synthetic.mammogram(rows=rows, columns=columns, view=view, masses=masses, seed=image_id),
                        tmp_path / name)
        images.append({"id": image_id, "file_name": name, "width": columns, "height": rows, "view": view})
        if lesion:
            bbox = relative_to_coco(LESION_BOX, rows, columns)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    path = tmp_path / "test.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "mass"}]}))
    return path


@pytest.fixture
def detector_config(tmp_path):
    weights = tmp_path / "boxes.json"
    weights.write_text(json.dumps({
        "label": "TEST DOUBLE fixed boxes",
        # The mass (0.9) and, on every image, a mark on normal tissue (0.3).
        "boxes": [[*LESION_BOX, 0.9], [0.6, 0.6, 0.9, 0.9, 0.3]],
    }))
    return DetectorConfig(architecture="fixed_boxes", weights=str(weights), score_threshold=0.5, input_size=128)


def test_run_evaluation_writes_the_report(dataset, detector_config, tmp_path):
    out = tmp_path / "report"
    result = run_evaluation(detector_config, dataset, out, by="view")

    assert {p.name for p in out.iterdir()} >= {"detections.json", "metrics.json", "report.md", "pr_curve.png",
                                                "froc_curve.png", "pr_curve_by_view.png", "froc_curve_by_view.png"}
    detections = json.loads((out / "detections.json").read_text())
    # The detector ran without its own 0.5 cut-off: the 0.3 marks are there for AP/FROC.
    assert sorted(d["score"] for d in detections) == [0.3] * 3 + [0.9] * 3
    # Boxes are in original pixels (the ground truth's), not the model's 128-pixel input.
    for image_id, (rows, columns, _view, _lesion) in enumerate(IMAGES, start=1):
        found = next(d for d in detections if d["image_id"] == image_id and d["score"] == 0.9)
        assert found["bbox"] == pytest.approx(relative_to_coco(LESION_BOX, rows, columns), abs=0.5)

    s = result["summary"]
    # At 0.5: the mass on images 1 and 2 (TP), the same box on image 3 (FP).
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 0)
    assert (s["precision"], s["recall"]) == (pytest.approx(2 / 3), 1.0)
    # All 0.9 boxes tie; COCO ranks them by image id: TP, TP, FP -> precision 1 up to recall 1.
    assert s["ap50"] == pytest.approx(1.0)
    # FROC over 3 images: score 0.9 -> (1/3 FP/image, 2/2); score 0.3 -> (4/3, 2/2).
    # 1/8 and 1/4 lie on the segment from (0, 0) to (1/3, 1).
    assert s["froc"]["sensitivities"] == pytest.approx([0.125 * 3, 0.25 * 3, 1, 1, 1, 1])
    assert result["by"]["view"]["CC"]["summary"]["precision"] == 0.5  # images 1 and 3
    assert result["by"]["view"]["MLO"]["summary"]["precision"] == 1.0
    assert "TEST DOUBLE fixed boxes" in result["label"]
    assert result["skipped_images"] == []
    assert json.loads((out / "metrics.json").read_text())["summary"] == s


def test_detections_file_reproduces_ap50_with_pycocotools(dataset, detector_config, tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # A harder operating point so AP is not trivially 1: the 0.3 mark outranks the mass.
    weights = Path(detector_config.weights)
    weights.write_text(json.dumps({**json.loads(weights.read_text()),
                                   "boxes": [[*LESION_BOX, 0.4], [0.6, 0.6, 0.9, 0.9, 0.7]]}))
    out = tmp_path / "report"
    run_evaluation(detector_config, dataset, out)
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(dataset))
        results = truth.loadRes(copy.deepcopy(json.loads((out / "detections.json").read_text())))
        coco_eval = COCOeval(truth, results, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    ap50 = json.loads((out / "metrics.json").read_text())["summary"]["ap50"]
    assert 0 < ap50 < 1
    assert ap50 == pytest.approx(coco_eval.stats[1], abs=1e-4)


def test_an_unreadable_image_is_skipped_and_its_lesion_missed(dataset, detector_config, tmp_path):
    (dataset.parent / "images" / "2.dcm").write_bytes(b"not a DICOM file")
    result = run_evaluation(detector_config, dataset, tmp_path / "report")
    assert [s["image_id"] for s in result["skipped_images"]] == [2]
    assert "2.dcm" in result["skipped_images"][0]["reason"]
    assert (result["summary"]["lesions"], result["summary"]["recall"]) == (2, 0.5)


def test_dataset_problems_are_named_before_the_model_loads(dataset, tmp_path):
    missing_weights = DetectorConfig(architecture="fixed_boxes", weights=str(tmp_path / "none.json"))
    out = tmp_path / "report"
    with pytest.raises(NodeError, match="not found"):
        run_evaluation(missing_weights, tmp_path / "absent.json", out)
    with pytest.raises(NodeError, match="laterality"):
        run_evaluation(missing_weights, dataset, out, by="laterality")
    (dataset.parent / "images" / "1.dcm").unlink()
    with pytest.raises(NodeError, match="1.dcm"):
        run_evaluation(missing_weights, dataset, out)
    assert not out.exists()
    # And a checkpoint problem is a NodeError too (CheckpointError), naming the file.
    (dataset.parent / "images" / "1.dcm").write_bytes(b"")
    with pytest.raises(NodeError, match="none.json"):
        run_evaluation(missing_weights, dataset, out)
