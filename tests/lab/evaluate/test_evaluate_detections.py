"""`dicom-node evaluate --detections FILE`: detections made elsewhere, scored with the same metrics.

AP50 equals pycocotools' on the seeded random cases (read from files, through
score_detections) and on a hand-made case through the real CLI; a bad file is one
line and exit status 2, naming the file and the first bad entry.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.lab.evaluate.evaluate_cases import random_case
from tests.lab.evaluate.test_evaluate_parity import coco_ap50

from dicom_node.lab.evaluate.run import score_detections

pytest.importorskip("pycocotools")

CONFIG = Path(__file__).resolve().parents[3] / "config" / "dicom-node.toml"

REPORT_FILES = {"metrics.json", "detections.json", "report.md", "pr_curve.png", "froc_curve.png"}


def evaluate_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicom_node", "evaluate", "--config", str(CONFIG), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=180)


def evaluate_main(capsys, *args) -> tuple[int, str]:
    """The CLI's main() in this process (the same code as the console script, without torch's start-up)."""
    from dicom_node.cli import main

    status = main(["evaluate", "--config", str(CONFIG), *map(str, args)])
    return status, capsys.readouterr().err


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def tricky_case() -> tuple[dict, list[dict]]:
    """Ties in score (within and across images), a crowd region, an image without detections,
    an image without lesions (with false positives), and a lesion found twice."""
    images = [{"id": i, "file_name": f"{i}.dcm", "width": 400, "height": 300, "density": d}
              for i, d in ((3, "A"), (7, "B"), (11, "B"), (20, "A"))]
    lesions = [(3, [10, 10, 50, 40], 0), (3, [200, 100, 60, 60], 0), (7, [30, 30, 80, 80], 0),
               (7, [150, 150, 100, 100], 1), (11, [100, 100, 40, 40], 0)]  # image 20: no lesion
    annotations = [{"id": n, "image_id": i, "category_id": 1, "bbox": b, "area": b[2] * b[3], "iscrowd": c}
                   for n, (i, b, c) in enumerate(lesions, start=1)]
    detections = [
        {"image_id": 3, "category_id": 1, "bbox": [12, 11, 48, 40], "score": 0.9},
        {"image_id": 3, "category_id": 1, "bbox": [14, 12, 46, 38], "score": 0.9},  # found again, same score
        {"image_id": 3, "category_id": 1, "bbox": [300, 200, 50, 50], "score": 0.6},
        {"image_id": 7, "category_id": 1, "bbox": [32, 28, 80, 82], "score": 0.6},  # tie across images
        {"image_id": 7, "category_id": 1, "bbox": [160, 160, 40, 40], "score": 0.8},  # inside the crowd region
        {"image_id": 20, "category_id": 1, "bbox": [50, 50, 30, 30], "score": 0.9},  # no lesion there
        {"image_id": 20, "category_id": 1, "bbox": [90, 50, 30, 30], "score": 0.3},
        {"image_id": 3, "category_id": 1, "bbox": [205, 95, 55, 70], "score": 0.3},
    ]  # image 11: no detection, its lesion missed
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "mass"}]}, detections


def test_scored_files_match_pycocotools(tmp_path):
    # The metrics' parity is test_evaluate_parity's (200 cases); here the file path to them,
    # with a report written per case (the plots make a case cost a third of a second).
    mismatches, compared = [], 0
    for seed in range(24):
        gt, detections = random_case(seed)
        gt["images"] = [{**image, "width": 1000, "height": 1000} for image in gt["images"]]  # COCO files have them
        detections = [d for d in detections if d["category_id"] != 99]  # the file reader refuses those
        lesions = sum(not a["iscrowd"] for a in gt["annotations"])
        if not detections or not lesions:
            continue
        data = write_json(tmp_path / f"gt{seed}.json", gt)
        found = write_json(tmp_path / f"det{seed}.json", detections)
        ours = score_detections(found, data, tmp_path / f"report{seed}", threshold=0.5)["summary"]["ap50"]
        reference = coco_ap50(gt, detections)
        compared += 1
        if abs(ours - reference) > 1e-4:
            mismatches.append((seed, ours, reference))
    assert compared >= 12 and mismatches == []


def test_cli_scores_a_results_file_like_pycocotools(tmp_path):
    gt, detections = tricky_case()
    data = write_json(tmp_path / "test.json", gt)  # no image files: scoring needs none
    found = write_json(tmp_path / "coco_instances_results.json", detections)
    out = tmp_path / "report"
    result = evaluate_cli("--data", data, "--out", out, "--detections", found, "--by", "density")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} >= REPORT_FILES | {"pr_curve_by_density.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    reference = coco_ap50(gt, detections)
    print(f"AP50 ours {metrics['summary']['ap50']!r} pycocotools {reference!r} "
          f"difference {abs(metrics['summary']['ap50'] - reference)!r}")
    assert 0 < reference < 1
    assert metrics["summary"]["ap50"] == pytest.approx(reference, abs=1e-4)
    assert metrics["detections_file"] == str(found)
    # The crowd box absorbs its detection; image 11's lesion is missed; image 20 holds FPs only.
    assert (metrics["summary"]["lesions"], metrics["summary"]["tp"], metrics["summary"]["fn"]) == (4, 2, 2)
    assert set(metrics["by"]["density"]) == {"A", "B"}
    assert json.loads((out / "detections.json").read_text()) == [
        {**d, "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])} for d in detections]


BAD_ENTRIES = [
    ({"image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}, "image_id 99 is not an image"),
    ({"image_id": 3, "category_id": 0, "bbox": [1, 1, 5, 5], "score": 0.5}, "category_id 0 is not a category"),
    ({"image_id": 3, "category_id": 1, "bbox": [1, 1, 5], "score": 0.5}, "bbox must be"),
    ({"image_id": 3, "category_id": 1, "bbox": [1, 1, "5", 5], "score": 0.5}, "bbox must be"),
    ({"image_id": 3, "category_id": 1, "bbox": [1, 1, -5, 5], "score": 0.5}, "width and height must be positive"),
    ({"image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5], "score": "high"}, "score must be a finite number"),
    ({"image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5], "score": True}, "score must be a finite number"),
    ({"image_id": [3], "category_id": 1, "bbox": [1, 1, 5, 5]}, "lacks score"),
    ({"image_id": [3], "category_id": 1, "bbox": [1, 1, 5, 5], "score": 1}, "image_id [3] is not an image"),
    ("3 1 0.5", "a detection is an object"),
]


@pytest.mark.parametrize(("entry", "problem"), BAD_ENTRIES)
def test_bad_entries_are_one_line_naming_file_and_entry(entry, problem, tmp_path, capsys):
    gt, detections = tricky_case()
    data = write_json(tmp_path / "test.json", gt)
    found = write_json(tmp_path / "results.json", [*detections[:2], entry, *detections])
    status, stderr = evaluate_main(capsys, "--data", data, "--out", tmp_path / "report", "--detections", found)
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert str(found) in lines[0] and "detection 2 " in lines[0] and problem in lines[0], lines[0]
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(("content", "problem"), [
    (None, "detections file not found"),
    ("{not json", "not a JSON file"),
    ('{"annotations": []}', "is a list of detections"),
])
def test_unreadable_files_are_one_line(content, problem, tmp_path, capsys):
    gt, _ = tricky_case()
    data = write_json(tmp_path / "test.json", gt)
    found = tmp_path / "results.json"
    if content is not None:
        found.write_text(content)
    status, stderr = evaluate_main(capsys, "--data", data, "--out", tmp_path / "report", "--detections", found)
    assert (status, stderr.count("\n")) == (2, 1), stderr
    assert str(found) in stderr and problem in stderr


def test_detections_of_another_dataset_through_the_console_script(tmp_path):
    gt, detections = tricky_case()
    data = write_json(tmp_path / "test.json", gt)
    other = write_json(tmp_path / "other_results.json", [{**d, "image_id": d["image_id"] + 1000} for d in detections])
    result = evaluate_cli("--data", data, "--out", tmp_path / "report", "--detections", other)
    assert (result.returncode, result.stderr.count("\n")) == (2, 1), result.stderr
    assert f"{other}: detection 0 " in result.stderr and "image_id 1003 is not an image" in result.stderr


def test_detections_and_a_model_are_contradictory(tmp_path):
    gt, detections = tricky_case()
    data = write_json(tmp_path / "test.json", gt)
    found = write_json(tmp_path / "results.json", detections)
    for extra in (["--weights", "demo"], ["--architecture", "retinanet_r18_fpn"]):
        result = evaluate_cli("--data", data, "--out", tmp_path / "report", "--detections", found, *extra)
        assert (result.returncode, result.stderr.count("\n")) == (2, 1), result.stderr
        assert extra[0] in result.stderr and "--detections" in result.stderr
