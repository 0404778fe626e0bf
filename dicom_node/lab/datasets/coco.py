"""COCO detection sets of mammograms: validation, the training dataset, and splits.

The format is COCO's: ``images`` (``id``, ``file_name`` relative to the JSON file's
folder, ``width``, ``height``, plus free fields such as ``view``, ``laterality``,
``density``, ``patient_id``, ``study_uid`` and an optional 0-based ``frame`` of a
multi-frame image), ``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox``
``[x, y, w, h]`` in pixel-edge coordinates of the original image, ``area``,
``iscrowd``) and ``categories``.

Images are DICOM files (read through the node's one pixel pipeline,
:func:`dicom_node.pixels.display_pixels`, so training sees what the node sees) or
PNG/JPEG/TIFF files of 8 or 16 bits, scaled to [0, 1] by their type's full range.

Splits are deterministic for a seed and keep all images of a group (by default the
patient, else the image itself) in one part, so no patient is both trained and tested on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dicom_node.files import SHARED, write_atomically
from dicom_node.lab.datasets import DatasetError
from dicom_node.pixels import PreparedImage, display_pixels, resize_longest_side

# The study's train/val/test image counts, used as proportions.
STUDY_SPLIT = {"train": 2378, "val": 400, "test": 400}
_MAX_LISTED_PROBLEMS = 20
_CACHE_VERSION = "1"
_BOX_TOLERANCE = 0.5  # pixels a box may stick out of its image (rounding in converters)


# ---------------------------------------------------------------- loading and validation


def read_coco_json(path: str | Path) -> dict:
    """Parse the COCO JSON file at ``path``; raises DatasetError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not a readable COCO JSON file ({error})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a COCO file is a JSON object, not {type(data).__name__}")
    return data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_images(images, root: Path | None) -> tuple[list[str], dict]:
    problems: list[str] = []
    by_id: dict = {}
    for position, image in enumerate(images):
        if not isinstance(image, dict):
            problems.append(f"images[{position}]: not an object")
            continue
        image_id = image.get("id")
        where = f"image {image_id!r}" if image_id is not None else f"images[{position}]"
        if image_id is None or isinstance(image_id, (dict, list)):
            problems.append(f"{where}: missing or invalid 'id'")
            continue
        if image_id in by_id:
            problems.append(f"{where}: duplicate image id")
            continue
        by_id[image_id] = image
        name = image.get("file_name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: missing 'file_name'")
        elif root is not None and not (root / name).is_file():
            problems.append(f"{where}: image file not found: {root / name}")
        for key in ("width", "height"):
            value = image.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{where}: '{key}' must be a positive integer, not {value!r}")
    return problems, by_id


def _check_annotations(annotations, images: dict, category_ids: set) -> list[str]:
    problems: list[str] = []
    seen: set = set()
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            problems.append(f"annotations[{position}]: not an object")
            continue
        annotation_id = annotation.get("id")
        where = f"annotation {annotation_id!r}" if annotation_id is not None else f"annotations[{position}]"
        if annotation_id is not None:
            if annotation_id in seen:
                problems.append(f"{where}: duplicate annotation id")
            seen.add(annotation_id)
        image = images.get(annotation.get("image_id"))
        if image is None:
            problems.append(f"{where}: unknown image_id {annotation.get('image_id')!r}")
        if annotation.get("category_id") not in category_ids:
            problems.append(f"{where}: unknown category_id {annotation.get('category_id')!r}")
        bbox = annotation.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            problems.append(f"{where}: 'bbox' must be four numbers [x, y, w, h], not {bbox!r}")
            continue
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            problems.append(f"{where}: bbox {bbox} has no area (w and h must be positive)")
        elif image is not None and _is_number(image.get("width")) and _is_number(image.get("height")):
            width, height = image["width"], image["height"]
            if (x < -_BOX_TOLERANCE or y < -_BOX_TOLERANCE or x + w > width + _BOX_TOLERANCE
                    or y + h > height + _BOX_TOLERANCE):
                problems.append(
                    f"{where}: bbox {bbox} is outside its image {image.get('file_name')!r} "
                    f"({width} x {height})"
                )
    return problems


