"""Hand-derived cases for matching, precision/recall/F1, AP50 and FROC.

Every expected value is worked out in the comments from the boxes and scores of the
case (IoU = intersection / union of [x, y, w, h] boxes), not taken from the code.
"""

from __future__ import annotations

import json

import pytest

from dicom_node.lab.evaluate.metrics import evaluate, sensitivity_at


def coco(n_images: int, lesions=(), crowd=(), categories=((1, "mass"),)) -> dict:
    """Images 1..n; `lesions` / `crowd`: (image_id, bbox) or (image_id, bbox, category_id)."""
    annotations = []
    for entries, is_crowd in ((lesions, 0), (crowd, 1)):
        for image_id, bbox, *category in entries:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": list(bbox),
                                "category_id": category[0] if category else 1, "iscrowd": is_crowd,
                                "area": bbox[2] * bbox[3]})
    return {"images": [{"id": i} for i in range(1, n_images + 1)], "annotations": annotations,
            "categories": [{"id": i, "name": name} for i, name in categories]}


def det(image_id: int, bbox, score: float, category_id: int = 1) -> dict:
    return {"image_id": image_id, "bbox": list(bbox), "score": score, "category_id": category_id}


def mass(result: dict) -> dict:
    return result["categories"]["mass"]


# ------------------------------------------------------------------ operating point


