"""AP50 equals pycocotools' COCOeval stats[1] on many seeded random cases."""

from __future__ import annotations

import contextlib
import copy
import io
from collections import Counter

import pytest
from tests.lab.evaluate.evaluate_cases import random_case, without_optional_fields

from dicom_node.lab.evaluate.metrics import evaluate

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

SEEDS = range(200)
CHUNK = 40


def coco_ap50(gt: dict, detections: list[dict]) -> float:
    """stats[1] from pycocotools (its prints silenced); -1 when no category has a lesion."""
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = copy.deepcopy(gt)
        truth.createIndex()
        results = truth.loadRes(copy.deepcopy(detections))
        coco_eval = COCOeval(truth, results, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return float(coco_eval.stats[1])


@pytest.mark.parametrize("first", range(SEEDS.start, SEEDS.stop, CHUNK))
def test_ap50_matches_pycocotools(first):
    mismatches = []
    for seed in range(first, first + CHUNK):
        gt, detections = random_case(seed)
        # Ours also gets the file without iscrowd / area where they equal their defaults.
        ours = evaluate(without_optional_fields(gt, seed), detections, threshold=0.5)["summary"]["ap50"]
        lesions = sum(not a["iscrowd"] for a in gt["annotations"])
        if not detections:  # pycocotools cannot load an empty result list
            expected = 0.0 if lesions else None
        else:
            reference = coco_ap50(gt, detections)
            expected = None if reference == -1 else reference
        if (ours is None) != (expected is None) or (ours is not None and abs(ours - expected) > 1e-4):
            mismatches.append((seed, ours, expected))
    assert mismatches == []


def test_random_cases_cover_the_hard_parts():
    """The parity test is only as good as its cases: check they contain what breaks AP code."""
    seen = Counter()
    for seed in SEEDS:
        gt, detections = random_case(seed)
        with_truth = {a["image_id"] for a in gt["annotations"]}
        with_dets = {d["image_id"] for d in detections}
        images = {img["id"] for img in gt["images"]}
        per_image = Counter(d["image_id"] for d in detections)
        scores = Counter((d["image_id"], d["score"]) for d in detections)
        seen["image without lesions"] += bool(images - with_truth)
        seen["image without detections"] += bool(images - with_dets)
        seen["crowd box"] += any(a["iscrowd"] for a in gt["annotations"])
        seen["tie within an image"] += any(n > 1 for n in scores.values())
        seen["tie across images"] += len({s for _, s in scores}) < len(scores)
        seen["more than 100 detections on an image"] += any(n > 100 for n in per_image.values())
        seen["several categories"] += len(gt["categories"]) > 1
        seen["detection of an unevaluated category"] += any(d["category_id"] == 99 for d in detections)
        seen["equal IoU with two lesions"] += any(d["score"] == 0.97 for d in detections)
        seen["no lesion at all"] += not any(not a["iscrowd"] for a in gt["annotations"])
    assert all(seen[key] >= 3 for key in seen), seen
