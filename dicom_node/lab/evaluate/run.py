"""`dicom-node evaluate`: run a detector over a COCO set (or read detections made elsewhere),
compute the metrics, write a report.

The report folder holds ``detections.json`` (COCO results format, original pixel
coordinates, so anyone can recompute the metrics with pycocotools), ``metrics.json``,
``pr_curve.png``, ``froc_curve.png``, ``report.md`` (a table next to the study's
published numbers) and, with ``by``, one PR and one FROC figure per field overlaying
the groups.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from dicom_node.config import ARCHITECTURES
from dicom_node.errors import ConfigError, NodeError
from dicom_node.files import SHARED, write_atomically
from dicom_node.lab.evaluate import metrics as m
from dicom_node.lab.evaluate.plots import plot_froc_curve, plot_pr_curve
from dicom_node.log import get_logger

log = get_logger("dicom_node.lab.evaluate")

# Published results of the study this project follows (issue 4), on ITS private test
# set: shown next to ours for orientation only; different data, not comparable.
STUDY_REFERENCE_NOTE = "the study's private test set (not this data set)"
STUDY_REFERENCE = (
    {"model": "RetinaNet R101-FPN", "architecture": "retinanet_r101_fpn",
     "precision": 0.735, "recall": 0.600, "f1": 0.660, "ap50": 0.568},
    {"model": "RetinaNet R50-FPN", "architecture": "retinanet_r50_fpn",
     "precision": 0.766, "recall": 0.442, "f1": 0.560, "ap50": 0.502},
    {"model": "Faster R-CNN R101-FPN", "architecture": "faster_rcnn_r101_fpn",
     "precision": 0.613, "recall": 0.655, "f1": 0.635, "ap50": 0.544},
    {"model": "Faster R-CNN R50-FPN", "architecture": "faster_rcnn_r50_fpn",
     "precision": 0.574, "recall": 0.660, "f1": 0.614, "ap50": 0.523},
)

# The detector runs with no score cut-off of its own during evaluation: AP and FROC
# sweep the threshold, so they need the low-scoring boxes too. The operating threshold
# is applied afterwards, when counting precision/recall/F1.
SWEEP_SCORE_FLOOR = 0.0
PROGRESS_EVERY = 50  # images between progress log lines


def evaluate_detections(
    gt_coco: dict,
    detections: list[dict],
    *,
    threshold: float,
    by: str | Sequence[str] | None = None,
    label: str | None = None,
) -> dict:
    """All metrics (see dicom_node.lab.evaluate.metrics) plus, with `by`, the same per group.

    `by` names image fields of `gt_coco` (view, laterality, density...): images are
    grouped by the field's value (images without it form the group "(none)") and every
    group is evaluated on its own. Raises ValueError for malformed input or a field
    that no image has.
    """
    result = m.evaluate(gt_coco, detections, threshold=threshold)
    fields = [by] if isinstance(by, str) else list(by or [])
    groups = {}
    for field in fields:
        groups[field] = {
            value: m.evaluate(*m.subset(gt_coco, detections, ids), threshold=threshold)
            for value, ids in m.group_image_ids(gt_coco, field).items()
        }
    return {
        "label": label,
        **result,
        "by": groups,
        "reference": {"note": STUDY_REFERENCE_NOTE, "models": [dict(row) for row in STUDY_REFERENCE]},
    }


def comparison_table(result: Mapping) -> str:
    """A Markdown table of this evaluation next to the study's four models."""
    s = result["summary"]
    rows = [(result.get("label") or "this evaluation", f"this data set (score \u2265 {s['threshold']:g})",
             s["precision"], s["recall"], s["f1"], s["ap50"])]
    rows += [(r["model"], result["reference"]["note"], r["precision"], r["recall"], r["f1"], r["ap50"])
             for r in result["reference"]["models"]]
    lines = ["| model | evaluated on | precision | recall | F1 | AP50 |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join([name, where, *(_cell(v) for v in values)]) + " |"
              for name, where, *values in rows]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _markdown(result: Mapping) -> str:
    s = result["summary"]
    froc = s["froc"]
    rates = " | ".join(f"{r:g}" for r in froc["fp_rates"])
    sens = " | ".join(_cell(v) for v in froc["sensitivities"])
    parts = [
        f"# Mass detection evaluation: {result.get('label') or 'detector'}",
        "",
        f"{s['images']} images, {s['lesions']} lesions, {s['detections']} detections; "
        f"matching at IoU \u2265 {s['iou_threshold']:g}; operating threshold score \u2265 {s['threshold']:g}: "
        f"TP {s['tp']}, FP {s['fp']} (of which {s['duplicates']} second marks on a found lesion), FN {s['fn']}.",
        "",
        comparison_table(result),
        "",
        "The study's numbers come from its private test set; they are shown for orientation only.",
        "",
        "## FROC (sensitivity at mean false positives per image)",
        "",
        f"| FP/image | {rates} | mean |",
        "|---|" + "---|" * (len(froc["fp_rates"]) + 1),
        f"| sensitivity | {sens} | {_cell(froc['mean_sensitivity'])} |",
    ]
    for field, groups in result.get("by", {}).items():
        parts += ["", f"## By {field}", "", "| " + field + " | images | lesions | precision | recall | F1 | AP50 "
                  "| mean FROC sensitivity |", "|---|---|---|---|---|---|---|---|"]
        for value, g in groups.items():
            gs = g["summary"]
            parts.append(f"| {value} | {gs['images']} | {gs['lesions']} | " + " | ".join(
                _cell(gs[k]) for k in ("precision", "recall", "f1", "ap50")) +
                f" | {_cell(gs['froc']['mean_sensitivity'])} |")
    return "\n".join(parts) + "\n"


