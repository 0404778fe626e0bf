"""Evaluation of a mass detector on a COCO set: COCO AP50, precision/recall/F1, FROC, figures.

`metrics` is pure numpy (AP50 equals pycocotools' COCOeval stats[1]); `plots` draws the
PR and FROC curves; `run` ties them to the detector and writes the report folder.
"""

from dicom_node.lab.evaluate.metrics import FROC_FP_RATES, evaluate
from dicom_node.lab.evaluate.run import (
    STUDY_REFERENCE,
    evaluate_detections,
    evaluate_detector,
    run_evaluation,
    score_detections,
    write_report,
)

__all__ = [
    "FROC_FP_RATES",
    "STUDY_REFERENCE",
    "evaluate",
    "evaluate_detections",
    "evaluate_detector",
    "run_evaluation",
    "score_detections",
    "write_report",
]