def validate_coco(data: Mapping, *, root: str | Path | None = None) -> list[str]:
    """Every problem in the COCO mapping ``data``, one message each (empty when valid).

    With ``root`` (the folder image paths are relative to), image files must exist.
    Checks: the three lists are present, ids are unique, images have a file name and a
    positive width and height, annotations name a known image and category, and their
    bbox has positive size and lies inside the image.
    """
    if not isinstance(data, Mapping):
        return [f"a COCO dataset is a JSON object, not {type(data).__name__}"]
    problems = []
    lists = {}
    for key in ("images", "annotations", "categories"):
        value = data.get(key, [] if key == "annotations" else None)
        if not isinstance(value, list):
            problems.append(f"'{key}' must be a list" + ("" if key in data else " (missing)"))
            value = []
        lists[key] = value
    category_ids = set()
    for position, category in enumerate(lists["categories"]):
        if not isinstance(category, dict) or "id" not in category:
            problems.append(f"categories[{position}]: missing 'id'")
        else:
            category_ids.add(category["id"])
    image_problems, images = _check_images(lists["images"], Path(root) if root is not None else None)
    problems += image_problems
    problems += _check_annotations(lists["annotations"], images, category_ids)
    return problems


def load_coco(path: str | Path, *, check_files: bool = True) -> dict:
    """Read and validate the COCO file at ``path``; image paths are relative to its folder.

    Raises DatasetError listing the problems (missing file, bbox outside its image,
    unknown category...) when the file is not a valid detection set.
    """
    path = Path(path)
    data = read_coco_json(path)
    problems = validate_coco(data, root=path.parent if check_files else None)
    if problems:
        listed = problems[:_MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        message = "\n  ".join([f"{path}: {len(problems)} problem(s) in the COCO dataset:", *listed])
        if more:
            message += f"\n  ... and {more} more"
        raise DatasetError(message)
    data.setdefault("annotations", [])
    return data


def save_coco(data: Mapping, path: str | Path) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (temporary file, then rename)."""
    return write_atomically(path, json.dumps(data, indent=1), fsync=False, mode=SHARED)


# ---------------------------------------------------------------- images


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        return False
    with path.open("rb") as handle:  # PS3.10 7.1: "DICM" after the 128-byte preamble
        handle.seek(128)
        return handle.read(4) == b"DICM"


def read_image(path: str | Path, *, frame: int | None = None) -> np.ndarray:
    """The image at ``path`` as float32 HxW in [0, 1] at its original size, dense tissue bright.

    DICOM goes through :func:`dicom_node.pixels.display_pixels`; PNG/JPEG/TIFF files are
    converted to grayscale and divided by their type's maximum (255 or 65535).
    """
    path = Path(path)
    if _is_dicom(path):
        import pydicom

        return display_pixels(pydicom.dcmread(path), frame=frame)
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image)
            full_scale = 65535.0
        else:
            array = np.asarray(image.convert("L"))
            full_scale = 255.0
    return np.clip(array.astype(np.float32) / np.float32(full_scale), 0.0, 1.0)


# ---------------------------------------------------------------- the dataset


class CocoDataset:
    """A COCO set prepared for a detector with longest side ``input_size``.

    ``dataset[i]`` is ``(PreparedImage, boxes, image_id)``: boxes are float32 Nx4
    ``x0, y0, x1, y1`` in the resized image's pixels (crowd annotations left out).
    Works as a map-style dataset for ``torch.utils.data.DataLoader``.

    ``cache_dir`` keeps each prepared image as a ``.npy`` file keyed by the source
    file's path, size and modification time and the input size, so a second epoch or
    run skips decoding full-size DICOM. The cached pixels are the exact float32 values.
    """

    def __init__(
        self,
        annotations: str | Path | Mapping,
        *,
        input_size: int,
        root: str | Path | None = None,
        image_ids: Sequence | None = None,
        cache_dir: str | Path | None = None,
        check_files: bool = True,
    ):
        if isinstance(annotations, Mapping):
            if root is None:
                raise ValueError("root (the folder image paths are relative to) is required with a mapping")
            self.root = Path(root)
            problems = validate_coco(annotations, root=self.root if check_files else None)
            if problems:
                raise DatasetError("invalid COCO dataset:\n  " + "\n  ".join(problems[:_MAX_LISTED_PROBLEMS]))
            data = dict(annotations)
        else:
            path = Path(annotations)
            data = load_coco(path, check_files=check_files)
            self.root = Path(root) if root is not None else path.parent
        if input_size < 1:
            raise ValueError(f"input_size must be positive, not {input_size}")
        self.input_size = input_size
        self.coco = data
        self.categories = list(data["categories"])
        images = list(data["images"])
        if image_ids is not None:
            wanted = set(image_ids)
            unknown = wanted - {image["id"] for image in images}
            if unknown:
                raise DatasetError(f"image ids not in the dataset: {sorted(unknown, key=str)[:10]}")
            images = [image for image in images if image["id"] in wanted]
        self.images = images
        self._annotations: dict = {image["id"]: [] for image in images}
        for annotation in data.get("annotations", []):
            if annotation["image_id"] in self._annotations and not annotation.get("iscrowd", 0):
                self._annotations[annotation["image_id"]].append(annotation)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[PreparedImage, np.ndarray, object]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image = self.images[index]
        prepared = self.prepared(index)
        return prepared, prepared.boxes_from_original(self.original_boxes(index)), image["id"]

    def image_info(self, index: int) -> dict:
        """The COCO image entry of item ``index``."""
        return self.images[index]

    def path(self, index: int) -> Path:
        """The image file of item ``index``."""
        return self.root / self.images[index]["file_name"]

    def original_boxes(self, index: int) -> np.ndarray:
        """float32 Nx4 ``x0, y0, x1, y1`` of item ``index`` in original pixels."""
        boxes = [
            (x, y, x + w, y + h)
            for x, y, w, h in (a["bbox"] for a in self._annotations[self.images[index]["id"]])
        ]
        return np.array(boxes, dtype=np.float32).reshape(-1, 4)

    def category_ids(self, index: int) -> np.ndarray:
        """The category id of each box of item ``index`` (same order as the boxes)."""
        return np.array(
            [a["category_id"] for a in self._annotations[self.images[index]["id"]]], dtype=np.int64
        )

    def prepared(self, index: int) -> PreparedImage:
        """Item ``index`` decoded and resized (from the cache when there is one)."""
        image = self.images[index]
        path = self.path(index)
        frame = image.get("frame")
        cache = self._cache_path(path, frame) if self.cache_dir is not None else None
        if cache is not None and cache.is_file():
            try:
                return _load_cached(cache)
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry is rebuilt below
        try:
            pixels = read_image(path, frame=frame)
        except DatasetError:
            raise
        except Exception as error:  # name the image whatever the decoder raised
            raise DatasetError(f"{path}: cannot read image {image['id']!r} ({error})") from error
        if pixels.shape != (image["height"], image["width"]):
            raise DatasetError(
                f"{path}: image is {pixels.shape[1]} x {pixels.shape[0]} pixels but the "
                f"annotations say {image['width']} x {image['height']}"
            )
        prepared = resize_longest_side(pixels, self.input_size)
        if cache is not None:
            _store_cached(cache, prepared)
        return prepared

    def _cache_path(self, path: Path, frame: int | None) -> Path:
        stat = path.stat()
        key = "|".join([
            _CACHE_VERSION, str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns),
            str(self.input_size), str(frame),
        ])
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _load_cached(path: Path) -> PreparedImage:
    with np.load(path) as stored:
        return PreparedImage(
            pixels=np.ascontiguousarray(stored["pixels"], dtype=np.float32),
            scale=float(stored["scale"]),
            original_shape=tuple(int(v) for v in stored["original_shape"]),
        )


def _store_cached(path: Path, prepared: PreparedImage) -> None:
    # Whole or not at all: DataLoader workers may fill the cache concurrently.
    write_atomically(path, lambda handle: np.savez(
        handle, pixels=prepared.pixels, scale=np.float64(prepared.scale),
        original_shape=np.array(prepared.original_shape, dtype=np.int64)), fsync=False)


# ---------------------------------------------------------------- splits


def _group_key(image: Mapping, group_by: str | None):
    value = image.get(group_by) if group_by else None
    return ("group", str(value)) if value not in (None, "") else ("image", str(image["id"]))


def split_image_ids(
    data: Mapping,
    *,
    proportions: Mapping[str, float] = STUDY_SPLIT,
    seed: int = 0,
    group_by: str | None = "patient_id",
) -> dict[str, list]:
    """Assign every image id of ``data`` to one part, e.g. ``{"train": [...], "val": [...]}``.

    ``proportions`` are relative sizes in images (default: the study's 2378/400/400).
    Images sharing the ``group_by`` field's value (the patient) stay together; images
    without it form their own group. Groups are shuffled with ``seed`` and laid end to end
    over the parts, so a part can be off by at most one group from its share.
    """
    if not proportions or any(not _is_number(v) or v < 0 for v in proportions.values()):
        raise ValueError(f"proportions must be non-negative numbers, not {dict(proportions)}")
    total = float(sum(proportions.values()))
    if total <= 0:
        raise ValueError("proportions must not all be zero")
    groups: dict = {}
    for image in data["images"]:
        groups.setdefault(_group_key(image, group_by), []).append(image["id"])
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    count = sum(len(ids) for ids in groups.values())
    names = list(proportions)
    bounds = np.cumsum([proportions[name] / total * count for name in names])
    parts: dict[str, list] = {name: [] for name in names}
    assigned = 0
    for position in order:
        ids = groups[keys[position]]
        # The part whose range holds this group's middle image.
        middle = assigned + len(ids) / 2
        part = min(int(np.searchsorted(bounds, middle, side="right")), len(names) - 1)
        parts[names[part]].extend(ids)
        assigned += len(ids)
    return parts


def subset_coco(data: Mapping, image_ids: Sequence) -> dict:
    """``data`` restricted to ``image_ids`` (their annotations; categories and info kept)."""
    keep = set(image_ids)
    return {
        **{key: value for key, value in data.items() if key not in ("images", "annotations")},
        "images": [image for image in data["images"] if image["id"] in keep],
        "annotations": [a for a in data.get("annotations", []) if a["image_id"] in keep],
    }


def split_coco(
    data: Mapping,
    *,
    proportions: Mapping[str, float] = STUDY_SPLIT,
    seed: int = 0,
    group_by: str | None = "patient_id",
) -> dict[str, dict]:
    """``data`` split into parts (see :func:`split_image_ids`), each a COCO mapping."""
    parts = split_image_ids(data, proportions=proportions, seed=seed, group_by=group_by)
    return {name: subset_coco(data, ids) for name, ids in parts.items()}


def write_splits(
    annotations: str | Path,
    *,
    out_dir: str | Path | None = None,
    proportions: Mapping[str, float] = STUDY_SPLIT,
    seed: int = 0,
    group_by: str | None = "patient_id",
) -> dict[str, Path]:
    """Split the COCO file ``annotations`` into ``<stem>_<part>.json`` files.

    They go next to it unless ``out_dir`` is given, in which case image paths are
    rewritten relative to ``out_dir`` so that they keep pointing at the same files.
    Returns the path of each part.
    """
    annotations = Path(annotations)
    data = load_coco(annotations)
    target = Path(out_dir) if out_dir is not None else annotations.parent
    if target.resolve() != annotations.parent.resolve():
        relative = os.path.relpath(annotations.parent.resolve(), target.resolve())
        data = {**data, "images": [
            {**image, "file_name": Path(os.path.normpath(Path(relative) / image["file_name"])).as_posix()}
            for image in data["images"]
        ]}
    written = {}
    for name, part in split_coco(data, proportions=proportions, seed=seed, group_by=group_by).items():
        part.setdefault("info", {})
        part["info"] = {**part["info"], "split": name, "split_seed": seed}
        written[name] = save_coco(part, target / f"{annotations.stem}_{name}.json")
    return written