def _write_text(path: Path, text: str) -> None:
    # Whole or not at all, and readable by whoever reads reports.
    write_atomically(path, text, fsync=False, mode=SHARED)


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("_") or "value"


def _series(categories: Mapping[str, Mapping], prefix: str = "") -> dict:
    if len(categories) == 1 and prefix:
        return {prefix: next(iter(categories.values()))}
    return {f"{prefix} / {name}" if prefix else name: c for name, c in categories.items()}


def write_report(result: Mapping, out_dir: Path) -> list[Path]:
    """Write metrics.json, report.md, pr_curve.png, froc_curve.png (+ per `by` field); return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = result.get("label") or "detector"
    s = result["summary"]
    subtitle = f"{s['images']} images, {s['lesions']} lesions"
    written = [out_dir / "metrics.json", out_dir / "report.md"]
    _write_text(written[0], json.dumps(result, indent=1, allow_nan=False) + "\n")
    _write_text(written[1], _markdown(result))
    written.append(plot_pr_curve(
        _series(result["categories"]), out_dir / "pr_curve.png",
        title=f"Precision-recall (IoU \u2265 {s['iou_threshold']:g}): {label}\n{subtitle}",
        reference=result["reference"]["models"], reference_label=result["reference"]["note"]))
    written.append(plot_froc_curve(
        _series(result["categories"]), out_dir / "froc_curve.png", title=f"FROC: {label}\n{subtitle}"))
    for field, groups in result.get("by", {}).items():
        series = {}
        for value, g in groups.items():
            series.update(_series(g["categories"], f"{field}={value}"))
        written.append(plot_pr_curve(series, out_dir / f"pr_curve_by_{_slug(field)}.png",
                                     title=f"Precision-recall by {field}: {label}"))
        written.append(plot_froc_curve(series, out_dir / f"froc_curve_by_{_slug(field)}.png",
                                       title=f"FROC by {field}: {label}"))
    return written


# ---------------------------------------------------------------- running a detector


def _load_dataset(dataset_json: Path, *, check_files: bool = True) -> dict:
    """The validated COCO set (DatasetError, a NodeError, lists what is wrong with it)."""
    from dicom_node.lab.datasets import DatasetError
    from dicom_node.lab.datasets.coco import load_coco

    coco = load_coco(dataset_json, check_files=check_files)
    if not coco["images"]:
        raise DatasetError(f"{dataset_json}: the dataset has no images")
    return coco


def _category_of_label(coco: Mapping) -> Callable[[str], int | None]:
    """Detector label -> COCO category id (in a single-category set every label is that one)."""
    categories = coco.get("categories") or [{"id": 1, "name": "mass"}]
    if len(categories) == 1:
        only = categories[0]["id"]
        return lambda _label: only
    return {str(c.get("name")): c["id"] for c in categories}.get


def detect_dataset(detector, coco: Mapping, dataset_json: Path) -> tuple[list[dict], list[dict]]:
    """Run `detector` on every image of `coco`; return (COCO detections, skipped images).

    Images go through the datasets module's reader, i.e. the node's pixel pipeline for
    DICOM (dicom_node.pixels), resized to the detector's input size. Boxes come back in
    original pixels, the ground truth's coordinates. An image that cannot be read is
    listed as skipped and has no detections, so its lesions count as missed (the node
    would not have marked them either).
    """
    from dicom_node.lab.datasets.coco import CocoDataset

    dataset = CocoDataset(coco, input_size=detector.input_size, root=Path(dataset_json).parent, check_files=False)
    category_of = _category_of_label(coco)
    detections, skipped = [], []
    for index in range(len(dataset)):
        image = dataset.image_info(index)
        if index and index % PROGRESS_EVERY == 0:
            log.info("evaluation_progress", done=index, images=len(dataset))
        try:
            prepared = dataset.prepared(index)
        except NodeError as error:  # one unreadable image must not end the evaluation
            skipped.append({"image_id": image["id"], "file_name": image["file_name"], "reason": str(error)})
            log.warning("image_skipped", image_id=image["id"], reason=str(error))
            continue
        for found in detector.detect([prepared])[0]:
            category = category_of(found.label)
            if category is None:
                continue
            x0, y0, x1, y1 = (float(v) for v in found.box)
            detections.append({"image_id": image["id"], "category_id": category,
                               "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(found.score)})
    return detections, skipped


def _check_fields(coco: Mapping, by, dataset_json: Path) -> None:
    for field in [by] if isinstance(by, str) else list(by or []):
        try:
            m.group_image_ids(coco, field)
        except ValueError as error:  # a --by field the dataset does not have: a bad argument
            from dicom_node.lab.datasets import DatasetError

            raise DatasetError(f"{dataset_json}: {error}") from None


def evaluate_detector(
    detector,
    dataset_json: Path,
    out_dir: Path,
    *,
    threshold: float,
    by: str | Sequence[str] | None = None,
    label: str | None = None,
) -> dict:
    """Run an already loaded `detector` (the Detector protocol) over a COCO set; write the report."""
    dataset_json = Path(dataset_json)
    coco = _load_dataset(dataset_json)
    _check_fields(coco, by, dataset_json)
    return _evaluate(detector, coco, dataset_json, Path(out_dir), threshold=threshold, by=by, label=label)


def _evaluate(detector, coco, dataset_json: Path, out_dir: Path, *, threshold, by, label) -> dict:
    log.info("evaluation_started", images=len(coco["images"]))
    detections, skipped = detect_dataset(detector, coco, dataset_json)
    if len(skipped) == len(coco["images"]):
        raise NodeError(f"{dataset_json}: no image could be analysed (first: {skipped[0]['reason']})")
    return _report(coco, detections, dataset_json, out_dir, threshold=threshold, by=by, label=label,
                   facts={"skipped_images": skipped})


def _report(coco, detections, dataset_json: Path, out_dir: Path, *, threshold, by, label, facts: dict) -> dict:
    """The metrics of `detections` on `coco` (plus `facts`), written with detections.json into `out_dir`."""
    from dicom_node.lab.datasets import DatasetError

    try:
        result = evaluate_detections(coco, detections, threshold=threshold, by=by, label=label)
    except ValueError as error:
        raise DatasetError(f"{dataset_json}: {error}") from None
    result["dataset"] = str(dataset_json)
    result |= facts
    skipped = facts.get("skipped_images", [])
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "detections.json", json.dumps(detections) + "\n")
    write_report(result, out_dir)
    log.info("evaluation_done", images=len(coco["images"]), skipped=len(skipped), detections=len(detections),
             ap50=result["summary"]["ap50"])
    return result


def run_evaluation(
    config_detector,
    dataset_json: Path,
    out_dir: Path,
    *,
    by: str | Sequence[str] | None = None,
    device: str = "cpu",
    threshold: float | None = None,
    label: str | None = None,
    weights: str | None = None,
    architecture: str | None = None,
) -> dict:
    """Load the configured detector, run it over a COCO set of DICOM images, write the report.

    `config_detector` is the node's DetectorConfig; its score_threshold is the operating
    threshold unless `threshold` is given (the detector itself runs without a cut-off so
    that AP and FROC see every box). `weights` (a checkpoint, a training checkpoint, or
    ``demo``) replaces the config's weights and, with them, the config's architecture and
    input size: those of the checkpoint apply, unless `architecture` is given, which the
    checkpoint must then have. Image paths in the JSON are relative to the JSON file.
    Writes detections.json and everything write_report writes; returns the result.
    Raises NodeError naming the problem (dataset, image file, field, checkpoint).
    """
    dataset_json = Path(dataset_json)
    coco = _load_dataset(dataset_json)
    _check_fields(coco, by, dataset_json)  # before loading the model and the slow run
    operating = config_detector.score_threshold if threshold is None else float(threshold)
    chosen = {"score_threshold": SWEEP_SCORE_FLOOR}
    if weights is not None:
        # The config's architecture and input size go with the config's weights, not with these.
        chosen |= {"weights": weights, "architecture": None, "input_size": None}
    if architecture is not None:
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"--architecture: unknown architecture {architecture!r}; "
                              f"known: {', '.join(ARCHITECTURES)}")
        chosen["architecture"] = architecture

    from dicom_node.model.detector import load_detector

    config_detector = config_detector.model_copy(update=chosen)
    detector = load_detector(config_detector, device=device,
                             asked_by="--architecture" if architecture else "detector.architecture")
    if label is None:
        trained = getattr(detector, "label", None)
        label = f"{detector.architecture} ({trained or Path(config_detector.weights).name})"
    return _evaluate(detector, coco, dataset_json, Path(out_dir), threshold=operating, by=by, label=label)


def score_detections(
    detections_json: Path,
    dataset_json: Path,
    out_dir: Path,
    *,
    threshold: float,
    by: str | Sequence[str] | None = None,
    label: str | None = None,
) -> dict:
    """Score detections made elsewhere (a COCO results file) on a COCO set; write the same report.

    No model is loaded. The file is checked entry by entry against the dataset
    (dicom_node.lab.evaluate.detections); DatasetError names the first bad entry.
    """
    from dicom_node.lab.evaluate.detections import read_detections

    dataset_json, detections_json = Path(dataset_json), Path(detections_json)
    coco = _load_dataset(dataset_json, check_files=False)  # only its annotations are needed
    _check_fields(coco, by, dataset_json)
    detections = read_detections(detections_json, coco, dataset=dataset_json)
    log.info("evaluation_started", images=len(coco["images"]), detections_file=str(detections_json))
    return _report(coco, detections, dataset_json, Path(out_dir), threshold=float(threshold), by=by,
                   label=label or f"detections from {detections_json.name}",
                   facts={"skipped_images": [], "detections_file": str(detections_json)})
