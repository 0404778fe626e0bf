"""Convert CBIS-DDSM (the Curated Breast Imaging Subset of DDSM, TCIA) to our COCO format.

Input: the case description CSV files (``mass_case_description_train_set.csv``,
``mass_case_description_test_set.csv``; the calcification files work too, their
rows are counted and left out) and the folder the DICOM files were downloaded to.
One CSV row is one abnormality; its columns name the full mammogram (``image file
path``), the cropped lesion (``cropped image file path``) and the lesion's binary
mask (``ROI mask file path``).

Output: one COCO image per full mammogram, one box per mass (the bounding box of its
ROI mask's non-zero pixels), with the image fields ``view`` (CC/MLO), ``laterality``
(L/R), ``density`` (BI-RADS A-D, from the 1-4 in the CSV), ``pathology`` (the most
severe of the image's masses), ``patient_id`` (the split helpers keep a patient's images
together) and ``split`` (train/test, from the CSV's name); each annotation carries its
row's ``pathology``, ``abnormality_id``, ``assessment``, ``subtlety``, ``mass_shape``
and ``mass_margins``. Image paths are relative to the output JSON's folder.

Finding the files. The CSV paths look like
``Mass-Training_P_00001_LEFT_CC/1.3.6.1.4.1.9590.../1.3.6.1.4.1.9590.../000000.dcm``,
but a TCIA download (NBIA Data Retriever) names the folders below the first one
differently (``CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/07-20-2016-DDSM-74994/
1.000000-full mammogram images-24515/1-1.dcm``). Each CSV path is therefore resolved:

1. as written, relative to ``root``, if that file exists;
2. else by its first folder name (``Mass-Training_P_00001_LEFT_CC`` for the image,
   ``Mass-Training_P_00001_LEFT_CC_1`` for the lesion), searched at any depth under
   ``root``; every DICOM file below that folder is a candidate.

The lesion folder of a TCIA download often holds both the cropped image and the mask
(``1-1.dcm``, ``1-2.dcm``, in either order). Among the candidates the mask is the file
whose Series Description says "ROI mask", else the one whose size is closest to the
full image's (the crop is much smaller), and it must be binary.

Masks may differ from their image by a few pixels in each direction; the box is then
scaled by the ratio of the sizes. A mask more than ``size_tolerance`` (relative) off in
either direction, an empty or non-binary mask, or a missing file is skipped and listed
in the summary with the reason, never a crash.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.lab.datasets import DatasetError
from dicom_node.lab.datasets.coco import save_coco

CATEGORIES = [{"id": 1, "name": "mass", "supercategory": "lesion"}]
_PATHOLOGY_SEVERITY = {"MALIGNANT": 3, "BENIGN": 2, "BENIGN_WITHOUT_CALLBACK": 1}
_DENSITY_LETTERS = {1: "A", 2: "B", 3: "C", 4: "D"}
_LATERALITY = {"LEFT": "L", "RIGHT": "R", "L": "L", "R": "R"}
_VIEWS = ("CC", "MLO")


@dataclass
class ConversionSummary:
    """What a conversion did: counts, and every skipped row or image with its reason."""

    out_json: Path
    rows: int = 0  # CSV rows read
    images: int = 0  # full mammograms written
    annotations: int = 0  # mass boxes written
    not_mass: int = 0  # rows of other abnormality types (calcifications), left out
    rescaled_masks: int = 0  # masks whose size differed slightly from the image's
    skipped: list[dict] = field(default_factory=list)  # {"csv", "line", "what", "reason"}

    def as_dict(self) -> dict:
        return {
            "out_json": str(self.out_json), "rows": self.rows, "images": self.images,
            "annotations": self.annotations, "not_mass": self.not_mass,
            "rescaled_masks": self.rescaled_masks, "skipped": list(self.skipped),
        }


class _Skip(Exception):
    """This row (or image) cannot be converted; the message says why."""


def _normalise_header(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name.strip().lower())


def _read_rows(csv_path: Path) -> Iterable[tuple[int, dict]]:
    try:
        handle = csv_path.open(newline="", encoding="utf-8-sig")
    except OSError as error:
        raise DatasetError(f"{csv_path}: cannot read CSV file ({error.strerror})") from None
    with handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise DatasetError(f"{csv_path}: empty CSV file")
        headers = {name: _normalise_header(name) for name in reader.fieldnames}
        needed = {"patient id", "left or right breast", "image view", "abnormality type",
                  "image file path", "roi mask file path"}
        missing = needed - set(headers.values())
        if missing:
            raise DatasetError(f"{csv_path}: not a CBIS-DDSM description file, missing column(s) "
                               f"{sorted(missing)}")
        for row in reader:
            yield reader.line_num, {headers[k]: (v or "").strip() for k, v in row.items() if k in headers}


class _Resolver:
    """Finds the DICOM files a CSV path means, in a download whose folders may be renamed."""

    def __init__(self, root: Path):
        self.root = root
        self._folders: dict[str, list[Path]] | None = None

    def _index(self) -> dict[str, list[Path]]:
        if self._folders is None:
            folders: dict[str, list[Path]] = {}
            for directory, subdirectories, _files in os.walk(self.root):
                for name in subdirectories:
                    folders.setdefault(name, []).append(Path(directory) / name)
            self._folders = folders
        return self._folders

    def candidates(self, csv_path: str) -> list[Path]:
        """DICOM files for ``csv_path``: the exact file, else all under its first folder."""
        relative = csv_path.strip().replace("\\", "/").strip("/")
        if not relative:
            return []
        exact = self.root / relative
        if exact.is_file():
            return [exact]
        first = relative.split("/")[0]
        found = []
        for folder in self._index().get(first, []):
            found.extend(sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm"))
        return found


def _read_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as error:
        raise _Skip(f"{path}: not a readable DICOM file ({error})") from None


def _full_image(resolver: _Resolver, csv_path: str) -> tuple[Path, int, int]:
    candidates = resolver.candidates(csv_path)
    if not candidates:
        raise _Skip(f"full mammogram not found under {resolver.root}: {csv_path!r}")
    headers = [(path, _read_header(path)) for path in candidates]
    described = [(p, h) for p, h in headers if "full mammogram" in str(h.get("SeriesDescription", "")).lower()]
    pool = described or headers
    # Several files and no description: the largest one is the full mammogram (not a crop).
    path, header = max(pool, key=lambda item: int(item[1].get("Rows", 0)) * int(item[1].get("Columns", 0)))
    rows, columns = int(header.get("Rows", 0)), int(header.get("Columns", 0))
    if rows <= 0 or columns <= 0:
        raise _Skip(f"{path}: no Rows/Columns")
    return path, rows, columns


def _mask_file(resolver: _Resolver, row: dict, shape: tuple[int, int]) -> Path:
    candidates = resolver.candidates(row.get("roi mask file path", ""))
    # TCIA puts mask and crop in one folder; the crop path's folder is a second place to look.
    for path in resolver.candidates(row.get("cropped image file path", "")):
        if path not in candidates:
            candidates.append(path)
    if not candidates:
        raise _Skip(f"ROI mask not found under {resolver.root}: {row.get('roi mask file path')!r}")
    headers = [(path, _read_header(path)) for path in candidates]
    described = [(p, h) for p, h in headers if "roi mask" in str(h.get("SeriesDescription", "")).lower()]
    if described:
        headers = described

    def mismatch(item) -> float:
        header = item[1]
        return abs(int(header.get("Rows", 0)) - shape[0]) + abs(int(header.get("Columns", 0)) - shape[1])

    return min(headers, key=mismatch)[0]


def _mask_box(path: Path, shape: tuple[int, int], *, size_tolerance: float,
              summary: ConversionSummary) -> tuple[list[float], float]:
    """``[x, y, w, h]`` and area of the mask's non-zero pixels, in the image's pixels."""
    try:
        mask = pydicom.dcmread(path).pixel_array
    except Exception as error:  # any decoder failure: skip this mask, name it
        raise _Skip(f"{path}: cannot decode mask pixels ({error})") from None
    if mask.ndim != 2:
        raise _Skip(f"{path}: mask has shape {mask.shape}, not rows x columns")
    rows, columns = shape
    mask_rows, mask_columns = mask.shape
    if (abs(mask_rows - rows) > size_tolerance * rows or abs(mask_columns - columns) > size_tolerance * columns):
        raise _Skip(f"{path}: mask is {mask_columns} x {mask_rows} pixels, image {columns} x {rows}: "
                    "inconsistent sizes")
    values = np.unique(mask)
    if values.size > 2:
        raise _Skip(f"{path}: not a binary mask ({values.size} distinct values)")
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise _Skip(f"{path}: empty mask")
    if (mask_rows, mask_columns) != shape:
        summary.rescaled_masks += 1
    scale_x, scale_y = columns / mask_columns, rows / mask_rows
    x0, x1 = xs.min() * scale_x, (xs.max() + 1) * scale_x
    y0, y1 = ys.min() * scale_y, (ys.max() + 1) * scale_y
    x0, x1 = max(0.0, float(x0)), min(float(columns), float(x1))
    y0, y1 = max(0.0, float(y0)), min(float(rows), float(y1))
    return [x0, y0, x1 - x0, y1 - y0], float(xs.size * scale_x * scale_y)


def _split_name(csv_path: Path) -> str:
    name = csv_path.name.lower()
    return "test" if "test" in name else "train" if "train" in name else ""


def _density(value: str) -> tuple[str | None, int | None]:
    try:
        number = int(float(value))
    except ValueError:
        return None, None
    return _DENSITY_LETTERS.get(number), number


def _int_or_text(value: str):
    try:
        return int(value)
    except ValueError:
        return value or None


def convert_cbis_ddsm(
    csv_paths: Sequence[str | Path],
    root: str | Path,
    out_json: str | Path,
    *,
    size_tolerance: float = 0.02,
) -> ConversionSummary:
    """Convert CBIS-DDSM mass cases to a COCO file at ``out_json``; returns the summary.

    ``csv_paths`` are case description CSV files, ``root`` the folder holding the
    DICOM download. Rows that cannot be converted are skipped and listed in
    ``summary.skipped``; an image whose every mass was skipped is left out too.
    Raises DatasetError only when a CSV file itself is unreadable or not CBIS-DDSM.
    """
    root, out_json = Path(root), Path(out_json)
    if not root.is_dir():
        raise DatasetError(f"{root}: CBIS-DDSM root folder not found")
    summary = ConversionSummary(out_json=out_json)
    resolver = _Resolver(root)
    images: dict[str, dict] = {}  # key: the full mammogram's first folder name
    failed_images: dict[str, str] = {}
    annotations: list[dict] = []

    for csv_path in (Path(p) for p in csv_paths):
        for line, row in _read_rows(csv_path):
            summary.rows += 1
            where = {"csv": csv_path.name, "line": line}
            if row.get("abnormality type", "").lower() != "mass":
                summary.not_mass += 1
                continue
            image_key = row["image file path"].replace("\\", "/").strip("/").split("/")[0]
            what = f"{row.get('patient id')} {row.get('left or right breast')} {row.get('image view')} " \
                   f"abnormality {row.get('abnormality id')}"
            try:
                laterality = _LATERALITY.get(row["left or right breast"].upper())
                view = row["image view"].upper()
                if laterality is None or view not in _VIEWS:
                    raise _Skip(f"unknown laterality/view {row['left or right breast']!r} {row['image view']!r}")
                if image_key in failed_images:
                    raise _Skip(failed_images[image_key])
                image = images.get(image_key)
                if image is None:
                    try:
                        path, rows, columns = _full_image(resolver, row["image file path"])
                    except _Skip as error:
                        failed_images[image_key] = str(error)
                        raise
                    letter, number = _density(row.get("breast density", ""))
                    image = {
                        "id": len(images) + 1,
                        "file_name": Path(os.path.relpath(path.resolve(), out_json.parent.resolve())).as_posix(),
                        "width": columns,
                        "height": rows,
                        "view": view,
                        "laterality": laterality,
                        "density": letter,
                        "birads_density": number,
                        "pathology": None,
                        "patient_id": row["patient id"],
                        "split": _split_name(csv_path),
                        "cbis_image": image_key,
                    }
                    images[image_key] = image
                shape = (image["height"], image["width"])
                mask_path = _mask_file(resolver, row, shape)
                bbox, area = _mask_box(mask_path, shape, size_tolerance=size_tolerance, summary=summary)
            except _Skip as error:
                summary.skipped.append({**where, "what": what, "reason": str(error)})
                continue
            pathology = row.get("pathology", "").upper() or None
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image["id"],
                "category_id": 1,
                "bbox": bbox,
                "area": area,
                "iscrowd": 0,
                "pathology": pathology,
                "abnormality_id": _int_or_text(row.get("abnormality id", "")),
                "assessment": _int_or_text(row.get("assessment", "")),
                "subtlety": _int_or_text(row.get("subtlety", "")),
                "mass_shape": row.get("mass shape") or None,
                "mass_margins": row.get("mass margins") or None,
            })
            if _PATHOLOGY_SEVERITY.get(pathology, 0) > _PATHOLOGY_SEVERITY.get(image["pathology"], 0):
                image["pathology"] = pathology

    # An image whose masses were all skipped would teach the model that it is normal.
    annotated = {a["image_id"] for a in annotations}
    kept = [image for image in images.values() if image["id"] in annotated]
    renumber = {image["id"]: number for number, image in enumerate(kept, start=1)}
    for image in kept:
        image["id"] = renumber[image["id"]]
    for annotation in annotations:
        annotation["image_id"] = renumber[annotation["image_id"]]
    summary.images, summary.annotations = len(kept), len(annotations)
    save_coco({
        "info": {"description": "CBIS-DDSM mass cases converted by dicom-node",
                 "source_csv": [Path(p).name for p in csv_paths]},
        "images": kept,
        "annotations": annotations,
        "categories": CATEGORIES,
    }, out_json)
    return summary
