"""Seeded random COCO ground truth + detections for the evaluation tests.

Each case mixes what breaks naive AP code: lesions missed, several boxes on one lesion,
false positives, images without lesions, images without detections, tied scores (within
and across images), crowd regions, integer boxes (exactly equal IoUs), non-contiguous
ids, annotations not in image order, and sometimes more than 100 detections on an image.
"""

from __future__ import annotations

import numpy as np


def random_case(seed: int) -> tuple[dict, list[dict]]:
    """A complete COCO ground truth (iscrowd and area always present) and detections."""
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(1, 12))
    image_ids = [int(i) for i in rng.choice(np.arange(1, 1000), size=n_images, replace=False)]
    if rng.random() < 0.7:
        categories = [{"id": 1, "name": "mass"}]
    else:
        ids = sorted(int(i) for i in rng.choice(np.arange(1, 20), size=int(rng.integers(2, 4)), replace=False))
        categories = [{"id": i, "name": f"class{i}"} for i in ids]
    cat_ids = [c["id"] for c in categories]
    integer = rng.random() < 0.4
    tie_scores = rng.random() < 0.4
    crowd_rate = 0.15 if rng.random() < 0.5 else 0.0
    crowded_image = image_ids[0] if rng.random() < 0.1 else None  # > 100 detections

    def box(center=None, size=None):
        if center is None:
            w, h = rng.uniform(8, 150, 2)
            x, y = rng.uniform(0, 500, 2)
        else:
            w, h = np.asarray(size) * rng.uniform(0.7, 1.3, 2)
            x = center[0] - w / 2 + rng.normal(0, 0.15 * size[0])
            y = center[1] - h / 2 + rng.normal(0, 0.15 * size[1])
        values = [x, y, w, h]
        if integer:
            values = [float(round(v)) for v in values]
            values[2], values[3] = max(values[2], 1.0), max(values[3], 1.0)
        return [float(v) for v in values]

    def score():
        return float(rng.integers(1, 6) / 5) if tie_scores else float(rng.random())

    annotations, detections = [], []
    for image_id in image_ids:
        for _ in range(int(rng.choice([0, 0, 1, 1, 2, 3, 5]))):
            bbox = box()
            crowd = int(rng.random() < crowd_rate)
            annotations.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids)), "bbox": bbox,
                                "iscrowd": crowd, "area": bbox[2] * bbox[3]})
            if rng.random() < 0.75:  # found, sometimes more than once, sometimes as another class
                center = (bbox[0] + bbox[2] / 2, bbox[1] + bbox[3] / 2)
                for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
                    category = annotations[-1]["category_id"] if rng.random() < 0.85 else int(rng.choice(cat_ids))
                    detections.append({"image_id": image_id, "category_id": category,
                                       "bbox": box(center, bbox[2:]), "score": score()})
        if rng.random() < 0.3:
            continue  # no false positives on this image
        n_fp = 130 if image_id == crowded_image else int(rng.integers(0, 4))
        for _ in range(n_fp):
            detections.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids)),
                               "bbox": box(), "score": score()})
    if rng.random() < 0.15:
        twin_lesions(rng, int(rng.choice(image_ids)), cat_ids[0], annotations, detections)
    if detections and rng.random() < 0.1:  # a class the ground truth does not evaluate
        detections.append({**detections[0], "category_id": 99})
    order = rng.permutation(len(annotations))
    annotations = [annotations[i] for i in order]
    for index, ann in enumerate(annotations):
        ann["id"] = index + 1
    detections = [detections[i] for i in rng.permutation(len(detections))]
    images = [{"id": i, "file_name": f"{i}.dcm"} for i in image_ids]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def without_optional_fields(coco: dict, seed: int) -> dict:
    """The same ground truth with iscrowd=0 and area=w*h sometimes left out (their defaults)."""
    rng = np.random.default_rng(seed + 10_000)
    annotations = []
    for ann in coco["annotations"]:
        ann = dict(ann)
        if ann["iscrowd"] == 0 and rng.random() < 0.5:
            del ann["iscrowd"]
        if ann["area"] == ann["bbox"][2] * ann["bbox"][3] and rng.random() < 0.5:
            del ann["area"]
        annotations.append(ann)
    return {**coco, "annotations": annotations}


def twin_lesions(rng, image_id: int, category_id: int, annotations: list, detections: list) -> None:
    """Two overlapping lesions and a box exactly between them (equal IoU with both).

    COCOeval gives the middle box to the later lesion on equal IoU; a second, lower-scored
    box then hits only that later lesion (IoU 0.67; 0.38 with the earlier one), so the
    tie rule decides whether it is a TP or an FP.
    """
    x, y = (float(v) for v in rng.integers(0, 400, 2))
    w, h = float(8 * rng.integers(4, 15)), float(rng.integers(20, 120))
    shift = w / 4
    for dx in (0.0, shift):
        annotations.append({"image_id": image_id, "category_id": category_id, "bbox": [x + dx, y, w, h],
                            "iscrowd": 0, "area": w * h})
    for dx, score in ((shift / 2, 0.97), (1.8 * shift, 0.93)):
        detections.append({"image_id": image_id, "category_id": category_id, "bbox": [x + dx, y, w, h],
                           "score": score})
