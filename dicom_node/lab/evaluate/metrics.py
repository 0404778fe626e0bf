"""Detection metrics for mass CAD: COCO AP50, precision/recall/F1 at a threshold, FROC.

Pure numpy, no torch and no pycocotools (that is a test-only dependency: the tests
check that `ap50` equals ``COCOeval.stats[1]`` on random cases).

Inputs are COCO-shaped. Ground truth: ``{"images": [{"id": ...}], "annotations":
[{"image_id", "category_id", "bbox": [x, y, w, h], "iscrowd"?, "area"?}],
"categories": [{"id", "name"}]}``. Detections: ``[{"image_id", "category_id",
"bbox": [x, y, w, h], "score"}]`` (the COCO results format), in the same pixel
coordinates as the ground truth.

Definitions (all at IoU >= 0.5 with the COCO IoU, no +1 on widths):

- Matching, per image and category, is COCOeval's greedy matching: detections in
  descending score order (stable: input order on ties) each take the unmatched lesion
  with the highest IoU (on equal IoU the later lesion in annotation order, as COCOeval).
  Crowd boxes (``iscrowd=1``) are "ignore" regions: they are never counted as lesions,
  may absorb any number of detections (IoU against a crowd box is intersection over
  the detection's area), and a detection absorbed by one counts as neither TP nor FP.
  Lesions with an ``area`` outside COCO's "all" range are ignored the same way.
- AP50: COCO's 101-point interpolated average precision at IoU 0.5, at most 100
  detections per image (highest scores), area range "all", averaged over categories
  that have at least one lesion: ``COCOeval.stats[1]``.
- Operating point: detections with ``score >= threshold`` (no per-image cap), one-to-one
  matching. precision = TP / (TP + FP), recall = TP / lesions, F1 their harmonic mean.
  Here a second box on an already-matched lesion is a false positive (as in COCO).
- FROC: lesion-level sensitivity against mean false positives per image (over all
  images, with or without lesions), sweeping the score threshold over all detections
  (no per-image cap; tied scores enter together). A detection that hits (IoU >= 0.5)
  a lesion already found by a higher-scoring detection is NOT a false positive, as
  usual in mammography CAD: a second mark on a found mass does not mislead a reader the
  way a mark on normal tissue does. It is counted in ``duplicates`` instead.
  Sensitivity at 0.125, 0.25, 0.5, 1, 2, 4 FP/image is read from the curve by linear
  interpolation between consecutive operating points (at an FP rate that several
  thresholds reach, the highest sensitivity among them); beyond the last operating
  point the final sensitivity is carried (more marks can only find more lesions). The
  mean of the six is reported as ``mean_sensitivity`` (a CPM-like summary, as LUNA16).

Several categories are handled like COCO: everything is computed per category and
the summary scalars are the mean over the categories where they are defined.
Undefined values (no lesions, no detections) are None, never NaN, so that the result
serialises to strict JSON.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

IOU_THRESHOLD = 0.5
MAX_DETECTIONS = 100
# Exactly COCOeval.Params.recThrs (np.linspace(0, 1, 101)).
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
# COCOeval's "all" area range.
AREA_RANGE_ALL = (0.0**2, 1e5**2)


# ---------------------------------------------------------------- input parsing


@dataclass(frozen=True)
class _Truth:
    """Ground truth of one (image, category) pair, in annotation order."""

    boxes: np.ndarray  # (G, 4) x, y, w, h
    crowd: np.ndarray  # (G,) bool
    area: np.ndarray  # (G,)


@dataclass(frozen=True)
class _Parsed:
    image_ids: list  # sorted, as COCOeval.params.imgIds
    categories: dict  # id -> name, sorted by id
    truth: dict  # (image_id, category_id) -> _Truth
    detections: dict  # (image_id, category_id) -> (boxes (D, 4), scores (D,)) in input order
    ignored_detections: int  # detections whose category is not evaluated


def _box(value, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{where}: bbox must be [x, y, width, height], got {value!r}")
    try:
        box = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: bbox must be 4 numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{where}: bbox has a non-finite value: {value!r}")
    return box


def _categories(gt_coco: Mapping, detections: Sequence[Mapping]) -> dict:
    listed = gt_coco.get("categories") or []
    if listed:
        return {c["id"]: str(c.get("name", c["id"])) for c in sorted(listed, key=lambda c: c["id"])}
    # COCO files always list categories; for a bare file use what the annotations use.
    ids = {a["category_id"] for a in gt_coco.get("annotations", [])}
    ids = ids or {d["category_id"] for d in detections} or {1}
    return {i: str(i) for i in sorted(ids)}


def _parse(gt_coco: Mapping, detections: Sequence[Mapping]) -> _Parsed:
    try:
        image_ids = sorted({img["id"] for img in gt_coco["images"]})
    except (KeyError, TypeError):
        raise ValueError("ground truth must be a COCO dict with 'images' that each have an 'id'") from None
    if not image_ids:
        raise ValueError("the ground truth has no images")
    known = set(image_ids)
    categories = _categories(gt_coco, detections)

    grouped: dict = defaultdict(lambda: ([], [], []))
    for index, ann in enumerate(gt_coco.get("annotations", [])):
        where = f"annotation {ann.get('id', index)}"
        if ann.get("image_id") not in known:
            raise ValueError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in categories:
            continue  # COCOeval only loads annotations of the evaluated categories
        box = _box(ann.get("bbox"), where)
        boxes, crowd, area = grouped[ann["image_id"], ann["category_id"]]
        boxes.append(box)
        crowd.append(bool(ann.get("iscrowd", 0)))
        area.append(float(ann.get("area", box[2] * box[3])))
    truth = {
        key: _Truth(np.asarray(b, dtype=np.float64).reshape(-1, 4), np.asarray(c, dtype=bool),
                    np.asarray(a, dtype=np.float64))
        for key, (b, c, a) in grouped.items()
    }

    found: dict = defaultdict(lambda: ([], []))
    ignored = 0
    unknown_images = set()
    for index, det in enumerate(detections):
        where = f"detection {index}"
        if det.get("image_id") not in known:
            unknown_images.add(det.get("image_id"))
            continue
        box = _box(det.get("bbox"), where)
        try:
            score = float(det["score"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: needs a numeric 'score'") from None
        if not math.isfinite(score):
            raise ValueError(f"{where}: score {det['score']!r} is not finite")
        if det.get("category_id") not in categories:
            ignored += 1
            continue
        boxes, scores = found[det["image_id"], det["category_id"]]
        boxes.append(box)
        scores.append(score)
    if unknown_images:
        shown = sorted(map(str, unknown_images))[:5]
        raise ValueError(f"detections refer to image ids that are not in the ground truth: {shown}")
    dets = {
        key: (np.asarray(b, dtype=np.float64).reshape(-1, 4), np.asarray(s, dtype=np.float64))
        for key, (b, s) in found.items()
    }
    return _Parsed(image_ids, categories, truth, dets, ignored)


# ---------------------------------------------------------------- matching


def box_iou(detections: np.ndarray, truth: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU of [x, y, w, h] boxes, as pycocotools' bbox IoU.

    For a crowd box the union is the detection's own area (COCO: a detection inside a
    crowd region is fully "explained" by it). Same operation order as the C code, so the
    values are bit-identical and threshold decisions agree exactly.
    """
    d = detections[:, None, :]
    g = truth[None, :, :]
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = w * h
    det_area = d[..., 2] * d[..., 3]
    union = np.where(crowd[None, :], det_area, det_area + g[..., 2] * g[..., 3] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where((w > 0) & (h > 0), inter / union, 0.0)
    return iou


@dataclass(frozen=True)
class ImageMatch:
    """Greedy matching of one image's detections (highest score first) to its lesions."""

    scores: np.ndarray  # (D,) descending; input order on ties
    lesion: np.ndarray  # (D,) index of the matched box in annotation order, -1 if none
    ignored: np.ndarray  # (D,) matched a crowd / ignored box, or unmatched outside the area range
    duplicate: np.ndarray  # (D,) unmatched, not ignored, but hits an already-found lesion
    lesions: int  # boxes that count as lesions (not crowd, area in range)

    @property
    def true_positive(self) -> np.ndarray:
        return (self.lesion >= 0) & ~self.ignored

    @property
    def false_positive(self) -> np.ndarray:
        """COCO false positives (duplicates included)."""
        return (self.lesion < 0) & ~self.ignored


def match_image(
    truth_boxes: np.ndarray,
    truth_crowd: np.ndarray,
    detection_boxes: np.ndarray,
    detection_scores: np.ndarray,
    *,
    truth_area: np.ndarray | None = None,
    iou_threshold: float = IOU_THRESHOLD,
    area_range: tuple[float, float] = AREA_RANGE_ALL,
) -> ImageMatch:
    """COCOeval.evaluateImg's greedy matching at one IoU threshold, for all detections.

    Greedy matching is prefix-stable (a detection's match depends only on the higher
    ranked ones), so matching every detection once serves AP (first 100), the operating
    point (scores above a threshold) and the FROC sweep alike.
    """
    truth_boxes = np.asarray(truth_boxes, dtype=np.float64).reshape(-1, 4)
    truth_crowd = np.asarray(truth_crowd, dtype=bool).reshape(-1)
    if truth_area is None:
        truth_area = truth_boxes[:, 2] * truth_boxes[:, 3]
    truth_area = np.asarray(truth_area, dtype=np.float64).reshape(-1)
    order = np.argsort(-np.asarray(detection_scores, dtype=np.float64), kind="mergesort")
    boxes = np.asarray(detection_boxes, dtype=np.float64).reshape(-1, 4)[order]
    scores = np.asarray(detection_scores, dtype=np.float64)[order]
    lo, hi = area_range

    truth_ignored = truth_crowd | (truth_area < lo) | (truth_area > hi)
    # COCOeval puts ignored boxes last (stable) and stops looking at them once a
    # detection has a real lesion, so a lesion always wins over an ignore region.
    truth_order = np.argsort(truth_ignored, kind="mergesort")
    crowd = truth_crowd[truth_order]
    ign = truth_ignored[truth_order]
    iou = box_iou(boxes, truth_boxes[truth_order], crowd)
    threshold = min(iou_threshold, 1 - 1e-10)

    area = boxes[:, 2] * boxes[:, 3]
    lesion = np.full(len(scores), -1, dtype=np.int64)
    # COCOeval ignores an unmatched detection outside the area range (never for "all").
    ignored = (area < lo) | (area > hi)
    duplicate = np.zeros(len(scores), dtype=bool)
    taken = np.zeros(len(truth_order), dtype=bool)
    hits = iou >= threshold
    # Detections that hit no box stay unmatched whatever came before; only the others
    # (a few per lesion, usually) need the sequential greedy pass.
    for d in np.flatnonzero(hits.any(axis=1)):
        free = ~taken | crowd  # a crowd region can absorb any number of detections
        m = -1
        for pool in (free & ~ign, free & ign):  # lesions first, then ignore regions
            values = np.where(pool & hits[d], iou[d], -np.inf)
            if values.max() >= threshold:
                # COCOeval replaces its best on ">=", so on equal IoU the last box wins.
                m = int(np.flatnonzero(values == values.max())[-1])
                break
        if m >= 0:
            taken[m] = True
            lesion[d] = truth_order[m]
            ignored[d] = ign[m]
        else:
            # A hit on a real lesion that did not match means that lesion was already
            # taken by a higher-ranked detection: a second mark.
            duplicate[d] = not ignored[d] and bool(np.any(hits[d][~ign]))
    return ImageMatch(scores, lesion, ignored, duplicate, int(np.count_nonzero(~truth_ignored)))


# ---------------------------------------------------------------- metrics per category


def corner_points(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Mask of the points that shape the polyline (xs, ys): interior points of a straight
    horizontal or vertical run are dropped, which changes neither the drawn curve nor any
    value interpolated on it. A large test set's curves shrink from one point per
    detection to a few per lesion, so metrics.json stays small."""
    xs, ys = np.asarray(xs), np.asarray(ys)
    keep = np.ones(len(xs), dtype=bool)
    if len(xs) > 2:
        flat = (ys[:-2] == ys[1:-1]) & (ys[1:-1] == ys[2:])
        upright = (xs[:-2] == xs[1:-1]) & (xs[1:-1] == xs[2:])
        keep[1:-1] = ~(flat | upright)
    return keep


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


def average_precision(
    matches: Sequence[ImageMatch], *, max_detections: int = MAX_DETECTIONS
) -> tuple[float | None, dict]:
    """COCOeval.accumulate at one IoU threshold: 101-point interpolated AP and its curve.

    `matches` must be in ascending image id order: on tied scores across images that
    order decides the ranking, as in COCOeval. Returns (None, empty curve) without lesions.
    """
    lesions = sum(m.lesions for m in matches)
    empty = {"recall": [], "precision": [], "recall_thresholds": [], "interpolated_precision": []}
    if lesions == 0:
        return None, empty
    scores = np.concatenate([m.scores[:max_detections] for m in matches] or [np.zeros(0)])
    tp = np.concatenate([m.true_positive[:max_detections] for m in matches] or [np.zeros(0, bool)])
    fp = np.concatenate([m.false_positive[:max_detections] for m in matches] or [np.zeros(0, bool)])
    order = np.argsort(-scores, kind="mergesort")
    tp_sum = np.cumsum(tp[order]).astype(np.float64)
    fp_sum = np.cumsum(fp[order]).astype(np.float64)
    recall = tp_sum / lesions
    precision = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    # Precision envelope: the best precision at this recall or any higher one.
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    index = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    interpolated = np.zeros(len(RECALL_THRESHOLDS))
    reached = index < len(envelope)
    interpolated[reached] = envelope[index[reached]]
    corners = corner_points(recall, precision)
    curve = {
        "recall": recall[corners].tolist(),
        "precision": precision[corners].tolist(),
        "recall_thresholds": RECALL_THRESHOLDS.tolist(),
        "interpolated_precision": interpolated.tolist(),
    }
    return float(np.mean(interpolated)), curve


def operating_point(matches: Sequence[ImageMatch], *, threshold: float, images: int) -> dict:
    """Counts and precision/recall/F1 of the detections with score >= threshold."""
    tp = fp = duplicates = 0
    for m in matches:
        kept = m.scores >= threshold
        tp += int(np.count_nonzero(m.true_positive & kept))
        fp += int(np.count_nonzero(m.false_positive & kept))
        duplicates += int(np.count_nonzero(m.duplicate & kept))
    lesions = sum(m.lesions for m in matches)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, lesions)
    return {
        "threshold": threshold,
        "tp": tp,
        "fp": fp,
        "fn": lesions - tp,
        "duplicates": duplicates,
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        # FROC convention: second hits on a found lesion are not false positives.
        "fp_per_image": _ratio(fp - duplicates, images),
    }


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def froc_curve(matches: Sequence[ImageMatch], *, images: int) -> dict:
    """FROC operating points from the strictest score threshold down (see corner_points).

    The first point is (0, 0) with threshold None (no detection kept); each further
    point is the operating point of keeping the detections with score >= its threshold.
    """
    lesions = sum(m.lesions for m in matches)
    scores = np.concatenate([m.scores for m in matches] or [np.zeros(0)])
    tp = np.concatenate([m.true_positive for m in matches] or [np.zeros(0, bool)])
    fp = np.concatenate([m.false_positive & ~m.duplicate for m in matches] or [np.zeros(0, bool)])
    order = np.argsort(-scores, kind="stable")
    scores, tp, fp = scores[order], tp[order], fp[order]
    # Tied scores are one threshold: keep the last index of each run of equal scores.
    last = np.flatnonzero(np.append(scores[1:] != scores[:-1], True)) if len(scores) else []
    tp_sum = np.cumsum(tp)[last] if len(scores) else np.zeros(0)
    fp_sum = np.cumsum(fp)[last] if len(scores) else np.zeros(0)
    thresholds = [None, *scores[last].tolist()]
    fps = np.concatenate([[0.0], fp_sum / images])
    sens = np.concatenate([[0.0], tp_sum / lesions]) if lesions else np.zeros(len(fps))
    corners = corner_points(fps, sens)
    return {
        "thresholds": [t for t, k in zip(thresholds, corners) if k],
        "fp_per_image": fps[corners].tolist(),
        "sensitivity": sens[corners].tolist() if lesions else [],
        "lesions": lesions,
        "images": images,
    }


def sensitivity_at(fp_per_image: Sequence[float], sensitivity: Sequence[float], rate: float) -> float:
    """Sensitivity at `rate` FP/image on a FROC curve given as points in sweep order.

    Linear interpolation on the segment that crosses `rate`; at a rate that points
    reach exactly, the highest sensitivity there; past the last point, the last value.
    """
    fps = np.asarray(fp_per_image, dtype=np.float64)
    sens = np.asarray(sensitivity, dtype=np.float64)
    j = int(np.searchsorted(fps, rate, side="right")) - 1  # last point with fps <= rate
    if j < 0:
        return 0.0
    if fps[j] == rate or j == len(fps) - 1:
        return float(sens[j])
    x0, x1, y0, y1 = fps[j], fps[j + 1], sens[j], sens[j + 1]
    return float(y0 + (y1 - y0) * (rate - x0) / (x1 - x0))


def froc_summary(curve: Mapping, *, fp_rates: Sequence[float] = FROC_FP_RATES) -> dict:
    """Sensitivity at each FP rate and their mean (None without lesions)."""
    if not curve["lesions"]:
        return {"fp_rates": list(fp_rates), "sensitivities": [None] * len(fp_rates), "mean_sensitivity": None}
    values = [sensitivity_at(curve["fp_per_image"], curve["sensitivity"], r) for r in fp_rates]
    return {"fp_rates": list(fp_rates), "sensitivities": values, "mean_sensitivity": float(np.mean(values))}


# ---------------------------------------------------------------- whole data set


def _mean(values: Iterable[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def evaluate(
    gt_coco: Mapping,
    detections: Sequence[Mapping],
    *,
    threshold: float,
    iou_threshold: float = IOU_THRESHOLD,
    max_detections: int = MAX_DETECTIONS,
    fp_rates: Sequence[float] = FROC_FP_RATES,
) -> dict:
    """All metrics of `detections` against `gt_coco` (see the module docstring).

    Returns a JSON-ready dict: ``summary`` (scalars, averaged over categories as COCO
    does) and ``categories`` (name -> scalars and ``curves``: ``pr`` and ``froc``).
    Raises ValueError naming the offending entry for malformed input.
    """
    parsed = _parse(gt_coco, detections)
    images = len(parsed.image_ids)
    empty_truth = _Truth(np.zeros((0, 4)), np.zeros(0, bool), np.zeros(0))
    empty_dets = (np.zeros((0, 4)), np.zeros(0))
    per_category = {}
    for category_id, name in parsed.categories.items():
        matches = []
        for image_id in parsed.image_ids:  # ascending ids: COCOeval's tie order
            truth = parsed.truth.get((image_id, category_id), empty_truth)
            boxes, scores = parsed.detections.get((image_id, category_id), empty_dets)
            matches.append(match_image(truth.boxes, truth.crowd, boxes, scores, truth_area=truth.area,
                                       iou_threshold=iou_threshold))
        ap, pr = average_precision(matches, max_detections=max_detections)
        froc = froc_curve(matches, images=images)
        per_category[name] = {
            "category_id": category_id,
            "lesions": sum(m.lesions for m in matches),
            "detections": sum(len(m.scores) for m in matches),
            "ap50": ap,
            **operating_point(matches, threshold=threshold, images=images),
            "froc": froc_summary(froc, fp_rates=fp_rates),
            "curves": {"pr": pr, "froc": froc},
        }
    cats = list(per_category.values())
    summary = {
        "images": images,
        "lesions": sum(c["lesions"] for c in cats),
        "detections": sum(c["detections"] for c in cats),
        "ignored_detections": parsed.ignored_detections,
        "iou_threshold": iou_threshold,
        "threshold": threshold,
        "ap50": _mean(c["ap50"] for c in cats),
        **{k: sum(c[k] for c in cats) for k in ("tp", "fp", "fn", "duplicates")},
        **{k: _mean(c[k] for c in cats) for k in ("precision", "recall", "f1", "fp_per_image")},
        "froc": {
            "fp_rates": list(fp_rates),
            "sensitivities": [_mean(c["froc"]["sensitivities"][i] for c in cats) for i in range(len(fp_rates))],
            "mean_sensitivity": _mean(c["froc"]["mean_sensitivity"] for c in cats),
        },
    }
    return {"summary": summary, "categories": per_category}


# ---------------------------------------------------------------- breakdowns


MISSING = "(none)"


def group_image_ids(gt_coco: Mapping, field: str) -> dict[str, list]:
    """Image ids per value of the image field `field` (as a string; MISSING, last, if absent).

    Raises ValueError when no image carries the field.
    """
    groups: dict[str, list] = defaultdict(list)
    for image in gt_coco["images"]:
        value = image.get(field)
        groups[MISSING if value is None or value == "" else str(value)].append(image["id"])
    if set(groups) == {MISSING}:
        raise ValueError(f"no image in the dataset has the field {field!r} to break metrics down by")
    return dict(sorted(groups.items(), key=lambda item: (item[0] == MISSING, item[0])))


def subset(gt_coco: Mapping, detections: Sequence[Mapping], image_ids: Iterable) -> tuple[dict, list]:
    """The ground truth and detections restricted to `image_ids` (categories kept)."""
    keep = set(image_ids)
    categories = _categories(gt_coco, detections)  # of the whole set, not just the subset
    coco = {
        **gt_coco,
        "categories": [{"id": i, "name": name} for i, name in categories.items()],
        "images": [img for img in gt_coco["images"] if img["id"] in keep],
        "annotations": [a for a in gt_coco.get("annotations", []) if a["image_id"] in keep],
    }
    return coco, [d for d in detections if d.get("image_id") in keep]
