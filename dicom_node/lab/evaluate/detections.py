"""Read a COCO results file (detections made elsewhere) as untrusted input.

The format is COCO's results format, what Detectron2's COCOEvaluator writes
(``coco_instances_results.json``) and what ``dicom-node evaluate`` writes as
``detections.json``: a list of ``{"image_id", "category_id", "bbox": [x, y, width,
height], "score"}`` in the ground truth's pixel coordinates; other fields are
ignored. Every entry is checked against the dataset it is scored on; the first bad
one is a DatasetError naming the file, the entry's index and what is wrong, so that
detections of another dataset, or of another category numbering, are never scored
silently as misses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from dicom_node.lab.datasets import DatasetError

_SHOWN = 120  # characters of a bad entry quoted in the error


def _number(value) -> bool:
    # bool is an int in Python; true/false are not coordinates or scores.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _known(value, ids) -> bool:
    # Only ints and strings are COCO ids (a list would not even hash); true/false are not.
    return isinstance(value, (int, str)) and not isinstance(value, bool) and value in ids


def _problem(entry, images: set, categories: Mapping) -> str | None:
    """What is wrong with one entry, or None."""
    if not isinstance(entry, dict):
        return f"a detection is an object with image_id, category_id, bbox, score, not {type(entry).__name__}"
    missing = [key for key in ("image_id", "category_id", "bbox", "score") if key not in entry]
    if missing:
        return f"lacks {', '.join(missing)}"
    image_id = entry["image_id"]
    if not _known(image_id, images):
        return f"image_id {image_id!r} is not an image of the dataset"
    category = entry["category_id"]
    if not _known(category, categories):
        known = ", ".join(f"{k} {v}" for k, v in categories.items())
        return f"category_id {category!r} is not a category of the dataset ({known})"
    bbox = entry["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
        return "bbox must be [x, y, width, height], 4 finite numbers"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return "bbox width and height must be positive"
    if not _number(entry["score"]):
        return "score must be a finite number"
    return None


def read_detections(path: Path, coco: Mapping, *, dataset: Path) -> list[dict]:
    """The detections in the COCO results file `path`, checked against `coco` (read from `dataset`).

    Returns them as ``{"image_id", "category_id", "bbox", "score"}`` with float values,
    in file order (the order decides COCO's ties). Raises DatasetError for a file that
    cannot be read or the first entry that does not fit the dataset.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: detections file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read detections file ({error})") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a COCO results file is a list of detections, not a {type(data).__name__}")
    images = {image["id"] for image in coco["images"]}
    categories = {c["id"]: c.get("name", c["id"]) for c in coco.get("categories") or [{"id": 1, "name": "mass"}]}
    detections = []
    for index, entry in enumerate(data):
        problem = _problem(entry, images, categories)
        if problem:
            shown = json.dumps(entry)
            shown = shown if len(shown) <= _SHOWN else shown[:_SHOWN] + "..."
            raise DatasetError(f"{path}: detection {index} {shown}: {problem} ({dataset})")
        detections.append({"image_id": entry["image_id"], "category_id": entry["category_id"],
                           "bbox": [float(v) for v in entry["bbox"]], "score": float(entry["score"])})
    return detections