def test_operating_point_counts_second_marks_as_false_positives():
    gt = coco(3, lesions=[(1, (0, 0, 100, 100)), (1, (300, 300, 50, 50)), (3, (50, 50, 80, 80))])
    detections = [
        det(1, (5, 5, 100, 100), 0.9),  # lesion A: IoU 95*95 / (2*100*100 - 95*95) = 0.82
        det(1, (0, 0, 100, 90), 0.8),  # A again (IoU 0.9), A is taken: a second mark
        det(1, (600, 600, 40, 40), 0.7),  # nothing there
        det(1, (300, 300, 50, 50), 0.3),  # lesion B, but below a 0.5 threshold
        det(2, (10, 10, 30, 30), 0.6),  # image 2 has no lesion
    ]  # image 3's lesion C is never marked
    s = evaluate(gt, detections, threshold=0.5)["summary"]
    tp, fp, lesions, images = 1, 3, 3, 3  # A; second mark on A + two marks on normal tissue
    assert (s["tp"], s["fp"], s["fn"], s["duplicates"]) == (tp, fp, lesions - tp, 1)
    precision, recall = tp / (tp + fp), tp / lesions
    assert s["precision"] == pytest.approx(precision)
    assert s["recall"] == pytest.approx(recall)
    assert s["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    # FROC convention: the second mark on A is not a false positive.
    assert s["fp_per_image"] == pytest.approx((fp - 1) / images)

    # The threshold is inclusive: at 0.3 lesion B's box counts.
    s = evaluate(gt, detections, threshold=0.3)["summary"]
    assert (s["tp"], s["fp"]) == (2, 3)
    assert s["recall"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(("height", "matched"), [(5.0, True), (4.9, False)])
def test_iou_of_exactly_one_half_is_a_hit(height, matched):
    # Box 10x10 against 10 x height at the same corner: IoU = 10*height / 100.
    s = evaluate(coco(1, lesions=[(1, (0, 0, 10, 10))]), [det(1, (0, 0, 10, height), 0.9)], threshold=0.5)
    assert (s["summary"]["tp"], s["summary"]["fp"]) == ((1, 0) if matched else (0, 1))


def test_matching_is_greedy_by_score_not_an_optimal_assignment():
    # All boxes 100 high at y=0, so IoU = overlap in x / union in x.
    # Lesions L1 = x 0..100, L2 = x 50..150.
    # d1 (0.9) = x 30..130: IoU L1 = 70/130 = 0.54, IoU L2 = 80/120 = 0.67 -> takes L2.
    # d2 (0.8) = x 55..155: IoU L2 = 95/105 = 0.90 (taken), IoU L1 = 45/155 = 0.29 -> no lesion.
    # (Giving d1 to L1 and d2 to L2 would score 2 TP; greedy COCO matching gives 1.)
    gt = coco(1, lesions=[(1, (0, 0, 100, 100)), (1, (50, 0, 100, 100))])
    result = evaluate(gt, [det(1, (30, 0, 100, 100), 0.9), det(1, (55, 0, 100, 100), 0.8)], threshold=0.5)
    s = result["summary"]
    assert (s["tp"], s["fp"], s["fn"], s["duplicates"]) == (1, 1, 1, 1)


def test_crowd_regions_absorb_detections_and_are_not_lesions():
    gt = coco(1, lesions=[(1, (0, 0, 50, 50))], crowd=[(1, (200, 200, 300, 300))])
    detections = [
        det(1, (250, 250, 50, 50), 0.9),  # inside the crowd box: intersection / own area = 1
        det(1, (300, 300, 40, 40), 0.8),  # a crowd box takes any number of detections
        det(1, (0, 0, 50, 50), 0.7),  # the one lesion
    ]
    result = evaluate(gt, detections, threshold=0.5)
    s = result["summary"]
    assert (s["lesions"], s["tp"], s["fp"]) == (1, 1, 0)
    assert s["precision"] == 1.0 and s["recall"] == 1.0
    # Ignored detections are not ranked as false positives either: the lesion's
    # detection has precision 1 at recall 1.
    assert s["ap50"] == pytest.approx(1.0)
    assert s["froc"]["sensitivities"] == [1.0] * 6


# ------------------------------------------------------------------ AP50


def test_ap50_perfect_detections():
    gt = coco(2, lesions=[(1, (0, 0, 40, 40)), (2, (10, 10, 40, 40))])
    result = evaluate(gt, [det(1, (0, 0, 40, 40), 0.6), det(2, (10, 10, 40, 40), 0.7)], threshold=0.5)
    assert result["summary"]["ap50"] == pytest.approx(1.0)


def test_ap50_with_a_higher_scored_false_positive():
    # Ranks: FP (precision 0, recall 0), TP (precision 1/2, recall 1). Interpolated
    # precision is 1/2 at every recall level 0, 0.01, ..., 1: AP = 0.5.
    gt = coco(1, lesions=[(1, (0, 0, 40, 40))])
    result = evaluate(gt, [det(1, (100, 100, 40, 40), 0.9), det(1, (0, 0, 40, 40), 0.8)], threshold=0.5)
    assert result["summary"]["ap50"] == pytest.approx(0.5)


def test_ap50_is_the_101_point_interpolation():
    # 3 lesions; ranks TP, FP, TP: recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3.
    # Interpolated precision (best at this recall or higher): 1 for recall levels
    # 0.00..0.33 (34 levels), 2/3 for 0.34..0.66 (33 levels), 0 for 0.67..1.00.
    gt = coco(3, lesions=[(1, (0, 0, 40, 40)), (2, (0, 0, 40, 40)), (3, (0, 0, 40, 40))])
    detections = [det(1, (0, 0, 40, 40), 0.9), det(2, (200, 200, 40, 40), 0.8), det(2, (0, 0, 40, 40), 0.7)]
    result = evaluate(gt, detections, threshold=0.5)
    assert result["summary"]["ap50"] == pytest.approx((34 * 1 + 33 * 2 / 3) / 101)
    curve = mass(result)["curves"]["pr"]
    assert curve["recall"] == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    assert curve["precision"] == pytest.approx([1, 1 / 2, 2 / 3])


def test_ap50_keeps_100_detections_per_image_but_the_threshold_keeps_all():
    # 100 higher-scored false positives push the lesion's box to rank 101 on its image:
    # COCO AP (maxDets 100) never sees it, the operating point at 0.5 does.
    gt = coco(1, lesions=[(1, (0, 0, 40, 40))])
    noise = [det(1, (1000 + 50 * i, 1000, 40, 40), 0.9) for i in range(100)]
    s = evaluate(gt, [*noise, det(1, (0, 0, 40, 40), 0.5)], threshold=0.5)["summary"]
    assert s["ap50"] == 0.0
    assert (s["tp"], s["fp"], s["recall"]) == (1, 100, 1.0)


def test_categories_are_averaged_like_coco():
    categories = ((1, "mass"), (2, "calcification"), (5, "other"))
    gt = coco(1, lesions=[(1, (0, 0, 40, 40), 1), (1, (100, 0, 40, 40), 2)], categories=categories)
    detections = [
        det(1, (0, 0, 40, 40), 0.9, 1),  # category 1: perfect, AP 1
        det(1, (300, 300, 40, 40), 0.9, 2), det(1, (100, 0, 40, 40), 0.8, 2),  # category 2: AP 0.5
        det(1, (500, 500, 40, 40), 0.9, 5),  # category 5: no lesion, AP undefined
        det(1, (0, 0, 40, 40), 0.9, 77),  # not an evaluated category: ignored
    ]
    result = evaluate(gt, detections, threshold=0.5)
    s = result["summary"]
    assert s["ap50"] == pytest.approx((1.0 + 0.5) / 2)
    assert result["categories"]["other"]["ap50"] is None
    assert s["ignored_detections"] == 1
    # Precision per category: 1/1, 1/2, 0/1; recall 1, 1 and undefined.
    assert s["precision"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert s["recall"] == pytest.approx(1.0)


# ------------------------------------------------------------------ FROC


def test_froc_hand_computed():
    # 5 images, 4 lesions (one per image 1-4, never found on image 4), image 5 empty.
    lesion = (0, 0, 40, 40)
    gt = coco(5, lesions=[(1, lesion), (2, lesion), (3, lesion), (4, lesion)])
    elsewhere = [(200 + 60 * i, 200, 40, 40) for i in range(3)]
    detections = [
        det(1, lesion, 0.9),  # TP (lesion 1)
        det(2, lesion, 0.8), det(3, elsewhere[0], 0.8),  # one threshold: TP (lesion 2) and FP
        det(1, (2, 2, 40, 40), 0.7),  # second mark on lesion 1: not an FP
        det(4, elsewhere[0], 0.6),  # FP
        det(3, lesion, 0.5),  # TP (lesion 3)
        det(5, elsewhere[0], 0.4), det(2, elsewhere[0], 0.4),  # 2 FP
        *(det(1, box, 0.2) for box in elsewhere),  # 3 FP
    ]
    # Operating points (FP / 5 images, TP / 4 lesions), strictest threshold first:
    #   none (0, 0); 0.9 (0, 1/4); 0.8 (1/5, 2/4); 0.7 (1/5, 2/4); 0.6 (2/5, 2/4);
    #   0.5 (2/5, 3/4); 0.4 (4/5, 3/4); 0.2 (7/5, 3/4).
    # The stored curve leaves out the points inside flat runs (0.7 and 0.4).
    points = [(0, 0), (0, 1 / 4), (1 / 5, 2 / 4), (2 / 5, 2 / 4), (2 / 5, 3 / 4), (7 / 5, 3 / 4)]
    result = evaluate(gt, detections, threshold=0.5)
    curve = mass(result)["curves"]["froc"]
    assert curve["thresholds"] == [None, 0.9, 0.8, 0.6, 0.5, 0.2]
    assert curve["fp_per_image"] == pytest.approx([x for x, _ in points])
    assert curve["sensitivity"] == pytest.approx([y for _, y in points])
    expected = [
        1 / 4 + (2 / 4 - 1 / 4) * (0.125 - 0) / (1 / 5 - 0),  # on the segment (0, 1/4)-(1/5, 2/4)
        2 / 4,  # on the flat segment (1/5, 2/4)-(2/5, 2/4)
        3 / 4,  # on the flat segment (2/5, 3/4)-(7/5, 3/4)
        3 / 4,
        3 / 4,  # past the last point (7/5): carried
        3 / 4,
    ]
    froc = result["summary"]["froc"]
    assert froc["fp_rates"] == [0.125, 0.25, 0.5, 1.0, 2.0, 4.0]
    assert froc["sensitivities"] == pytest.approx(expected)
    assert froc["mean_sensitivity"] == pytest.approx(sum(expected) / 6)
    # At an FP rate reached by two thresholds (2/5: sensitivity 2/4, then 3/4) the curve
    # is vertical; the better operating point counts.
    at = evaluate(gt, detections, threshold=0.5, fp_rates=(0.4,))["summary"]["froc"]["sensitivities"]
    assert at == pytest.approx([3 / 4])
    # Threshold 0.7: TP 2; the FP at 0.8 and the second mark count against precision,
    # only the FP counts per image.
    s = evaluate(gt, detections, threshold=0.7)["summary"]
    assert (s["tp"], s["fp"], s["duplicates"]) == (2, 2, 1)
    assert s["fp_per_image"] == pytest.approx(1 / 5)


def test_stored_curves_keep_only_corners():
    # 1 lesion, 50 marks on normal tissue scored above it, 1 image: the FROC points run
    # flat at sensitivity 0 from 1 to 50 FP/image and then rise to 1 at 50 FP/image.
    gt = coco(1, lesions=[(1, (0, 0, 10, 10))])
    noise = [det(1, (100 + 20 * i, 100, 10, 10), 0.9 - 0.01 * i) for i in range(50)]
    curves = mass(evaluate(gt, [*noise, det(1, (0, 0, 10, 10), 0.1)], threshold=0.5))["curves"]
    assert curves["froc"]["fp_per_image"] == [0, 50, 50]
    assert curves["froc"]["sensitivity"] == [0, 0, 1]
    assert curves["froc"]["thresholds"] == [None, pytest.approx(0.41), 0.1]
    # PR: recall stays 0 for 50 ranks (one vertical run), then precision 1/51 at recall 1.
    assert curves["pr"]["recall"] == [0, 0, 1]
    assert curves["pr"]["precision"] == pytest.approx([0, 0, 1 / 51])


def test_sensitivity_at_reads_the_curve():
    fps, sens = [0.0, 0.0, 1.0, 1.0, 3.0], [0.0, 0.2, 0.4, 0.6, 1.0]
    assert sensitivity_at(fps, sens, 0.0) == pytest.approx(0.2)  # best point at 0 FP
    assert sensitivity_at(fps, sens, 0.5) == pytest.approx(0.3)  # halfway from 0.2 to 0.4
    assert sensitivity_at(fps, sens, 1.0) == pytest.approx(0.6)
    assert sensitivity_at(fps, sens, 2.0) == pytest.approx(0.8)
    assert sensitivity_at(fps, sens, 10.0) == pytest.approx(1.0)


# ------------------------------------------------------------------ edge cases


def test_no_lesions_gives_undefined_sensitivity_and_strict_json():
    result = evaluate(coco(2), [det(1, (0, 0, 10, 10), 0.9)], threshold=0.5)
    s = result["summary"]
    assert s["ap50"] is None and s["recall"] is None and s["f1"] is None
    assert s["precision"] == 0.0
    assert s["fp_per_image"] == pytest.approx(1 / 2)
    assert s["froc"]["sensitivities"] == [None] * 6
    json.dumps(result, allow_nan=False)


def test_no_detections():
    s = evaluate(coco(1, lesions=[(1, (0, 0, 10, 10))]), [], threshold=0.5)["summary"]
    assert s["ap50"] == 0.0
    assert s["precision"] is None and s["recall"] == 0.0 and s["f1"] is None
    assert s["froc"]["sensitivities"] == [0.0] * 6


@pytest.mark.parametrize(
    ("gt", "detections", "message"),
    [
        (coco(1), [det(7, (0, 0, 1, 1), 0.5)], "not in the ground truth"),
        (coco(1), [det(1, (0, 0, 1), 0.5)], "bbox"),
        (coco(1), [{"image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 1}], "score"),
        (coco(1, lesions=[(3, (0, 0, 5, 5))]), [], "image_id 3"),
        ({"images": []}, [], "no images"),
    ],
)
def test_malformed_input_is_named(gt, detections, message):
    with pytest.raises(ValueError, match=message):
        evaluate(gt, detections, threshold=0.5)
